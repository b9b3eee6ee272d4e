"""Observation spaces R2D2 can encode, and env construction that never ends in a traceback.

Unit tests of ``envs.adapt_observation`` on one tiny env per space kind (tests/helpers/space_envs.py),
then every kind end to end in r2d2.py and each layout they become in r2d2_mp.py, and the
one-line errors: an env that takes no ``render_mode``, a constructor that raises, a first reset
that raises, a space with nothing to encode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

import space_envs  # noqa: E402,F401  (registers the ids)

from r2d2_algo.envs import UnsupportedEnvError, check_env_id, make_env, make_vector_env  # noqa: E402
from r2d2_algo.model import NatureTorso, RNNQNetwork, SmallImageTorso  # noqa: E402

# kind -> (adapted shape, dtype)
EXPECTED = {
    "discrete": ((3,), np.uint8),
    "multidiscrete": ((7,), np.uint8),
    "multibinary": ((5,), np.uint8),
    "tuple": ((5,), np.float32),
    "dict": ((3 * 3 * 2 + 4,), np.uint8),  # mission (Text) dropped; direction one-hot after the image (sorted keys)
    "boolvector": ((6,), np.uint8),
    "boolimage": ((6, 6, 2), np.uint8),
    "intvector": ((4,), np.uint8),
    "float64vector": ((3,), np.float32),
    "matrix": ((12,), np.float32),
}
HELPERS = {"PYTHONPATH": str(ROOT / "tests" / "helpers")}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_adapted_space_and_observations(kind):
    env_id = f"space_envs:Space-{kind}-v0"
    space, n_actions = check_env_id(env_id, quiet=True)
    shape, dtype = EXPECTED[kind]
    assert isinstance(space, gym.spaces.Box) and space.shape == shape and space.dtype == dtype and n_actions == 2
    envs = make_vector_env(env_id, 2, seed=0)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, *shape) and obs.dtype == dtype
    for _ in range(3):
        obs = envs.step(np.zeros(2, dtype=np.int64))[0]
        assert obs.shape == (2, *shape) and obs.dtype == dtype and all(space.contains(o) for o in obs)
    envs.close()


def test_encodings_are_exact():
    """One-hots at the right places, bools as 0/1, Dict parts in gymnasium's (sorted key) order."""
    def first(kind, seed):
        env = make_env(f"space_envs:Space-{kind}-v0")
        obs, _ = env.reset(seed=seed)
        return obs, env.unwrapped.bit

    obs, bit = first("discrete", 0)
    assert obs.tolist() == [1 if i == 1 + bit else 0 for i in range(3)]
    obs, bit = first("multidiscrete", 0)
    assert obs[:3].tolist() == [1 if i == 1 + bit else 0 for i in range(3)] and obs[3:].sum() == 1
    obs, bit = first("dict", 1)
    direction, image = obs[:4], obs[4:]  # keys sorted: direction, image
    assert direction.tolist() == [1 if i == 1 + bit else 0 for i in range(4)]
    assert image[0] == bit and image[-1] == 1 and image[1:-1].sum() == 0
    obs, bit = first("boolimage", 0)
    assert obs[0, 0, 0] == bit and obs[-1, -1, -1] == 1 and obs.max() <= 1


def test_small_images_get_the_small_conv_torso():
    assert isinstance(RNNQNetwork(gym.spaces.Box(0, 1, (10, 10, 4), np.uint8), 3).torso, SmallImageTorso)
    assert isinstance(RNNQNetwork(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), 3).torso, NatureTorso)
    net = RNNQNetwork(gym.spaces.Box(0, 1, (10, 10, 4), np.uint8), 3, hidden_size=16, torso_size=16,
                      head_hidden_size=16)
    q, _ = net(torch_zeros((2, 5, 10, 10, 4)), torch_full((2, 5), -1), torch_full((2, 5), 0.0),
               torch_full((2, 5), True), net.initial_state(5))
    assert q.shape == (2, 5, 3)


def torch_zeros(shape):
    import torch

    return torch.zeros(shape, dtype=torch.uint8)


