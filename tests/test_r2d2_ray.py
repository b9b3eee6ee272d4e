"""r2d2_ray.py end to end on an embedded Ray (CPU): a short run, a killed actor, Ctrl-C,
bad addresses (the plumbing's own tests: test_ray_replay, test_ray_param_store, test_ray_supervisor,
test_ray_start). Ray's files go to a temporary folder per test (RAY_TMPDIR, HOME), and every test
checks that no Ray process and no /dev/shm entry of the run is left behind."""

import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r2d2_algo import processes
from r2d2_algo.checkpoint import from_storable, load_checkpoint
from tests.conftest import marked_copy_of_the_repository

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--env-id", "CartPole-v1", "--num-actors", "2", "--num-envs-per-actor", "2", "--hidden-size", "32",
         "--torso-size", "32", "--head-hidden-size", "32", "--burn-in-length", "4", "--sequence-length", "8",
         "--overlap", "4", "--batch-size", "16", "--buffer-size", "20000", "--learning-starts", "1000",
         "--replay-ratio", "4", "--target-network-update-period", "50", "--learning-rate", "1e-3", "--gamma", "0.99",
         "--log-interval", "1000", "--actor-push-interval", "10"]


def command_lines() -> dict[int, str]:
    """The command line of every live process on this machine (zombies left out), by pid."""
    found = {}
    for process in psutil.process_iter():
        try:
            if process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                found[process.pid] = " ".join(process.cmdline())
        except psutil.Error:  # gone meanwhile (a zombie's command line raises too), or not ours to read
            continue
    return found


def ray_processes():
    """PIDs of live Ray processes (raylet, gcs_server, workers) on this machine."""
    return [pid for pid, cmdline in command_lines().items()
            if "raylet" in cmdline or "gcs_server" in cmdline or cmdline.startswith("ray::")]


def actor_pids(proc) -> list[int]:
    """PIDs of the live processes of the run ``proc``'s actors (its embedded Ray's processes are
    its descendants: another run's actors on the machine are not counted)."""
    ours = {int(entry.split(":")[0]) for entry in processes.descendants(proc.pid)}
    cmdlines = command_lines()
    return [pid for pid in ray_processes() if pid in ours and cmdlines.get(pid, "").startswith("ray::Actor")]


@pytest.fixture
def ray_home():
    """A short temporary folder for Ray's files (its socket paths must stay under ~100 characters)."""
    with tempfile.TemporaryDirectory(prefix="rt_", dir="/tmp") as folder:
        before_shm, before_ray = set(os.listdir("/dev/shm")), set(ray_processes())
        yield folder
        deadline = time.time() + 20
        while set(ray_processes()) - before_ray and time.time() < deadline:
            time.sleep(0.5)
        assert not set(ray_processes()) - before_ray, "Ray processes left behind"
        assert set(os.listdir("/dev/shm")) <= before_shm, "a /dev/shm entry left behind"


