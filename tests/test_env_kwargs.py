"""--env-kwargs (CPU): parsed as YAML would read the values, passed to every env a run builds (the
actors', the evaluator's, evaluate.py's, a sweep's), recorded in args.json and the saved model,
and refused in one line when it is malformed or the constructor rejects a key. The env used,
tests/helpers/kwargs_env.py's Countdown-v0, cannot be built without its ``length``, and its
episodes last ``length`` steps with reward 1 per step: a return equal to the length proves that
the env that produced it was built with the argument."""

import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r2d2_algo.envs import UnsupportedEnvError, check_env_id, make_env, make_vector_env, parse_env_kwargs
from r2d2_algo.experiments import ConfigError, write_config
from tests.conftest import script_env

ROOT = Path(__file__).resolve().parents[1]
HELPERS = str(ROOT / "tests" / "helpers")
ENV = "kwargs_env:Countdown-v0"
SMALL = ["--hidden-size", "16", "--torso-size", "16", "--head-hidden-size", "16", "--burn-in-length", "2",
         "--sequence-length", "4", "--overlap", "2", "--batch-size", "8", "--buffer-size", "4000",
         "--learning-starts", "200", "--replay-ratio", "1", "--log-interval", "200", "--eval-episodes", "2",
         "--no-progress-bar", "--total-timesteps", "800", "--save-model"]
PER_SCRIPT = {"r2d2.py": ["--num-envs", "2"], "r2d2_mp.py": ["--num-actors", "1", "--num-envs-per-actor", "2"],
              "r2d2_ray.py": ["--num-actors", "1", "--num-envs-per-actor", "2", "--actor-push-interval", "10"]}


@pytest.fixture(autouse=True)
def helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(HELPERS)


def run(tmp_path, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="rk_", dir="/tmp") as ray_home:  # Ray's sockets: short paths
        env = script_env("cpu", PYTHONPATH=HELPERS, RAY_TMPDIR=ray_home, HOME=ray_home,
                         PYTHONWARNINGS="ignore::DeprecationWarning")
        return subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / script), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout, env=env)


def test_values_are_read_as_yaml_would_read_them():
    assert parse_env_kwargs(["memory_length:30", "p:0.25", "flag:true", "sizes:[1, 2]", "name:hello", "none:null",
                             "{a: 3, b: [x]}", "p:0.5"]) == {"memory_length": 30, "p": 0.5, "flag": True,
                                                             "sizes": [1, 2], "name": "hello", "none": None,
                                                             "a": 3, "b": ["x"]}  # later items win
    assert parse_env_kwargs([]) == {}


@pytest.mark.parametrize("items, message", [
    (["length"], "expected key:value (e.g. memory_length:30) or a mapping"),
    (["{length: [1"], "is not a YAML/JSON mapping"),
    (["{1: 2}"], "is not a mapping of names to values"),
    (["length:7", "lenght:7"], "'kwargs_env:Countdown-v0' takes no argument 'lenght'"),
    (["length:-1"], "failed to build with --env-kwargs length=-1: ValueError: length must be an int >= 1"),
    ([], "failed to build: TypeError: "),  # its constructor needs the argument
])
def test_bad_env_kwargs_are_refused_in_one_line(items, message):
    with pytest.raises(UnsupportedEnvError, match=None) as error:
        make_env(ENV, env_kwargs=tuple(items))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_atari_takes_the_ale_settings_and_refuses_the_rest():
    """Sticky actions (Machado et al. 2018) and the minimal action set reach the single env and
    ale-py's vector env; a key the ALE pipeline does not take is named."""
    env = make_env("PongNoFrameskip-v4", env_kwargs=("repeat_action_probability:0.25", "full_action_space:false"))
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert env.action_space.n == 6  # Pong's minimal set (the paper's default: all 18)
    env.close()
    vec = make_vector_env("PongNoFrameskip-v4", 2, 0, env_kwargs=("full_action_space:false",))
    assert vec.single_action_space.n == 6
    vec.close()
    with pytest.raises(UnsupportedEnvError, match="--env-kwargs obs_type: not taken for Atari ids"):
        make_env("PongNoFrameskip-v4", env_kwargs=("obs_type:rgb",))


