"""Experiment tracking with Weights & Biases (``--track``), as cleanrl does it.

The training scripts log to tensorboard (``runs/{run_name}``); with ``--track`` the run is also a
W&B run of project ``--wandb-project-name`` (entity ``--wandb-entity``): W&B syncs every
tensorboard scalar as it is written (``sync_tensorboard``), records the run's arguments as its
config, and the saved model's evaluation videos (``--capture-video``) are logged at the end.
A resumed run (``--resume``) continues its W&B run: the W&B run id is the run name.

wandb is optional: ``check_tracking`` refuses ``--track`` in one line when it is not installed,
before anything is written. ``WANDB_MODE=offline`` keeps everything on disk under ``wandb/``
(``wandb sync`` uploads it later), which is how the tests run it.
"""

from __future__ import annotations

import os
import re
import sys

RUN_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9_.=+-]")  # W&B run ids may not hold / \ # ? % :


def check_tracking(args) -> None:
    """Refuse, in one ValueError line with the fix, ``--track`` without the wandb package and
    ``--capture-video`` without the saved model's evaluation it records."""
    if getattr(args, "track", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--track needs the wandb package, which is not installed: pip install wandb "
                             "(or run without --track)") from None
    if getattr(args, "capture_video", False) and not (args.save_model and args.eval_episodes > 0):
        raise ValueError("--capture-video records the final evaluation of the saved model: it needs --save-model "
                         "and --eval-episodes > 0")


def wandb_run_id(run_name: str) -> str:
    """The W&B run id of ``run_name``: the name with characters W&B refuses replaced by ``_``
    (at most 128 characters, its newest part kept: the name ends with the start time)."""
    return RUN_ID_CHARACTERS.sub("_", run_name)[-128:]


def start_tracking(args, run_name: str) -> None:
    """``--track``: start (or, resuming, continue) the W&B run of ``run_name``; called by
    ``open_writer`` before it makes the tensorboard writer, so that W&B syncs every scalar.
    Nothing without ``--track``."""
    if not getattr(args, "track", False):
        return
    import wandb

    wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, id=wandb_run_id(run_name),
               resume="allow", config=vars(args), sync_tensorboard=True, save_code=True)


def _active_run():
    wandb = sys.modules.get("wandb")  # imported by start_tracking only
    return None if wandb is None else wandb.run


def log_videos(paths: list[str]) -> None:
    """Log the mp4 files ``paths`` (the saved model's evaluation, ``--capture-video``) to the
    active W&B run as ``videos/{file name}``; nothing when no run is active."""
    run = _active_run()
    if run is None:
        return
    import wandb

    run.log({f"videos/{os.path.splitext(os.path.basename(path))[0]}": wandb.Video(path, format="mp4")
             for path in paths})


def finish_tracking(exit_code: int) -> None:
    """End the active W&B run, if any: its files flushed, a run that did not end with exit code
    0 marked as such. Called after the tensorboard writer is closed."""
    run = _active_run()
    if run is not None:
        run.finish(exit_code=exit_code)
