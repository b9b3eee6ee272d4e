"""r2d2_ray.py on a loopback cluster that loses a node: a head on 127.0.0.2 (2 CPUs) and nodes on
127.0.0.3 to 127.0.0.6 (1 CPU each), node death detected in ~3 s (the head's health checks).
Each test places the run's roles with --role-nodes, SIGKILLs the raylet of a node of its own
mid-run (what a crashed machine or a lost network link looks like) and checks the outcome: the
roles on it are rebuilt elsewhere (an actor restarted, the param store from the learner's
params, the evaluator, a replay shard from the last checkpoint) and the run finishes with exit
0, at --total-timesteps plus at most the pushes in flight, with the rate limit held, and nothing
of it left on the machine."""

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
HEAD, NODE_3, NODE_4, NODE_5, NODE_6 = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"
PORT = 6393
TOTAL, KILL_AT = 5000, 2000
# the rate limit paces the actors at the learner's speed (~400 steps/s here): the run outlasts
# a recovery (~6 s from the kill: 3 s to see the death, 3 s to rebuild) on a faster machine too
REPLAY_RATIO = 8
PUSH, ENVS, ACTORS = 10, 2, 2  # --actor-push-interval, --num-envs-per-actor, --num-actors
RUN = ["--env-id", "CartPole-v1", "--num-actors", str(ACTORS), "--num-envs-per-actor", str(ENVS), "--hidden-size",
       "32", "--torso-size", "32", "--head-hidden-size", "32", "--burn-in-length", "4", "--sequence-length", "8",
       "--overlap", "4", "--batch-size", "16", "--buffer-size", "20000", "--learning-starts", "1000",
       "--replay-ratio", str(REPLAY_RATIO), "--min-replay-ratio", str(REPLAY_RATIO), "--learning-rate", "1e-3",
       "--gamma", "0.99",
       "--log-interval", "500", "--actor-push-interval", str(PUSH), "--eval-episodes", "2", "--no-progress-bar",
       "--total-timesteps", str(TOTAL), "--ray-address", f"{HEAD}:{PORT}"]
# node death in ~3 s instead of Ray's default ~15 s (README, "Beyond one machine")
HEALTH = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}'
# token authentication as the README sets up a cluster: the same token on every node and in the
# script, stated here rather than inherited from whatever the test process's environment holds
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def ray_cli(home: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_TMPDIR=home, HOME=home, **AUTH)
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def join(home: str, ip: str) -> None:
    out = ray_cli(home, "start", "--address", f"{HEAD}:{PORT}", "--node-ip-address", ip, "--num-cpus", "1")
    assert out.returncode == 0, out.stderr


def raylet_of(ip: str) -> int | None:
    for process in psutil.process_iter():
        try:
            cmdline = process.cmdline()
        except psutil.Error:  # gone meanwhile, or a zombie
            continue
        if cmdline and "raylet" in cmdline[0] and f"--node-name={ip}" in " ".join(cmdline):
            return process.pid
    return None


@pytest.fixture(scope="module")
def cluster():
    """The three-node loopback cluster; its folder (RAY_TMPDIR, HOME) is the run's too."""
    with tempfile.TemporaryDirectory(prefix="rn_", dir="/tmp") as home:
        shm_before = set(os.listdir("/dev/shm"))
        try:
            out = ray_cli(home, "start", "--head", "--node-ip-address", HEAD, "--port", str(PORT), "--num-cpus", "2",
                          "--include-dashboard", "false", "--disable-usage-stats", "--system-config", HEALTH)
            assert out.returncode == 0, out.stderr
            for node in (NODE_3, NODE_4, NODE_5, NODE_6):
                join(home, node)
            yield home
        finally:
            ray_cli(home, "stop", "--force")
        deadline = time.time() + 20
        while set(os.listdir("/dev/shm")) - shm_before and time.time() < deadline:
            time.sleep(0.5)
        assert not set(os.listdir("/dev/shm")) - shm_before, "a /dev/shm entry left behind"


