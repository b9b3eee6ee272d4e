"""Checks of the arguments every training script shares, each refusal one line naming the flag
the user typed (R2D2's scripts call ``check_common_args`` first in their own ``check_args``).

Ranges: seeds in [0, 2³²) (numpy's and gymnasium's seeds); Adam ε, learning rate and the
gradient-norm clip > 0 and finite (a negative clip makes torch scale gradients by a negative
factor: training would ascend the loss); the ε ladder's base in (0, 1] and exponent range ≥ 0
(Ape-X Sec. 4.1: ε_i = base^(1 + α·i/(N−1)) must stay a probability); priority and
importance-sampling exponents in [0, 1] (R2D2 Sec. 2.3); an overlap below the sequence length;
learning that starts within the run; networks whose weights, target copy and Adam moments fit
half the available memory (``limits.available_memory``: MemAvailable or a cgroup limit); an
experiment name that stays inside ``runs/``; ``--track`` with wandb installed and
``--capture-video`` with ``--save-model`` (``tracking.check_tracking``); output folders (``runs/``, ``saved_models/``,
``saved_checkpoints/``) that are folders and can be written.
"""

from __future__ import annotations

import math
import os
import re

from r2d2_algo.limits import available_memory, size
from r2d2_algo.tracking import check_tracking

SEED_LIMIT = 2**32
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+-]*")


def flag(name: str) -> str:
    """The command-line flag of an ``Args`` field: ``max_grad_norm`` -> ``--max-grad-norm``."""
    return "--" + name.replace("_", "-")


def check_name(value: str, name: str = "exp_name") -> None:
    """A name that becomes part of a folder name: letters, digits and ``_.,=+-``, not starting with
    a dot, so that ``runs/{...}`` stays inside ``runs/``."""
    if not NAME_PATTERN.fullmatch(value or ""):
        raise ValueError(f"{flag(name)} must be letters, digits and _.,=+- (not starting with . or -), "
                         f"got {value!r}")


def network_bytes(hidden_size: int, torso_size: int, head_hidden_size: int, rnn_type: str = "lstm") -> int:
    """A lower bound of the learner's memory for its networks: online and target weights and
    Adam's two moments (4 float32 copies) of the core, the torso's second layer and the heads."""
    gates = {"lstm": 4, "gru": 3}.get(rnn_type, 0)
    core = gates * hidden_size * (hidden_size + torso_size) if gates else hidden_size * torso_size
    parameters = core + torso_size * torso_size + 2 * hidden_size * head_hidden_size
    return 16 * parameters


def check_common_args(args) -> None:
    """Refuse, with one ValueError line naming the flag, the shared arguments out of range (see
    the module docstring). Fields a script does not have are skipped."""
    has = lambda name: hasattr(args, name)  # noqa: E731

    if has("exp_name"):
        check_name(args.exp_name)
    if has("seed") and not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    for name in ["learning_rate", "adam_eps", "max_grad_norm"]:
        if has(name) and not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ValueError(f"{flag(name)} must be > 0 and finite, got {getattr(args, name)}")
    if has("epsilon_base") and not 0.0 < args.epsilon_base <= 1.0:
        raise ValueError(f"--epsilon-base must be in (0, 1] (ε_i = base^(1 + alpha·i/(N−1)) is a probability), "
                         f"got {args.epsilon_base}")
    if has("epsilon_alpha") and not (math.isfinite(args.epsilon_alpha) and args.epsilon_alpha >= 0):
        raise ValueError(f"--epsilon-alpha must be >= 0 and finite, got {args.epsilon_alpha}")
    for name in ["priority_exponent", "importance_sampling_exponent"]:
        if has(name) and not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"{flag(name)} must be in [0, 1], got {getattr(args, name)}")
    if has("overlap") and has("sequence_length") and not 0 <= args.overlap < args.sequence_length:
        raise ValueError(f"--overlap must be in [0, --sequence-length={args.sequence_length}), got {args.overlap}")
    if has("learning_starts") and has("total_timesteps") and args.learning_starts >= args.total_timesteps:
        raise ValueError(f"--learning-starts ({args.learning_starts:,}) must be below --total-timesteps "
                         f"({args.total_timesteps:,}): the run would end untrained")
    if has("hidden_size") and min(args.hidden_size, args.torso_size, args.head_hidden_size) >= 1:
        need = network_bytes(args.hidden_size, args.torso_size, args.head_hidden_size, args.rnn_type)
        free, where = available_memory()
        if need > 0.5 * free:
            raise ValueError(f"--hidden-size {args.hidden_size}, --torso-size {args.torso_size} and "
                             f"--head-hidden-size {args.head_hidden_size} need at least {size(need)} of memory for "
                             f"the networks and Adam (4 float32 copies of the weights), more than half of the "
                             f"{size(free)} available ({where})")
    check_tracking(args)  # --track needs wandb; --capture-video the saved model's evaluation
    check_writable("runs")  # the folders the run will write, relative to the working directory
    if getattr(args, "save_model", False):
        check_writable("saved_models")
    if getattr(args, "checkpoint_interval", 0) > 0:
        check_writable("saved_checkpoints")


def check_writable(folder: str) -> None:
    """Refuse, with one ValueError line naming ``folder`` and the reason, an output folder that is
    not a folder or cannot be written (checked before anything is created; a missing folder is
    fine when the folder that would hold it can be written)."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"cannot write in {folder}/: a file of that name is in the way")
    target = folder if os.path.isdir(folder) else (os.path.dirname(os.path.abspath(folder)) or ".")
    while not os.path.isdir(target):  # the nearest folder that exists
        if os.path.lexists(target):
            raise ValueError(f"cannot write in {folder}/: {target} is not a folder")
        target = os.path.dirname(target)
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {folder}/: {target} is not writable (permission denied)")
    stat = os.statvfs(target)
    if stat.f_flag & os.ST_RDONLY:
        raise ValueError(f"cannot write in {folder}/: {target} is on a read-only file system")
