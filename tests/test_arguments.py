"""arguments.resolve_args (CPU): one function resolves every script's arguments (defaults, then
the preset, the command line, the checkpoint), returns where each value came from, and the
scripts write that beside args.json; the presets are part of the installed package."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tyro

from r2d2_algo import r2d2_mp
from r2d2_algo.arguments import PRESET_DIR, PRESETS, RESUMABLE_ARGS, given_flags, resolve_args

ROOT = Path(__file__).resolve().parents[1]


def resolve(argv: list[str]):
    return resolve_args(tyro.cli(r2d2_mp.Args, args=argv), argv, "r2d2_mp.py")


def test_each_value_says_where_it_came_from(capsys):
    args, checkpoint, sources = resolve(["--env-id", "CartPole-v1", "--seed", "3", "--no-cuda", "--batch-size=8"])
    assert checkpoint is None and args.seed == 3 and args.batch_size == 8 and not args.cuda
    assert sources["seed"] == sources["cuda"] == sources["batch_size"] == sources["env_id"] == "command line"
    assert args.hidden_size == 128 and sources["hidden_size"] == "preset vector"  # auto: CartPole is a vector task
    assert args.min_replay_ratio == 16 and sources["min_replay_ratio"] == "preset vector"  # its r2d2_mp.py part
    assert args.gamma == 0.99 and sources["gamma"] == "preset vector"
    assert sources["max_grad_norm"] == "default" and args.max_grad_norm == r2d2_mp.Args().max_grad_norm
    assert set(sources) == {f for f in vars(args)}
    assert capsys.readouterr().out.startswith("preset vector (auto, by env family;")


def test_a_preset_value_that_clashes_with_a_flag_is_adjusted_and_said():
    args, _, sources = resolve(["--env-id", "CartPole-v1", "--replay-ratio", "8"])
    assert args.min_replay_ratio == 4 and sources["min_replay_ratio"] == "preset vector, adjusted"
    args, _, sources = resolve(["--env-id", "CartPole-v1", "--preset", "none", "--replay-ratio", "8"])
    assert sources["hidden_size"] == "default" and args.hidden_size == r2d2_mp.Args().hidden_size


def test_arguments_built_in_code_are_used_as_they_are():
    args = r2d2_mp.Args(env_id="CartPole-v1", seed=5)
    resolved, checkpoint, sources = resolve_args(args, None, "r2d2_mp.py")
    assert resolved == args and checkpoint is None and set(sources.values()) == {"code"}


def test_flags_are_recognised_in_every_spelling():
    fields = ["env_id", "cuda", "batch_size", "seed"]
    assert given_flags(fields, ["--env-id", "x", "--no-cuda", "--batch_size=3", "seed", "--unknown"]) == {
        "env_id", "cuda", "batch_size"}


def test_resumable_arguments_are_fields_of_some_script():
    from r2d2_algo import r2d2, r2d2_ray

    fields = set().union(*({f for f in vars(m.Args())} for m in (r2d2, r2d2_mp, r2d2_ray)))
    assert set(RESUMABLE_ARGS) <= fields, set(RESUMABLE_ARGS) - fields
    assert not {"seed", "env_id", "learning_rate", "replay_ratio", "buffer_size"} & set(RESUMABLE_ARGS)


def test_a_run_writes_the_sources_beside_its_arguments(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / "r2d2.py"), "--env-id", "CartPole-v1",
                          "--total-timesteps", "300", "--learning-starts", "100", "--eval-episodes", "0",
                          "--num-envs", "2", "--hidden-size", "16", "--no-progress-bar"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    sources = json.loads((run_dir / "args_sources.json").read_text())
    # r2d2.py's own defaults are the vector preset: a value the preset leaves as it was is a default
    assert sources["hidden_size"] == "command line" and sources["torso_size"] == "default"
    assert set(sources) == set(json.loads((run_dir / "args.json").read_text()))


@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_are_in_the_package(name):
    assert (Path(PRESET_DIR) / f"{name}.yaml").is_file() and Path(PRESET_DIR).parent.name == "r2d2_algo"


def test_an_installed_package_carries_its_presets(tmp_path):
    """The wheel pip builds from pyproject.toml holds every preset (an installed r2d2_algo, away
    from this repository, finds them next to arguments.py)."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("r2d2_algo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"r2d2_algo/presets/{name}.yaml" for name in PRESETS} <= set(names)