@pytest.mark.parametrize("script", ["r2d2.py", "r2d2_mp.py", "r2d2_ray.py"])
def test_every_env_of_a_run_is_built_with_the_env_kwargs(tmp_path, script):
    """Training episodes and greedy evaluations last `length` steps (return = length), the value
    is in args.json and the saved model, and evaluate.py replays the model's env, or another length."""
    out = run(tmp_path, script, "--env-id", ENV, "--env-kwargs", "length:7", *SMALL, *PER_SCRIPT[script])
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert json.load(open(os.path.join(run_dir, "args.json")))["env_kwargs"] == ["length:7"]
    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert {e.value for e in acc.Scalars("charts/episodic_length")} == {7.0}  # the actors' envs
    assert {e.value for e in acc.Scalars("eval/episodic_return")} == {7.0}  # the evaluator's
    (model,) = glob.glob(str(tmp_path / "saved_models" / "*" / "model.pt"))
    assert json.load(open(os.path.join(os.path.dirname(model), "eval.json")))["mean"] == 7.0
    if script != "r2d2.py":
        return
    for extra, expected in (([], 7.0), (["--env-kwargs", "length:3"], 3.0)):
        replay = run(tmp_path, "evaluate.py", "--model", model, "--episodes", "2", *extra)
        assert replay.returncode == 0, replay.stderr[-2000:]
        assert json.load(open(os.path.join(os.path.dirname(model), "evaluate.json")))["mean"] == expected


def test_a_rejected_key_stops_the_script_before_it_starts(tmp_path):
    out = run(tmp_path, "r2d2_mp.py", "--env-id", ENV, "--env-kwargs", "length:7", "size:3", *SMALL)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "r2d2_mp.py: error: --env-kwargs: 'kwargs_env:Countdown-v0' takes no argument 'size' (it was given length, "
        "size)"], out.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_a_sweep_passes_a_mapping_and_checks_it(tmp_path):
    runs = write_config(tmp_path / "countdown.yaml", "r2d2_algo/r2d2.py", args={"env_id": ENV},
                        grid={"env_kwargs": [{"length": 5}, {"length": 9}]}, root=ROOT)
    assert [r.run_id for r in runs] == ["countdown-env_kwargs=length=5__1", "countdown-env_kwargs=length=9__1"]
    argv = list(runs[1].argv)
    assert argv[argv.index("--env-kwargs") + 1] == "length:9"
    with pytest.raises(ConfigError, match="takes no argument 'lenght'"):
        write_config(tmp_path / "typo.yaml", "r2d2_algo/r2d2.py", args={"env_id": ENV, "env_kwargs": {"lenght": 5}},
                     root=ROOT)
    assert not (tmp_path / "typo.yaml").exists()
    assert check_env_id(ENV, quiet=True, env_kwargs=("length:5",))[0].shape == (1,)
    assert np.isfinite(check_env_id(ENV, quiet=True, env_kwargs=("length:9",))[0].high).all()


def test_a_sweep_through_scheduler_py_builds_each_run_s_envs_with_its_kwargs(tmp_path):
    """scheduler.py runs a grid over env_kwargs with the real r2d2.py: each run's episodes last
    its own `length` (reward 1 per step: the training returns equal it)."""
    (tmp_path / "experiment_configs").mkdir()
    (tmp_path / "experiment_configs" / "countdown.yaml").write_text(
        f"script: {ROOT / 'r2d2_algo' / 'r2d2.py'}\n"
        f"args: {{env_id: '{ENV}', total_timesteps: 600, learning_starts: 200, eval_episodes: 0, num_envs: 2,\n"
        "       progress_bar: false, cuda: false, log_interval: 200, hidden_size: 16, torso_size: 16,\n"
        "       head_hidden_size: 16, burn_in_length: 2, sequence_length: 4, overlap: 2, batch_size: 8,\n"
        "       buffer_size: 4000, replay_ratio: 1}\n"
        "grid: {env_kwargs: [{length: 3}, {length: 6}]}\n")
    env = script_env("cpu", PYTHONPATH=HELPERS)
    out = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--max-parallel", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for length in (3, 6):
        (run_dir,) = glob.glob(str(tmp_path / "runs" / f"*countdown-env_kwargs=length={length}__1__*"))
        acc = EventAccumulator(run_dir)
        acc.Reload()
        assert {e.value for e in acc.Scalars("charts/episodic_return")} == {float(length)}
