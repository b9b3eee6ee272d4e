"""Presets: default arguments per task family, so that one command with only ``--env-id`` runs
with settings that suit the task (R2D2's one setting for all Atari games does not fit CartPole).

A preset is a YAML file in ``experiment_configs/presets/`` (``atari``, ``vector``,
``small_image``, and ``atari_fast``, only by name: Atari in few env steps): ``args`` for every script, and ``scripts: {r2d2_mp.py: {...}}`` for one script
only (fields another script does not have are skipped). ``--preset auto`` (the default) picks
by the env's family: ``atari`` for ale-py ids, ``small_image`` for observations that are images
under 36 pixels a side, ``vector`` for every other observation (after ``envs.adapt_observation``);
``--preset none`` keeps the script's own defaults. Flags given on the command line always win,
and a resumed run keeps its checkpoint's arguments. The run prints every value the preset set.
"""

from __future__ import annotations

import dataclasses
import os

import yaml

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiment_configs", "presets")
PRESETS = ("atari", "atari_fast", "vector", "small_image")


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
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of auto, none, {', '.join(PRESETS)}; got {name!r}")
    if not os.path.exists(path):
        raise ValueError(f"preset {name!r} needs {path}, which is missing (the presets are files of the "
                         f"repository, not of the installed package); or give --preset none")
    with open(path) as f:
        preset = yaml.safe_load(f)
    if not isinstance(preset, dict) or not isinstance(preset.get("args"), dict):
        raise ValueError(f"{path} is not a preset (it needs an `args:` mapping)")
    return {**preset["args"], **(preset.get("scripts") or {}).get(script, {})}


def apply_preset(args, argv: list[str] | None, script: str):
    """``args`` (parsed from ``argv`` over the script's own defaults) with the preset's values
    wherever ``argv`` gave no flag, and prints a line naming the preset and every value it set.
    Returns ``args`` unchanged for ``--preset none``, a resumed run, or ``argv`` None (arguments
    built in code, not parsed from a command line, are used as they are). A preset value that does
    not fit a flag the user gave is adjusted (min replay ratio above the replay ratio, overlap
    not below the sequence length) and said so.

    Raises:
        ValueError: unknown preset; UnsupportedEnvError (a ValueError): the env id, for ``auto``.
    """
    import tyro

    if argv is None or getattr(args, "resume", None) or args.preset == "none":
        return args
    name, why = args.preset, "--preset"
    if name == "auto":
        name, why = env_family(args.env_id, getattr(args, "env_kwargs", ())), "auto, by env family"
    fields = {f.name for f in dataclasses.fields(args)}
    values = {k: v for k, v in preset_values(name, script).items() if k in fields}
    defaults = type(args)()
    with_preset = tyro.cli(type(args), args=argv, default=dataclasses.replace(defaults, **values))
    # a field the command line gave has the same value under both defaults
    set_here = {k: v for k, v in values.items() if getattr(with_preset, k) != getattr(args, k)}
    adjusted = []
    if "min_replay_ratio" in set_here and with_preset.min_replay_ratio > with_preset.replay_ratio:
        set_here["min_replay_ratio"] = with_preset.replay_ratio / 2
        adjusted.append("min_replay_ratio (half the --replay-ratio given)")
    if "learning_starts" in set_here and with_preset.learning_starts >= with_preset.total_timesteps:
        set_here["learning_starts"] = with_preset.total_timesteps // 10
        adjusted.append("learning_starts (a tenth of the --total-timesteps given)")
    if "overlap" in set_here and with_preset.overlap >= with_preset.sequence_length:
        set_here["overlap"] = with_preset.sequence_length // 2
        adjusted.append("overlap (half the --sequence-length given)")
    args = dataclasses.replace(args, **set_here)
    listed = ", ".join(f"{k}={v}" for k, v in set_here.items()) or "nothing beyond the script's defaults"
    message = f"preset {name} ({why}; --preset none for the script's defaults): {listed}"
    if adjusted:
        message += f"; adjusted to fit your flags: {', '.join(adjusted)}"
    print(message, flush=True)
    return args