def torch_full(shape, value):
    import torch

    return torch.full(shape, value)


@pytest.mark.parametrize("env_id, message", [
    ("space_envs:RaisingConstructor-v0", "'space_envs:RaisingConstructor-v0' failed to build: RuntimeError: "
                                         "no licence file found for the simulator"),
    ("space_envs:RaisingReset-v0", "'space_envs:RaisingReset-v0' failed on its first reset: ValueError: level file"),
    ("space_envs:Space-text-v0", "its Text observation has no part R2D2 can encode"),
])
def test_env_errors_are_one_line(env_id, message):
    with pytest.raises(UnsupportedEnvError, match=message.replace("(", r"\(")):
        check_env_id(env_id, quiet=True)


def test_env_without_render_mode_builds_and_refuses_to_render():
    space, _ = check_env_id("space_envs:NoRenderMode-v0", quiet=True)
    assert space.shape == (6,)
    with pytest.raises(UnsupportedEnvError, match="cannot render"):
        make_env("space_envs:NoRenderMode-v0", render_mode="rgb_array")


TINY = ["--hidden-size", "16", "--torso-size", "16", "--head-hidden-size", "16", "--burn-in-length", "2",
        "--sequence-length", "8", "--overlap", "4", "--batch-size", "8", "--buffer-size", "4000",
        "--learning-starts", "200", "--total-timesteps", "400", "--eval-episodes", "2", "--exp-name", "spaces"]


# r2d2.py's runs of every kind in one process (its imports, 2-3 s of a 4-s run, once), each run as
# `python r2d2.py FLAGS` would do it: its exit code and what it printed
R2D2_RUNS = """
import contextlib, io, json, sys, traceback
import tyro
from r2d2_algo import r2d2
results = {}
for kind, argv in json.loads(sys.argv[1]).items():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            code = r2d2.main(tyro.cli(r2d2.Args, args=argv), argv)
        except BaseException:
            code = traceback.format_exc()
    results[kind] = [code, printed.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def r2d2_runs(tmp_path_factory):
    argv = {kind: ["--env-id", f"space_envs:Space-{kind}-v0", *TINY, "--num-envs", "4"] for kind in EXPECTED}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests' / 'helpers'}")
    proc = subprocess.run([sys.executable, "-c", R2D2_RUNS, json.dumps(argv)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path_factory.mktemp("r2d2_spaces"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_every_space_kind_runs_end_to_end_in_r2d2(kind, r2d2_runs):
    code, printed = r2d2_runs[kind]
    assert code == 0, printed[-3000:]
    assert "eval return" in printed


# what r2d2_mp.py's shared replay holds is what envs.py makes of a kind (the same code as r2d2.py's
# above): a uint8 vector, a float32 vector, a uint8 image, or a uint8 vector of several parts
@pytest.mark.parametrize("kind", ["discrete", "tuple", "boolimage", "dict"])
def test_every_space_layout_runs_end_to_end_in_r2d2_mp(kind, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", **HELPERS)
    proc = subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / "r2d2_mp.py"), "--env-id",
                           f"space_envs:Space-{kind}-v0", *TINY, "--num-actors", "1", "--num-envs-per-actor", "4",
                           "--log-interval", "200"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval return" in proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["r2d2.py", "r2d2_mp.py"])
@pytest.mark.parametrize("env_id, message", [
    ("space_envs:RaisingConstructor-v0", "failed to build: RuntimeError: no licence file"),
    ("space_envs:RaisingReset-v0", "failed on its first reset: ValueError: level file missing"),
    ("space_envs:Space-text-v0", "has no part R2D2 can encode"),
])
def test_scripts_refuse_bad_envs_in_one_line(script, env_id, message, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", **HELPERS)
    proc = subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / script), "--env-id", env_id], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    lines = [line for line in proc.stderr.strip().splitlines() if "A.L.E" not in line and "Stella" not in line]
    assert proc.returncode != 0 and message in proc.stderr and len(lines) == 1, proc.stderr
