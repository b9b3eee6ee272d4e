"""A run's arguments, resolved in one place for every script (``resolve_args``), in this order:

1. the script's ``Args`` defaults;
2. the **preset** (``--preset``; ``auto``, the default, picks by the env's family: ``atari`` for
   ale-py ids, ``small_image`` for image observations under 36 pixels a side, ``vector`` for
   every other observation after ``envs.adapt_observation``; ``none`` keeps the defaults), for
   every field the command line does not give;
3. the **command line**;
4. resuming (``--resume``): the **checkpoint**'s arguments, of which only ``RESUMABLE_ARGS``
   (how long and how the run is logged, saved and placed, not what it learns) may be given anew.

A preset is a YAML file in ``r2d2_algo/presets/`` (it travels with the package): ``args`` for
every script, ``scripts: {r2d2_mp.py: {...}}`` for one script only; ``atari_fast`` (Atari in
few env steps) is chosen only by name. Where a preset value does not fit a flag the user gave
(a min replay ratio above the replay ratio given, learning that would start after the run ends,
an overlap not below the sequence length given) it is adjusted and the preset line says so.
Nothing else changes an argument afterwards: the values the scripts derive (envs per actor,
learner threads, the number of actors) are printed in their run lines.

Every field's source (``default``, ``preset NAME``, ``preset NAME, adjusted``, ``command line``,
``checkpoint``, or ``code`` for arguments built in code) is returned with the arguments and
written beside them as ``runs/{run_name}/args_sources.json``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import yaml

from r2d2_algo.checkpoint import resume_run

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
PRESETS = ("atari", "atari_fast", "vector", "small_image")
# what a resumed run may be given anew (fields a script lacks are skipped): how long it runs and
# how it is logged, saved and placed; never what it learns
RESUMABLE_ARGS = ("total_timesteps", "checkpoint_interval", "checkpoint_replay", "save_model", "capture_video",
                  "track", "wandb_project_name", "wandb_entity", "cuda", "eval_interval", "eval_episodes",
                  "eval_epsilon", "log_interval", "progress_bar", "amp", "tf32", "actor_update_interval",
                  "env_threads", "max_actor_restarts", "learner_threads", "inference", "ray_address",
                  "ray_plasma_directory", "role_nodes", "samples_in_flight", "actor_push_interval")


def resolve_args(args, argv: list[str] | None, script: str):
    """The arguments a run uses and where each came from (module docstring).

    Args:
        args: the script's ``Args`` as tyro parsed them from ``argv`` over the script's defaults.
        argv: the command line (without the program); None for arguments built in code, which
            are used as they are (no preset; a resume still reads ``sys.argv``, as before).
        script: the script's file name (``r2d2_mp.py``), which picks a preset's per-script values.
    Returns:
        (args, checkpoint or None, sources: {field: source}).
    Raises:
        ValueError: an unknown or missing preset; CheckpointError and UnsupportedEnvError (both
            ValueErrors) from the checkpoint and, for ``--preset auto``, the env id.
    """
    fields = [f.name for f in dataclasses.fields(args)]
    command_line = sys.argv[1:] if argv is None else argv
    args, checkpoint = resume_run(args, command_line, RESUMABLE_ARGS)
    given = given_flags(fields, command_line)
    if checkpoint is not None:
        return args, checkpoint, {name: "command line" if name in given else "checkpoint" for name in fields}
    if argv is None:
        return args, None, {name: "code" for name in fields}
    args, from_preset = apply_preset(args, given, script)
    sources = {name: "command line" if name in given else from_preset.get(name, "default") for name in fields}
    return args, None, sources


def given_flags(fields: list[str], argv: list[str]) -> set[str]:
    """The fields whose flag ``argv`` gives (``--name``, ``--name=value``, ``--no-name``; tyro
    takes ``-`` and ``_`` alike)."""
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in fields and name.startswith("no_") and name[3:] in fields:
            name = name[3:]
        if name in fields:
            given.add(name)
    return given


def env_family(env_id: str, env_kwargs: tuple[str, ...] = ()) -> str:
    """``atari``, ``small_image`` or ``vector`` for ``env_id`` (built with ``env_kwargs``).

    Raises:
        UnsupportedEnvError: as ``envs.check_env_id``.
    """
    from r2d2_algo.envs import check_env_id, is_atari
    from r2d2_algo.model import SMALL_IMAGE, image_layout

    if is_atari(env_id):
        return "atari"
    space, _ = check_env_id(env_id, quiet=True, env_kwargs=env_kwargs)
    if len(space.shape) == 3:
        h, w = space.shape[:2] if image_layout(space.shape) == "hwc" else space.shape[1:]
        if min(h, w) < SMALL_IMAGE:
            return "small_image"
    return "vector"


def preset_values(name: str, script: str) -> dict:
    """The arguments preset ``name`` sets for ``script`` (a file name such as ``r2d2_mp.py``).

    Raises:
        ValueError: an unknown preset, a missing preset file, or a file that is not a preset.
    """
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of auto, none, {', '.join(PRESETS)}; got {name!r}")
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise ValueError(f"preset {name!r} needs {path}, which is missing (a broken install?); "
                         f"or give --preset none")
    with open(path) as f:
        preset = yaml.safe_load(f)
    if not isinstance(preset, dict) or not isinstance(preset.get("args"), dict):
        raise ValueError(f"{path} is not a preset (it needs an `args:` mapping)")
    return {**preset["args"], **(preset.get("scripts") or {}).get(script, {})}


def apply_preset(args, given: set[str], script: str):
    """``args`` with the preset's values for every field not in ``given`` (the flags of the
    command line), and a printed line naming the preset and every value it set. Returns
    ``(args, {field: source})`` for the fields the preset set; ``(args, {})`` for ``--preset none``.

    Raises:
        ValueError: unknown preset; UnsupportedEnvError (a ValueError): the env id, for ``auto``.
    """
    if args.preset == "none":
        return args, {}
    name, why = args.preset, "--preset"
    if name == "auto":
        name, why = env_family(args.env_id, getattr(args, "env_kwargs", ())), "auto, by env family"
    fields = {f.name for f in dataclasses.fields(args)}
    set_here = {k: v for k, v in preset_values(name, script).items() if k in fields and k not in given}
    with_preset = dataclasses.replace(args, **set_here)
    adjusted = {}
    if "min_replay_ratio" in set_here and with_preset.min_replay_ratio > with_preset.replay_ratio:
        adjusted["min_replay_ratio"] = (with_preset.replay_ratio / 2, "half the --replay-ratio given")
    if "learning_starts" in set_here and with_preset.learning_starts >= with_preset.total_timesteps:
        adjusted["learning_starts"] = (with_preset.total_timesteps // 10, "a tenth of the --total-timesteps given")
    if "overlap" in set_here and with_preset.overlap >= with_preset.sequence_length:
        adjusted["overlap"] = (with_preset.sequence_length // 2, "half the --sequence-length given")
    set_here.update({k: value for k, (value, _) in adjusted.items()})
    set_here = {k: v for k, v in set_here.items() if v != getattr(args, k)}  # what differs from the defaults
    args = dataclasses.replace(args, **set_here)
    listed = ", ".join(f"{k}={v}" for k, v in set_here.items()) or "nothing beyond the script's defaults"
    message = f"preset {name} ({why}; --preset none for the script's defaults): {listed}"
    if adjusted:
        message += "; adjusted to fit your flags: " + ", ".join(f"{k} ({reason})" for k, (_, reason) in adjusted.items())
    print(message, flush=True)
    return args, {k: f"preset {name}, adjusted" if k in adjusted else f"preset {name}" for k in set_here}