def run_and_kill(tmp_path, home: str, placement: str, victim: str, *extra: str, after: str = "step"):
    """Run with roles placed by ``placement``; SIGKILL ``victim``'s raylet at the first progress line
    at KILL_AT steps or more once a line has held ``after``. Returns (exit code, stdout, stderr)."""
    env = dict(os.environ, RAY_TMPDIR=home, HOME=home, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::DeprecationWarning",
               **AUTH)
    proc = subprocess.Popen([sys.executable, str(ROOT / "r2d2_algo" / "r2d2_ray.py"), *RUN, "--role-nodes", placement,
                             *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    lines, killed, ready = [], False, False
    try:
        deadline = time.time() + 300
        for line in proc.stdout:
            lines.append(line)
            ready = ready or after in line
            step = re.match(r"step ([\d,]+): SPS", line)
            if not killed and ready and step and int(step.group(1).replace(",", "")) >= KILL_AT:
                os.kill(raylet_of(victim), signal.SIGKILL)
                killed = True
            assert time.time() < deadline, "".join(lines)
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (tmp_path / "out.txt").write_text("".join(lines))
    (tmp_path / "err.txt").write_text(err)
    assert killed, "".join(lines) + err
    return proc.returncode, "".join(lines), err


def final_step_and_updates(out: str) -> tuple[int, int]:
    """The step of the final evaluation (the learner's last count) and the last progress line's updates."""
    progress = re.findall(r"step ([\d,]+): SPS \d+, updates ([\d,]+)", out)
    final = re.findall(r"step ([\d,]+): eval return", out)
    return int(final[-1].replace(",", "")), int(progress[-1][1].replace(",", ""))


def assert_finished_within_limits(code: int, out: str, err: str) -> None:
    """Exit 0, no traceback, a final evaluation; the final step within TOTAL plus the pushes in
    flight (2 per actor), and the rate limit held: trained observations (updates × 16 × 8) at
    least 95 % of --min-replay-ratio × the steps after learning started, less those pushes (the
    shard stops an actor at the allowance the learner's last update gave, whatever the learner is
    doing; a limit the learner set only between its updates let the actors run at 0.4 of it)."""
    assert code == 0, err
    assert "Traceback" not in err, err
    step, updates = final_step_and_updates(out)
    in_flight = 2 * ACTORS * PUSH * ENVS
    assert TOTAL <= step <= TOTAL + in_flight, (step, out)
    assert updates * 16 * 8 >= 0.95 * REPLAY_RATIO * (step - 1000 - in_flight), (updates, step)


def test_losing_a_node_with_an_actor_restarts_it_elsewhere(tmp_path, cluster):
    code, out, err = run_and_kill(tmp_path, cluster, f"actor-1={NODE_3},actor-0={HEAD},param-store={HEAD},"
                                  f"evaluator={HEAD},replay-shard-0={HEAD}", NODE_3)
    assert f"actor 1 on node {NODE_3}" in out
    assert re.search(r"actor 1 died at step [\d,]+; restart 1 of 3", err), err
    assert re.search(r"actor 1 restarted on node 127\.0\.0\.[2456]", err), err
    assert_finished_within_limits(code, out, err)


def test_losing_the_node_of_the_param_store_and_evaluator_rebuilds_both(tmp_path, cluster):
    code, out, err = run_and_kill(tmp_path, cluster, f"param-store={NODE_4},evaluator={NODE_4},replay-shard-0={HEAD},"
                                  f"actor-0={HEAD},actor-1={HEAD}", NODE_4, "--eval-interval", "2500")
    assert f"param store on node {NODE_4}" in out and f"evaluator on node {NODE_4}" in out
    assert re.search(rf"the param store was lost with node {re.escape(NODE_4)}; rebuilt on node 127\.0\.0\.\d "
                     r"from the learner's params", err), err
    assert re.search(rf"the evaluator was lost with node {re.escape(NODE_4)}; rebuilt on node", err), err
    assert_finished_within_limits(code, out, err)
    evaluations = [int(s.replace(",", "")) for s in re.findall(r"step ([\d,]+): eval return", out)]
    assert max(evaluations) >= TOTAL and any(KILL_AT < s < TOTAL for s in evaluations), out  # after the loss too


def test_losing_the_node_of_a_replay_shard_rebuilds_it_from_the_checkpoint(tmp_path, cluster):
    code, out, err = run_and_kill(tmp_path, cluster, f"replay-shard-0={NODE_5},param-store={HEAD},evaluator={HEAD},"
                                  f"actor-0={HEAD},actor-1={HEAD}", NODE_5, "--checkpoint-interval", "2000",
                                  after="checkpoint written")
    assert f"replay shard 0 on node {NODE_5}" in out
    rebuilt = re.search(rf"replay shard 0 was lost with node {re.escape(NODE_5)}; rebuilt on node 127\.0\.0\.\d from "
                        r"the checkpoint of step ([\d,]+)", err)
    assert rebuilt and int(rebuilt.group(1).replace(",", "")) >= 2000, err
    assert_finished_within_limits(code, out, err)


def test_losing_a_node_that_holds_nothing_changes_nothing(tmp_path, cluster):
    code, out, err = run_and_kill(tmp_path, cluster, f"replay-shard-0={HEAD},param-store={HEAD},evaluator={HEAD},"
                                  f"actor-0={HEAD},actor-1={HEAD}", NODE_6)
    assert "lost with node" not in err and "died" not in err, err
    assert_finished_within_limits(code, out, err)
