"""A table of bad inputs across the four entry points (r2d2.py, r2d2_mp.py, r2d2_ray.py with
evaluate.py, scheduler.py): each is refused before anything starts, with one line naming the flag
(or path) and a non-zero exit, and leaves nothing behind (no run folder, no /dev/shm entry, no
child process).

The training scripts' cases run ``main`` in this process (fast: no interpreter start per case),
with whatever would start the run replaced by a tripwire, so that a case the script wrongly
accepts fails at once instead of training; a few cases per script run the real command line
as a subprocess, for the exit code and the stderr line itself."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "r2d2_algo"))

import r2d2 as r2d2_script  # noqa: E402
import r2d2_mp  # noqa: E402
import r2d2_ray  # noqa: E402

import scheduler  # noqa: E402
from r2d2_algo import evaluate  # noqa: E402
from r2d2_algo.checkpoint import CHECKPOINT_FORMAT, atomic_save, save_model  # noqa: E402
from r2d2_algo.model import RNNQNetwork  # noqa: E402

SCRIPTS = {"r2d2.py": r2d2_script, "r2d2_mp.py": r2d2_mp, "r2d2_ray.py": r2d2_ray}

# (argv, words the error line must hold), for every training script; CartPole unless the case names an env
COMMON = [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be > 0 and finite"),
    (["--epsilon-base", "5"], "--epsilon-base must be in (0, 1]"),
    (["--epsilon-base", "-1"], "--epsilon-base must be in (0, 1]"),
    (["--epsilon-base", "0"], "--epsilon-base must be in (0, 1]"),
    (["--epsilon-alpha", "-1"], "--epsilon-alpha must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", "99999999999"], "--seed must be in [0, 2**32)"),
    (["--adam-eps", "-1"], "--adam-eps must be > 0"),
    (["--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--hidden-size", "100000"], "need at least"),
    (["--exp-name", "../../../tmp/x"], "--exp-name must be letters, digits"),
    (["--exp-name", ".hidden"], "--exp-name must be letters, digits"),
    (["--learning-starts", "5000", "--total-timesteps", "1000"], "the run would end untrained"),
    (["--sequence-length", "8", "--overlap", "8"], "--overlap must be in [0, --sequence-length=8)"),
    (["--priority-exponent", "2"], "--priority-exponent must be in [0, 1]"),
    (["--importance-sampling-exponent", "-0.1"], "--importance-sampling-exponent must be in [0, 1]"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--priority-eta", "1.5"], "--priority-eta must be in [0, 1]"),
    (["--eval-epsilon", "2"], "--eval-epsilon must be in [0, 1]"),
    (["--buffer-size", "10"], "smaller than one window of --burn-in-length + --sequence-length + --n-step"),
    (["--env-id", "NoSuchEnv-v0"], "unknown environment id 'NoSuchEnv-v0'"),
    (["--env-id", "Pendulum-v1"], "R2D2 needs Discrete actions"),
    (["--env-id", "no_such_module:CartPole-v1"], "cannot import module 'no_such_module'"),
    (["--resume", "no/such/checkpoint.pt"], "no/such/checkpoint.pt"),
]
SPECIFIC = {
    "r2d2.py": [(["--num-envs", "0"], "--num-envs must be >= 1"),
                (["--buffer-size", "100000000000"], "lower --buffer-size")],
    "r2d2_mp.py": [(["--num-actors", "0"], "--num-actors must be >= 1"),
                   (["--log-interval", "0"], "--log-interval must be >= 1"),
                   (["--replay-ratio", "0.4", "--min-replay-ratio", "2"], "--min-replay-ratio must be in [0, "),
                   (["--buffer-size", "100000000000"], "lower --buffer-size")],
    "r2d2_ray.py": [(["--num-replay-shards", "3", "--num-actors", "2"], "--num-replay-shards (3) must be <= "),
                    (["--ray-address", "nonsense"], "expected HOST:PORT or auto"),
                    (["--ray-plasma-directory", "/no/such/folder"], "--ray-plasma-directory '/no/such/folder' is not a "
                                                                   "writable folder"),
                    (["--role-nodes", "shard=10.0.0.5"], "--role-nodes: 'shard=10.0.0.5' is not ROLE=NODE_IP"),
                    (["--num-actors", "2", "--role-nodes", "actor-2=10.0.0.5"], "actor-0..1")],
}
CASES = [(script, argv, words) for script in SCRIPTS for argv, words in COMMON + SPECIFIC[script]]


class Started(Exception):
    """Raised where the run would start: the case was not refused."""


def tripwire(*args, **kwargs):
    raise Started("the run started: the bad input was accepted")


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """Run in tmp_path with the run's starts replaced by tripwires; after the case, nothing new in
    /dev/shm, no child process, no run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(r2d2_script, "make_vector_env", tripwire)
    monkeypatch.setattr(r2d2_mp, "Processes", tripwire)
    monkeypatch.setattr(r2d2_ray, "ray_session", tripwire)
    before = set(os.listdir("/dev/shm"))
    yield tmp_path
    assert set(os.listdir("/dev/shm")) <= before, "a /dev/shm entry left behind"
    assert not [d for d in os.listdir(tmp_path) if d in ("runs", "saved_models", "saved_checkpoints")]
    import multiprocessing

    assert not multiprocessing.active_children()


