"""Every way a run can end leaves nothing behind: a hangup (SIGHUP to the main process or to its
process group: a closed terminal, a dropped ssh connection), the controlling terminal itself
going away, SIGTERM to evaluate.py, and the learner killed with SIGKILL (the OOM killer).

Each test checks what the README promises: the documented exit code (129 for a hangup, 143 for
SIGTERM), the final checkpoint when checkpoints are on, no traceback, no process of the run left,
and /dev/shm as it was before the run (the replay's segments and multiprocessing's semaphores).
"""

import glob
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, script_env

SMALL = ["--env-id", "CartPole-v1", "--num-actors", "2", "--num-envs-per-actor", "2", "--hidden-size", "32",
         "--torso-size", "32", "--head-hidden-size", "32", "--burn-in-length", "4", "--sequence-length", "8",
         "--overlap", "4", "--batch-size", "16", "--buffer-size", "20000", "--learning-starts", "1000",
         "--replay-ratio", "4", "--log-interval", "500", "--total-timesteps", "10000000", "--no-progress-bar"]
TAKE_TERMINAL = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"


def session_processes(session: int) -> list[int]:
    """Live processes of a session (a run started in its own session: it and everything it started)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() not in (psutil.STATUS_ZOMBIE,
                                                                               psutil.STATUS_DEAD):
                found.append(process.pid)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return found


def assert_nothing_left(session: int, shm_before: set[str], timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while (session_processes(session) or set(os.listdir("/dev/shm")) - shm_before) and time.time() < deadline:
        time.sleep(0.2)
    assert not session_processes(session), f"processes left: {session_processes(session)}"
    assert not set(os.listdir("/dev/shm")) - shm_before, f"/dev/shm left: {set(os.listdir('/dev/shm')) - shm_before}"


def start(tmp_path: Path, script: str, *args: str) -> subprocess.Popen:
    """The script in a session of its own (a job started from a terminal), output to pipes."""
    return subprocess.Popen([sys.executable, str(ROOT / "r2d2_algo" / script), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env("cpu"),
                            start_new_session=True)


def read_until(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "".join(lines) + proc.stderr.read()
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError("".join(lines))


@pytest.mark.parametrize("target, inference", [("group", "local"), ("main", "central")])
def test_r2d2_mp_hangup_stops_like_sigterm(tmp_path, target, inference):
    """SIGHUP to the whole process group (what a shell sends its jobs when its terminal closes) or
    to the main process alone: the final checkpoint, exit 129, nothing left. Before, the group's
    SIGHUP killed every process, multiprocessing's resource tracker included, and the replay's
    segments and the semaphores stayed in /dev/shm."""
    shm_before = set(os.listdir("/dev/shm"))
    proc = start(tmp_path, "r2d2_mp.py", *SMALL, "--inference", inference, "--checkpoint-interval", "100000000")
    read_until(proc, "updates")
    time.sleep(1.0)
    (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 129, err
    assert "stopping at step" in err and "SIGHUP" in err and "Traceback" not in err, err
    assert "checkpoint written" in out and glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))
    assert_nothing_left(proc.pid, shm_before)


@pytest.mark.parametrize("script", ["r2d2_mp.py", "scheduler.py"])
def test_the_controlling_terminal_closing_stops_the_run_cleanly(tmp_path, script):
    """The run is the session leader of a pseudo-terminal (ssh -t, a terminal window) whose other
    end then closes: the kernel sends it SIGHUP, and every later write to the terminal fails with
    EIO. It writes its final checkpoint and exits 129 with nothing left; the scheduler stops its
    runs and exits 129. Before, r2d2_mp.py died of the signal and left /dev/shm full."""
    import shutil

    shm_before = set(os.listdir("/dev/shm"))
    if script == "scheduler.py":
        shutil.copy(ROOT / "tests" / "helpers" / "fake_train.py", tmp_path / "fake_train.py")
        (tmp_path / "experiment_configs").mkdir()
        (tmp_path / "experiment_configs" / "sweep.yaml").write_text(
            "script: fake_train.py\nseeds: 2\nargs: {total_timesteps: 100000, step_seconds: 0.5, progress-bar: false}\n")
        command, ready = [str(ROOT / "scheduler.py"), "--max-parallel", "2", "--no-progress-bar"], b"2 slots"
    else:
        command = [str(ROOT / "r2d2_algo" / script), *SMALL, "--checkpoint-interval", "100000000"]
        ready = b"updates"
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", TAKE_TERMINAL, sys.executable, *command], cwd=tmp_path,
                            stdin=slave, stdout=slave, stderr=slave, env=script_env("cpu"), start_new_session=True)
    os.close(slave)
    seen, deadline = b"", time.time() + 120
    while ready not in seen and time.time() < deadline and proc.poll() is None:
        if select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 1 << 16)
    assert ready in seen, seen.decode(errors="replace")
    time.sleep(2.0)
    os.close(master)  # the terminal goes away
    assert proc.wait(timeout=60) == 129
    assert_nothing_left(proc.pid, shm_before)
    if script == "r2d2_mp.py":
        assert glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))  # written after the hangup
    else:  # the runs, each in a session of its own, were stopped and recorded as interrupted
        from r2d2_algo.experiments import read_records
        from r2d2_algo.processes import pid_alive

        runs = read_records(tmp_path / "runs")
        assert len(runs) == 2 and all(r["state"] == "interrupted" for r in runs), runs
        assert not any(pid_alive(r["pid"], r["pid_start_time"]) for r in runs)


def test_r2d2_hangup_writes_the_final_checkpoint(tmp_path):
    proc = start(tmp_path, "r2d2.py", "--env-id", "CartPole-v1", "--total-timesteps", "10000000",
                 "--checkpoint-interval", "100000000", "--learning-starts", "500", "--log-interval", "200")
    read_until(proc, "run ")  # its stop handlers are in place
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 129, err
    assert "checkpoint written" in out and "Traceback" not in err, err


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_evaluate_stops_on_sigterm_and_sighup_in_one_line_without_results(tmp_path, stop_signal):
    import gymnasium as gym
    import numpy as np

    from r2d2_algo.checkpoint import save_model
    from r2d2_algo.model import RNNQNetwork
    from r2d2_algo.r2d2 import Args

    space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    args = Args(env_id="CartPole-v1", hidden_size=8, torso_size=8, head_hidden_size=8)
    save_model(str(tmp_path / "model.pt"), RNNQNetwork(space, 2, "lstm", 8, 8, 8), args, space, 2)
    proc = start(tmp_path, "evaluate.py", "--model", str(tmp_path / "model.pt"), "--episodes", "100000",
                 "--no-cuda", "--output", str(tmp_path / "eval.json"))
    time.sleep(6.0)  # past its imports, where its handlers are installed
    os.kill(proc.pid, stop_signal)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + stop_signal
    assert err.strip() == f"evaluate.py: stopped by {signal.Signals(stop_signal).name}; no results written", err
    assert not (tmp_path / "eval.json").exists()