def start(tmp_path, ray_home, *args, root=ROOT):
    env = dict(os.environ, RAY_TMPDIR=ray_home, HOME=ray_home, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::DeprecationWarning")
    return subprocess.Popen([sys.executable, str(root / "r2d2_algo" / "r2d2_ray.py"), *map(str, args)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def read_until_step(proc, step, timeout=240):
    """Read the run's output until a progress line at ``step`` environment steps or more."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "".join(lines) + proc.stderr.read()
        lines.append(line)
        match = re.match(r"step ([\d,]+): SPS", line)
        if match and int(match.group(1).replace(",", "")) >= step:
            return lines
    raise AssertionError("".join(lines))


def test_short_run_on_embedded_ray(tmp_path, ray_home):
    """Two shards (batches drawn from each in proportion to its priorities), every scalar logged;
    run from a copy of the repository whose r2d2_algo says where it was imported from: the Ray
    workers use the copy beside the script, as the driver does (test_r2d2_cli's
    test_script_imports_the_package_beside_it), whether or not another one is installed."""
    clone, marker = marked_copy_of_the_repository(tmp_path)
    proc = start(tmp_path, ray_home, *SMALL, "--total-timesteps", "5000", "--eval-episodes", "2",
                 "--num-replay-shards", "2", root=clone)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    workers = [line for line in (out + err).splitlines() if "pid=" in line]
    assert marker in out and any(marker in line for line in workers), out + err
    assert "actor 0 on node 127.0.0.2" in out and "replay shard 1 on node 127.0.0.2" in out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ["charts/SPS", "charts/updates_per_second", "replay/size", "replay/replay_ratio",
                "charts/parameter_lag", "losses/td_loss", "losses/q_discrepancy_first", "losses/q_discrepancy_last",
                "charts/episodic_return", "eval/episodic_return"]:
        assert tag in tags, tag
    assert acc.Scalars("charts/learner_updates")[-1].value > 0
    assert not glob.glob(os.path.join(ray_home, "r2d2_ray_*")), "the run's Ray folder was not removed"


def episode_cuts(replay: dict, max_length: int = 400) -> dict[int, int]:
    """Walk each stream of a replay state_dict in write order; assert that every episode start
    follows an end (terminated or truncated), i.e. that no n-step target or sequence can run from
    one episode into the next. Returns, per stream with a truncation mark on an episode shorter
    than ``max_length`` steps (a cut: CartPole's time limit truncates at 500 steps only), the
    steps written after its last cut."""
    first, terminated, truncated = replay["first"], replay["terminated"], replay["truncated"]
    capacity, cuts = first.shape[1], {}
    for stream, written in enumerate(replay["write_count"]):
        order = np.arange(written - min(written, capacity), written) % capacity
        f, end = first[stream, order], terminated[stream, order] | truncated[stream, order]
        starts = np.flatnonzero(f[1:]) + 1
        assert end[starts - 1].all(), f"stream {stream}: an episode starts after a step that is not an end"
        length = 0
        for k, (position, ok) in enumerate(zip(order, f)):
            length = 1 if ok else length + 1
            if truncated[stream, position] and length < max_length:
                cuts[stream] = len(order) - 1 - k
    return cuts


def test_killed_actor_is_restarted(tmp_path, ray_home):
    """SIGKILL one actor mid-run: Ray restarts it once (a call made while it restarts is not a
    second death), the run logs it and exits 0. The other actor is held stopped until the run has
    gone 3,000 steps past the death, so those steps are the restarted actor's. The replay of the
    last checkpoint holds exactly the killed actor's two streams cut by a truncation mark, new
    steps after each cut, and no episode start without an end before it."""
    proc = start(tmp_path, ray_home, *SMALL, "--total-timesteps", "12000", "--eval-episodes", "0",
                 "--checkpoint-interval", "1000")
    read_until_step(proc, 3000)
    actors = actor_pids(proc)
    assert len(actors) == 2
    os.kill(actors[0], signal.SIGKILL)
    errors = []
    while not errors or "died at step" not in errors[-1]:
        errors.append(proc.stderr.readline())
        assert errors[-1], "".join(errors)
    killed, died_at = re.search(r"actor (\d) died at step ([\d,]+)", errors[-1]).groups()
    os.kill(actors[1], signal.SIGSTOP)
    try:
        read_until_step(proc, int(died_at.replace(",", "")) + 3000)
    finally:
        os.kill(actors[1], signal.SIGCONT)
    out, err = proc.communicate(timeout=400)
    err = "".join(errors) + err
    assert proc.returncode == 0, err
    assert "restart 1 of 3" in err and "restart 2" not in err, err
    (checkpoint_file,) = glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))
    checkpoint = load_checkpoint(checkpoint_file)
    (shard,) = from_storable(checkpoint["replay_shards"])
    cuts = episode_cuts(shard["replay"])
    E = 2  # --num-envs-per-actor: actor i's streams are i*E, i*E + 1
    assert sorted(cuts) == [int(killed) * E, int(killed) * E + 1], cuts
    assert min(cuts.values()) >= 1000, cuts  # the restarted actor's steps (3,000 and more, over 2 streams)


def test_a_death_beyond_max_actor_restarts_stops_the_run(tmp_path, ray_home):
    proc = start(tmp_path, ray_home, *SMALL, "--total-timesteps", "10000000", "--max-actor-restarts", "0")
    try:
        read_until_step(proc, 2000)
        (victim, _) = actor_pids(proc)
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:  # a run that did not stop must not go on beside the next tests
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "(0 of --max-actor-restarts 0 restarts used)" in err and "Traceback" not in err, err


@pytest.mark.parametrize("stop_signal, code", [(signal.SIGINT, 130), (signal.SIGHUP, 129)], ids=["SIGINT", "SIGHUP"])
def test_stopped_run_exits_cleanly(tmp_path, ray_home, stop_signal, code):
    """Ctrl-C and a closed terminal's SIGHUP, each to the whole process group (the embedded Ray's
    processes included): exit 128 + signal, no traceback, nothing left (ray_home). SIGTERM to the
    group: test_checkpoint_and_resume."""
    proc = start(tmp_path, ray_home, *SMALL, "--total-timesteps", "10000000")
    read_until_step(proc, 2000)
    os.killpg(proc.pid, stop_signal)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err


def test_reaper_kills_only_the_processes_it_was_given_and_removes_the_folder(tmp_path):
    """processes.py's reaper: a PID:START_TIME whose pid is another process now (a reused pid: the
    start time one clock tick off, the smallest difference two start times show) is left alone, the
    one given with its own start time is killed, the folder is removed; run as a process, it does
    nothing when the driver writes "done", and reaps when its stdin just ends."""
    folder = tmp_path / "r2d2_ray_x"
    (folder / "logs").mkdir(parents=True)
    keep, kill = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    tick = 1 / os.sysconf("SC_CLK_TCK")  # s (Linux: 10 ms)
    try:
        started = {p.pid: processes.process_start_time(p.pid) for p in (keep, kill)}
        given = {pid: f"{pid}:{start!r}" for pid, start in started.items()}
        assert set(given.values()) <= set(processes.descendants(os.getpid()))
        for reused in (started[keep.pid] + tick, started[keep.pid] - tick):
            processes.reap(str(folder), [f"{keep.pid}:{reused!r}", given[kill.pid]])
            assert keep.poll() is None and not folder.exists()
            folder.mkdir()
        assert kill.wait(timeout=5) == -signal.SIGKILL
        for message, reaped in [(b"done", False), (b"", True)]:
            folder.mkdir(exist_ok=True)
            reaper = subprocess.Popen([sys.executable, processes.__file__, str(folder), given[keep.pid]],
                                      stdin=subprocess.PIPE)
            reaper.communicate(message, timeout=30)
            assert reaper.returncode == 0 and folder.exists() != reaped and (keep.poll() is not None) == reaped
        assert keep.wait(timeout=5) == -signal.SIGKILL
    finally:
        for p in (keep, kill):
            p.kill()
            p.wait()


def test_sigkilled_driver_leaves_no_ray_process_or_folder(tmp_path, ray_home):
    """SIGKILL the driver (what the OOM killer does): within 20 s no Ray process is left (the
    fixture's check; Ray's own agents would wait 60 s on the dead GCS), the run's Ray folder is
    removed, and the reaper that did it has exited too."""
    proc = start(tmp_path, ray_home, *SMALL, "--total-timesteps", "10000000")
    read_until_step(proc, 2000)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def leftovers():
        reapers = [cmdline for cmdline in command_lines().values() if "processes.py" in cmdline and ray_home in cmdline]
        return glob.glob(os.path.join(ray_home, "r2d2_ray_*")) + reapers

    deadline = time.time() + 20
    while leftovers() and time.time() < deadline:
        time.sleep(0.5)
    assert not leftovers()


@pytest.mark.parametrize("address, message", [("127.0.0.3:1", "nothing answers at 127.0.0.3:1")])
def test_bad_ray_address_is_one_line(tmp_path, ray_home, address, message):
    """An address nothing answers at, within seconds (its form: test_bad_inputs)."""
    proc = start(tmp_path, ray_home, "--env-id", "CartPole-v1", "--ray-address", address)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and message in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_and_resume(tmp_path, ray_home):
    """SIGTERM writes a final checkpoint (exit 143); --resume continues the same run from its step
    and updates, with the shards' replay; a changed algorithm argument is refused in one line.

    The SIGTERM goes to the whole process group (what a batch scheduler or ``kill -- -PGID`` does),
    which holds the embedded Ray's own processes too; they must outlive the driver's final
    checkpoint. The driver is held stopped for 15 s after the signal: without the fix, Ray's
    agents die of it and the raylet follows them ~10 s later, so the checkpoint always fails
    (a race CI once lost without the hold).

    The hold also shows the rate limit (--min-replay-ratio) holding while the learner is away: the
    shards stop the actors at the allowance of the learner's last update (learning starts +
    trained observations / 2), so the checkpoint holds no more steps than that, and the pushes in
    flight (the learner's flag, set between its updates, let them run on for the whole 15 s)."""
    proc = start(tmp_path, ray_home, *SMALL, "--total-timesteps", "100000", "--eval-episodes", "0",
                 "--checkpoint-interval", "100000", "--min-replay-ratio", "2")  # SMALL: --replay-ratio 4
    read_until_step(proc, 3000)
    os.kill(proc.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(15)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "resume with --resume saved_checkpoints/" in err, err
    (folder,) = glob.glob(str(tmp_path / "saved_checkpoints" / "*"))
    checkpoint = load_checkpoint(folder)
    step, updates = checkpoint["progress"]["global_step"], checkpoint["progress"]["updates"]
    assert step >= 3000 and updates > 0 and from_storable(checkpoint["replay_shards"])[0]["replay"] is not None
    allowed = 1000 + (updates + 1) * 16 * 8 / 2  # --learning-starts, SMALL's batches; and an update in flight
    assert step <= allowed + 2 * 2 * 10 * 2, (step, allowed)  # + 2 pushes of 10 steps × 2 envs per actor

    proc = start(tmp_path, ray_home, "--resume", folder, "--gamma", "0.9")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and len(err.strip().splitlines()) == 1 and "--gamma 0.9" in err, err

    proc = start(tmp_path, ray_home, "--resume", folder, "--total-timesteps", str(step + 1000))
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    assert f"from step {step:,} ({updates:,} updates)" in out
    assert len(glob.glob(str(tmp_path / "runs" / "*"))) == 1
    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "*"))[0])
    acc.Reload()
    assert acc.Scalars("charts/learner_updates")[-1].value > updates