def refusal(script: str, argv: list[str]) -> str:
    """The one-line error of ``script`` for ``argv`` (parsed by tyro, then its main)."""
    module = SCRIPTS[script]
    argv = (["--env-id", "CartPole-v1"] if "--env-id" not in argv else []) + argv
    with pytest.raises(SystemExit) as info:
        module.main(tyro.cli(module.Args, args=argv), argv)
    message = str(info.value.code)
    assert info.value.code not in (0, None) and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("script, argv, words", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_training_script_refuses(clean, script, argv, words, capsys):
    message = refusal(script, argv)
    assert message.startswith(f"{script}: error: ") and words in message, message


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("what", ["file", "readonly"])
def test_unwritable_runs_folder(clean, script, what, monkeypatch):
    if what == "file":
        (clean / "runs").write_text("")
        words = "cannot write in runs/: a file of that name is in the way"
    else:
        import r2d2_algo.checks as checks

        real_access = os.access
        monkeypatch.setattr(checks.os, "access", lambda p, mode: False if os.path.abspath(p) == str(clean)
                            else real_access(p, mode))
        words = "is not writable"
    message = refusal(script, [])
    assert words in message, message
    if what == "file":
        (clean / "runs").unlink()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_to_a_reached_total_is_refused(clean, script):
    """A checkpoint at step 5,000 resumed with --total-timesteps 1,000: once exit 0 having done nothing."""
    module = SCRIPTS[script]
    path = clean / "ckpt.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "run_name": "x", "args": vars(module.Args(env_id="CartPole-v1")),
                 "progress": {"global_step": 5000}}, str(path))
    message = refusal(script, ["--resume", str(path), "--total-timesteps", "1000"])
    assert "--total-timesteps 1,000 is not beyond the checkpoint's step 5,000" in message, message
    path.unlink()


@pytest.fixture
def model(tmp_path):
    space = gym.spaces.Box(-5, 5, (4,), dtype="float32")
    net = RNNQNetwork(space, 2, hidden_size=8, torso_size=8, head_hidden_size=8)
    path = tmp_path / "saved_models" / "run" / "model.pt"
    save_model(str(path), net, dataclasses.replace(r2d2_script.Args(), hidden_size=8, torso_size=8, head_hidden_size=8),
               space, 2)
    return path


@pytest.mark.parametrize("argv, words", [
    (["--epsilon", "2"], "--epsilon must be in [0, 1]"),
    (["--epsilon", "-1"], "--epsilon must be in [0, 1]"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--episodes", "0"], "--episodes must be >= 1"),
    (["--output", "."], "is a folder; name a JSON file"),
    (["--env-id", "NoSuchEnv-v0"], "unknown environment id"),
])
def test_evaluate_refuses(model, argv, words):
    with pytest.raises(SystemExit) as info:
        evaluate.main(tyro.cli(evaluate.Args, args=["--model", str(model), "--no-cuda", *argv]))
    message = str(info.value.code)
    assert message.startswith("evaluate.py: error: ") and words in message and "\n" not in message, message
    assert not (model.parent / "eval.json").exists() and not (model.parent / "evaluate.json").exists()


def test_evaluate_missing_model_and_unwritable_output(tmp_path, model):
    with pytest.raises(SystemExit) as info:
        evaluate.main(tyro.cli(evaluate.Args, args=["--model", str(tmp_path / "none.pt")]))
    assert "evaluate.py: error: " in str(info.value.code) and "none.pt" in str(info.value.code)
    (tmp_path / "blocker").write_text("")
    with pytest.raises(SystemExit) as info:
        evaluate.main(tyro.cli(evaluate.Args, args=["--model", str(model), "--episodes", "1", "--no-cuda",
                                                    "--output", str(tmp_path / "blocker" / "x.json")]))
    assert "evaluate.py: error: cannot write" in str(info.value.code), info.value.code


def test_evaluate_keeps_the_runs_own_evaluation(model):
    """evaluate.py's default output is evaluate.json: the training run's eval.json is not replaced."""
    (model.parent / "eval.json").write_text('{"mean": 123}')
    evaluate.main(tyro.cli(evaluate.Args, args=["--model", str(model), "--episodes", "1", "--no-cuda"]))
    assert (model.parent / "eval.json").read_text() == '{"mean": 123}' and (model.parent / "evaluate.json").exists()


SCHEDULER_FLAGS = [
    (["--poll-interval", "0"], "--poll-interval must be >= 0.01"),
    (["--poll-interval", "-1"], "--poll-interval must be >= 0.01"),
    (["--status-interval", "-1"], "--status-interval must be > 0"),
    (["--kill-timeout", "-1"], "--kill-timeout must be >= 0"),
    (["--max-parallel", "0"], "--max-parallel must be >= 1"),
]
SCHEDULER_CONFIGS = [
    ("grid:\n  sequence_length,overlap: [[8, 8]]\n", "--overlap must be in [0, --sequence-length=8)"),
    ("args: {env_id: NoSuchEnv-v0}\n", "--env-id: unknown environment id 'NoSuchEnv-v0'"),
    ("args: {max_grad_norm: -1}\n", "--max-grad-norm must be > 0"),
    ("args: {epsilon_base: 5}\n", "--epsilon-base must be in (0, 1]"),
    ("args: {exp_name_typo: 1}\n", "exp_name_typo"),
]


def run_scheduler(tmp_path, capsys, argv):
    code = scheduler.main(tyro.cli(scheduler.Args, args=argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, words", SCHEDULER_FLAGS)
def test_scheduler_flags_refused(clean, capsys, argv, words):
    (clean / "c.yaml").write_text("script: r2d2_algo/r2d2.py\n")
    code, err = run_scheduler(clean, capsys, [str(clean / "c.yaml"), "--dry-run", *argv])
    assert code != 0 and err.startswith("scheduler.py: error: ") and words in err and "\n" not in err, err


@pytest.mark.parametrize("body, words", SCHEDULER_CONFIGS)
@pytest.mark.parametrize("dry_run", [True, False])
def test_scheduler_validates_every_run_first(clean, capsys, body, words, dry_run, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configuration's script path is relative to the repository
    config = clean / "c.yaml"
    config.write_text(f"script: r2d2_algo/r2d2.py\n{body}")
    monkeypatch.setattr(scheduler.subprocess, "Popen", tripwire)
    code, err = run_scheduler(clean, capsys, [str(config), *(["--dry-run"] if dry_run else [])])
    assert code != 0 and words in err and len(err.splitlines()) == 1, err


def test_scheduler_runs_folder_is_a_file(clean, capsys):
    (clean / "runs").write_text("")
    (clean / "c.yaml").write_text("script: r2d2_algo/r2d2.py\n")
    code, err = run_scheduler(clean, capsys, [str(clean / "c.yaml"), "--dry-run"])
    assert code != 0 and "cannot write in runs/: a file of that name is in the way" in err, err
    (clean / "runs").unlink()


@pytest.mark.parametrize("script, argv", [("r2d2.py", ["--seed", "-1"]), ("r2d2_mp.py", ["--max-grad-norm", "-1"]),
                                          ("r2d2_ray.py", ["--epsilon-base", "5"])])
def test_command_line_exit_code_and_one_stderr_line(tmp_path, script, argv):
    """The real command line: exit 1, exactly one line on stderr, nothing written."""
    proc = subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / script), "--env-id", "CartPole-v1", *argv],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=dict(os.environ, RAY_TMPDIR=str(tmp_path)))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"{script}: error: ")
    assert not (tmp_path / "runs").exists()


def test_full_disk_while_saving_is_one_line(tmp_path, monkeypatch):
    """torch.save failing on a full disk raises RuntimeError("unexpected pos ...") from the OSError:
    atomic_save reports the OS's reason in one line and leaves no partial file."""
    import errno

    from r2d2_algo import checkpoint

    def full_disk(obj, f):
        f.write(b"x" * 10)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from e

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.SaveError) as info:
        atomic_save({"a": torch.zeros(2)}, str(tmp_path / "ckpt.pt"))
    assert str(info.value) == f"cannot write {tmp_path / 'ckpt.pt'}: No space left on device"
    assert os.listdir(tmp_path) == []
