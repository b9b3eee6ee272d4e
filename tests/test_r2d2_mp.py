"""r2d2_mp.py: shared-memory replay across processes, and runs that really start and stop."""

import glob
import multiprocessing as std_mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r2d2_algo.checkpoint import from_storable, load_checkpoint
from r2d2_algo.shared import SharedArrays
from r2d2_algo.storage import SequenceReplayBuffer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden-size", "32", "--torso-size", "32", "--head-hidden-size", "32", "--burn-in-length", "4",
         "--sequence-length", "8", "--overlap", "4", "--batch-size", "16", "--buffer-size", "20000",
         "--learning-starts", "1000", "--replay-ratio", "4", "--target-network-update-period", "50",
         "--learning-rate", "1e-3", "--gamma", "0.99", "--log-interval", "500", "--num-envs-per-actor", "2"]


def live(process: psutil.Process) -> bool:
    """Whether the process runs (a zombie does not)."""
    try:
        return process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def descendants(pid):
    """PIDs of all live processes whose ancestry includes pid."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True) if live(child)]
    except psutil.NoSuchProcess:  # it has exited (its orphans belong to init now)
        return []


def shm_segments_of(pid):
    return glob.glob(f"/dev/shm/r2d2_{pid}_*")


def start(tmp_path, *args, extra_env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "r2d2_algo" / "r2d2_mp.py"), *map(str, args)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, like a job in a terminal


def wait_clean(proc, timeout=60):
    """Wait for exit; assert nothing of the run survives it. A run still going after ``timeout``
    seconds is killed, and the test fails with the end of what it printed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    time.sleep(0.5)
    assert not descendants(proc.pid), f"orphans left: {descendants(proc.pid)}"
    left = [p.pid for p in psutil.process_iter() if _pgid(p) == proc.pid]
    assert not left, f"processes of the run's group still alive: {left}"
    assert not shm_segments_of(proc.pid), f"/dev/shm left: {shm_segments_of(proc.pid)}"
    return out, err


def _pgid(process: psutil.Process) -> int | None:
    """The process group of a live process; None for a zombie or one gone meanwhile."""
    try:
        return os.getpgid(process.pid) if live(process) else None
    except OSError:
        return None


def wait_for_output(proc, tmp_path, pattern, timeout=60):
    """Wait until the run has written a tensorboard folder (it is past start-up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if glob.glob(str(tmp_path / pattern)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{pattern} never appeared")


# ---------------------------------------------------------------- shared replay across processes
def writer_process(layout, replay_kwargs, streams, num_steps, seed):
    arrays = SharedArrays.attach(layout)
    replay = SequenceReplayBuffer(**replay_kwargs, index=False, allocate=arrays.get)
    for step in range(num_steps):
        replay.add(*synthetic_step(seed, streams, step, replay_kwargs["state_size"]), streams=streams)
        if step % 8 == 0:
            time.sleep(0.001)  # let the sampler interleave with the writers throughout
    arrays.close()


PAIRS = ([0, 1], [2, 3])  # the streams of writer 0 and writer 1


def synthetic_step(seed, streams, step, state_size):
    """Deterministic content of step `step` of each stream: a single process can regenerate it."""
    rng = np.random.default_rng([seed, streams[0], step])
    K = len(streams)
    obs = (np.asarray(streams)[:, None] * 1000 + step + rng.random((K, 3))).astype(np.float32)
    first = (rng.random(K) < 0.05) | (step == 0)
    return (obs, rng.integers(0, 3, K), rng.normal(size=K).astype(np.float32), first,
            rng.random(K) < 0.03, np.zeros(K, bool), rng.normal(size=(K, state_size)).astype(np.float32))


def reference_window(seed, stream, start, length, state_size):
    pair = PAIRS[stream // 2]
    steps = [synthetic_step(seed, pair, t, state_size) for t in range(start, start + length)]
    row = stream % 2
    obs = np.stack([s[0][row] for s in steps])
    action = np.array([s[1][row] for s in steps])
    return obs, action, steps[0][6][row]


def test_shared_replay_written_by_several_processes_equals_a_single_process_reference():
    """Two writer processes fill the shared replay while this process syncs and samples:
    every sampled window equals the steps a single process would have written, and a window
    overwritten while it was read is dropped (weight 0), never returned torn."""
    kwargs = dict(num_streams=4, capacity=4 * 64, obs_shape=(3,), obs_dtype=np.float32, state_size=2,
                  burn_in_length=2, sequence_length=6, n_step=2, overlap=3, overwrite_margin=12)
    arrays = SharedArrays()
    try:
        learner = SequenceReplayBuffer(**kwargs, index=True, allocate=arrays.allocate)
        ctx = std_mp.get_context("spawn")
        num_steps = 4000  # > 60 wrap-arounds of each ring
        writers = [ctx.Process(target=writer_process, args=(arrays.layout, kwargs, pair, num_steps, 7))
                   for pair in PAIRS]
        for p in writers:
            p.start()
        rng = np.random.default_rng(0)
        checked = 0
        while any(p.is_alive() for p in writers) or checked == 0:
            learner.sync()
            if learner.num_valid_sequences == 0:
                continue
            batch = learner.sample(16, rng)
            streams = batch.indices // learner.slots_per_stream
            for b in range(16):
                if batch.sequence_ids[b] < 0:
                    assert batch.weights[b] == 0  # overwritten while read: dropped
                    continue
                obs, action, state = reference_window(7, streams[b], batch.sequence_ids[b] * learner.period,
                                                      learner.window_length, 2)
                np.testing.assert_array_equal(batch.obs[:, b], obs)
                np.testing.assert_array_equal(batch.action[:, b], action)
                np.testing.assert_array_equal(batch.initial_state[b], state)
                checked += 1
        for p in writers:
            p.join()
            assert p.exitcode == 0
        assert checked > 200
        assert learner.write_count.tolist() == [num_steps] * 4
    finally:
        arrays.close()
        arrays.unlink()


# ---------------------------------------------------------------- the replay's layout at the defaults
def default_pong_layout(num_actors):
    """r2d2_mp.py's defaults on Pong with this many actors: (envs per actor, replay arguments),
    computed as main does, without starting anything."""
    import gymnasium as gym

    from r2d2_algo.r2d2_mp import Args, replay_arguments, resolve_envs_per_actor

    args = Args(num_actors=num_actors)
    args.num_envs_per_actor = resolve_envs_per_actor(args, frame_stack=4)
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    return args.num_envs_per_actor, replay_arguments(args, space, state_size=2 * args.hidden_size, frame_stack=4)


@pytest.mark.parametrize("num_actors, envs_per_actor", [(15, 64), (127, 6)])
def test_default_replay_keeps_90_percent_of_its_observations_sampleable(num_actors, envs_per_actor):
    """A 16-core machine (15 actors × 64 envs = 960 streams) and a 128-core one (127 actors: the
    envs per actor adapt) with the default 1 M replay: the layout is accepted, and at every phase
    of the streams' writing ≥ 90 % of the stored observations lie in a sampleable window."""
    envs, kwargs = default_pong_layout(num_actors)
    assert envs == envs_per_actor
    SequenceReplayBuffer.shared_nbytes(**kwargs)  # raises ValueError for a layout main would refuse
    only_counts = lambda name, shape, dtype: np.zeros(shape if name == "write_count" else (0,) * len(shape), dtype)
    replay = SequenceReplayBuffer(**kwargs, index=False, allocate=only_counts)
    fractions = []
    for phase in range(replay.period):
        replay.write_count[:] = 50 * replay.capacity_per_stream + phase  # long after the rings filled
        fractions.append(replay.sampleable_fraction())
    assert min(fractions) >= 0.9, fractions


# ---------------------------------------------------------------- whole runs
# ---------------------------------------------------------------- weight publication and refresh
def small_network():
    import gymnasium as gym

    from r2d2_algo.model import RNNQNetwork

    # ~0.7 M parameters: copies long enough (~ms) that readers and the writer overlap often
    return RNNQNetwork(gym.spaces.Box(-1.0, 1.0, (4,), np.float32), 2, hidden_size=256, torso_size=256,
                       head_hidden_size=256)


def weight_reader_process(layout, lock, results, stop):
    """An actor's side: refresh until stopped; every refresh must see one whole publication."""
    from r2d2_algo.r2d2_mp import load_published_weights

    arrays = SharedArrays.attach(layout)
    net, seen, torn = small_network(), [], 0
    while not stop.is_set() or not seen:
        version = load_published_weights(net, arrays["weights"], arrays["weights_version"], lock)
        values = torch.cat([p.detach().flatten() for p in net.parameters()])
        torn += int(not bool((values == version).all()))  # publication k sets every weight to k
        if not seen or seen[-1] != version:
            seen.append(version)
    results.put((seen, torn))
    arrays.close()


def test_published_weights_reach_other_processes_whole_and_in_order():
    from r2d2_algo.r2d2_mp import publish

    ctx = std_mp.get_context("spawn")
    net = small_network()
    num_params = sum(p.numel() for p in net.parameters())
    arrays = SharedArrays()
    try:
        weights = arrays.allocate("weights", (num_params,), np.float32)
        version = arrays.allocate("weights_version", (1,), np.int64)
        lock, results, stop = ctx.Lock(), ctx.Queue(), ctx.Event()

        def fill_and_publish(k):  # publication k: every weight is k
            torch.nn.utils.vector_to_parameters(torch.full((num_params,), float(k)), net.parameters())
            publish(net, weights, version, lock, k)

        fill_and_publish(0)
        readers = [ctx.Process(target=weight_reader_process, args=(arrays.layout, lock, results, stop))
                   for _ in range(2)]
        for r in readers:
            r.start()
        time.sleep(3.0)  # the readers are up and refreshing
        for k in range(1, 301):
            fill_and_publish(k)
            time.sleep(0.002)
        time.sleep(0.5)
        stop.set()
        outcomes = [results.get(timeout=30) for _ in readers]
        for r in readers:
            r.join(timeout=10)
    finally:
        arrays.close()
        arrays.unlink()
    for seen, torn in outcomes:
        assert torn == 0  # never half of one publication and half of another
        assert seen == sorted(seen) and seen[-1] == 300  # in order, up to the last one
        assert len(seen) > 30  # they refreshed along the way, not only at the end


@pytest.mark.parametrize("inference", ["local", "central"])
def test_cartpole_run_end_to_end(tmp_path, inference):
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "6000",
                 "--eval-episodes", "2", "--save-model", "--inference", inference, *SMALL)
    out, err = wait_clean(proc, timeout=300)
    assert proc.returncode == 0, err
    assert "MiB in shared memory with the weights" in out and f"inference {inference}" in out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ["charts/SPS", "actors/SPS_actor_0", "actors/SPS_actor_1", "charts/updates_per_second",
                "replay/size", "replay/replay_ratio", "charts/parameter_lag", "charts/sample_wait_seconds",
                "losses/td_loss", "losses/q_discrepancy_first", "losses/q_discrepancy_last",
                "charts/episodic_return", "eval/episodic_return"]:
        assert tag in tags, tag
    assert acc.Scalars("losses/q_discrepancy_first")[-1].value > 0  # the actors' states are not the learner's
    updates = acc.Scalars("charts/learner_updates")[-1].value
    assert updates > 0
    # actors refresh their weights: the lag stays far below the number of updates
    assert acc.Scalars("charts/parameter_lag")[-1].value < max(10, updates)
    assert glob.glob(str(tmp_path / "saved_models" / "*" / "model.pt"))


# SIGTERM to the group while running: test_sigterm_to_the_group_writes_a_last_checkpoint; SIGHUP: test_stops.py
@pytest.mark.parametrize("stop_signal, when, inference", [
    (signal.SIGINT, "startup", "local"), (signal.SIGINT, "running", "local"), (signal.SIGTERM, "startup", "local"),
    (signal.SIGINT, "startup", "central"), (signal.SIGINT, "running", "central")])
def test_stopped_run_exits_cleanly(tmp_path, stop_signal, when, inference):
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "10000000",
                 "--inference", inference, *SMALL)
    if when == "startup":
        time.sleep(1.0)
    else:
        wait_for_output(proc, tmp_path, "runs/*")
        time.sleep(3.0)
    t0 = time.time()
    os.killpg(proc.pid, stop_signal)  # what Ctrl-C in a terminal does: the whole process group
    out, err = wait_clean(proc, timeout=30)
    assert time.time() - t0 < 15
    assert proc.returncode != 0
    assert "Traceback" not in err, err


def test_dead_actor_is_restarted_with_its_traceback_then_stops_the_run(tmp_path):
    """An actor whose env always fails: each death is logged with its traceback and restarted,
    --max-actor-restarts times; the next death stops the run."""
    proc = start(tmp_path, "--env-id", "crashing_env:CrashingCartPole-v0", "--num-actors", "2",
                 "--total-timesteps", "10000000", "--max-actor-restarts", "2", *SMALL,
                 extra_env={"PYTHONPATH": str(ROOT / "tests" / "helpers")})
    out, err = wait_clean(proc, timeout=120)
    assert proc.returncode == 1
    assert "restart 1 of 2" in err and "restart 2 of 2" in err and "restart 3" not in err
    assert "(2 of --max-actor-restarts 2 restarts used)" in err
    assert err.count("RuntimeError: CrashingCartPole: deliberate failure for the test") == 3  # 3 deaths


def pids_named(proc, prefix, count, timeout=30):
    """The run's processes whose role name (r2d2_mp.ignore_stop_signals) starts with prefix, once
    there are ``count`` of them (a child names itself after its imports)."""
    deadline = time.time() + timeout
    while True:
        found = []
        for pid in descendants(proc.pid):
            try:
                if psutil.Process(pid).name().startswith(prefix):
                    found.append(pid)
            except psutil.NoSuchProcess:  # gone meanwhile
                pass
        if len(found) >= count:
            return found
        assert time.time() < deadline, f"{len(found)} of {count} processes named {prefix}*"
        time.sleep(0.1)


def actor_pids(proc, count=2):
    return pids_named(proc, "r2d2-actor-", count)


@pytest.mark.parametrize("inference", ["local", "central"])
def test_killed_actor_is_restarted_and_its_streams_are_cut(tmp_path, inference):
    """SIGKILL an actor mid-run: the run goes on and ends with exit 0; in the replay every
    episode start follows an episode end (the killed actor's streams were marked truncated where
    they stopped), so no window carries a recurrent state or an n-step return across the cut.
    With central inference the new actor's envs start from zero states in the inference process."""
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "10000",
                 "--checkpoint-interval", "9000", "--eval-episodes", "0", "--inference", inference, *SMALL)
    lines = []
    while not re.match(r"step ([3-9],)\d{3}: SPS", lines[-1] if lines else ""):  # mid-run: 3,000+ steps
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines) + proc.stderr.read()
    victims = actor_pids(proc)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    out, err = wait_clean(proc, timeout=120)
    assert proc.returncode == 0, err
    assert "died at step" in err and "restart 1 of 3" in err
    (path,) = glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))
    replay = from_storable(load_checkpoint(path)["replay"])
    capacity = replay["first"].shape[1]
    cuts = 0
    for stream in range(replay["first"].shape[0]):
        written = int(replay["write_count"][stream])
        order = [t % capacity for t in range(max(0, written - capacity), written)]
        first, terminated, truncated = (replay[name][stream, order] for name in ("first", "terminated", "truncated"))
        ended = terminated | truncated
        np.testing.assert_array_equal(first[1:], ended[:-1], f"stream {stream}: an episode starts where none ended")
        cuts += int(truncated.sum())  # a cut on a terminal step is marked too
    assert cuts >= 2  # the killed actor's two streams (CartPole's own 500-step limit is seldom reached here)


def test_evaluation_runs_beside_the_learner(tmp_path):
    """Evaluations (400-step episodes) run in their own process on the published weights: the
    learner goes on updating while each one runs, and every result is logged at the step it was
    asked for, the last one with the final weights (a periodic one when the learner made no update
    after it, else one more at the end)."""
    proc = start(tmp_path, "--env-id", "long_episode_env:LongEpisode-v0", "--num-actors", "1", "--total-timesteps",
                 "12000", "--eval-interval", "3000", "--eval-episodes", "4", *SMALL,
                 extra_env={"PYTHONPATH": str(ROOT / "tests" / "helpers")})
    out, err = wait_clean(proc, timeout=300)
    assert proc.returncode == 0, err
    during = [int(n.replace(",", "")) for n in re.findall(r"the learner did ([\d,]+) updates while it ran", out)]
    assert len(during) >= 3 and max(during) > 0, out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    evaluations = acc.Scalars("eval/episodic_return")
    assert [e.value for e in evaluations] == [400.0] * len(evaluations)  # 4 whole episodes each
    versions = [int(n.replace(",", "")) for n in re.findall(r"weights of update ([\d,]+)", out)]
    assert len(versions) == len(evaluations) and versions[-1] == acc.Scalars("charts/learner_updates")[-1].value, out
    assert evaluations[-1].step >= 9000  # the last --eval-interval mark before the end, or the end


def test_actor_deaths_beyond_max_actor_restarts_stop_the_run(tmp_path):
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "10000000",
                 "--max-actor-restarts", "0", *SMALL)
    wait_for_output(proc, tmp_path, "runs/*")
    victims = actor_pids(proc)
    assert len(victims) >= 2
    os.kill(victims[0], signal.SIGKILL)
    out, err = wait_clean(proc, timeout=30)
    assert proc.returncode == 1 and "died" in err and "0 of --max-actor-restarts 0" in err


def test_a_dead_inference_process_stops_the_run_cleanly(tmp_path):
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "10000000",
                 "--inference", "central", *SMALL)
    wait_for_output(proc, tmp_path, "runs/*")
    (server,) = pids_named(proc, "r2d2-inference", 1)
    os.kill(server, signal.SIGKILL)
    out, err = wait_clean(proc, timeout=30)
    assert proc.returncode == 1 and "the inference process died" in err and "Traceback" not in err, err


def test_exception_in_the_learner_cleans_up(tmp_path, monkeypatch):
    import r2d2_algo.r2d2_mp as r2d2_mp

    def broken_loss(*args, **kwargs):
        raise RuntimeError("learner bug")

    monkeypatch.setattr(r2d2_mp, "r2d2_loss", broken_loss)
    monkeypatch.chdir(tmp_path)
    args = r2d2_mp.Args(env_id="CartPole-v1", num_actors=2, num_envs_per_actor=2, total_timesteps=100000,
                        hidden_size=16, torso_size=16, head_hidden_size=16, burn_in_length=2, sequence_length=4,
                        overlap=2, batch_size=4, buffer_size=4000, learning_starts=200, log_interval=500)
    with pytest.raises(RuntimeError, match="learner bug"):
        r2d2_mp.main(args)
    time.sleep(0.5)
    assert not std_mp.active_children()
    assert not descendants(os.getpid()) or all("resource_tracker" in " ".join(psutil.Process(p).cmdline())
                                               for p in descendants(os.getpid()))
    assert not shm_segments_of(os.getpid())


def test_ctrl_c_during_an_update_stops_without_finishing_it(tmp_path, monkeypatch):
    """A CPU update on Atari takes tens of seconds: Ctrl-C arriving inside one stops the run at
    the next module call (the update is neither finished nor applied), and the last checkpoint
    holds the weights of the updates before it."""
    import r2d2_algo.r2d2_mp as r2d2_mp
    from r2d2_algo.checkpoint import load_checkpoint

    real_loss, calls = r2d2_mp.r2d2_loss, []

    def loss_interrupted_midway(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # lands at the loss's next Python line
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(r2d2_mp, "r2d2_loss", loss_interrupted_midway)
    monkeypatch.chdir(tmp_path)
    args = r2d2_mp.Args(env_id="CartPole-v1", num_actors=2, num_envs_per_actor=2, total_timesteps=100000,
                        hidden_size=16, torso_size=16, head_hidden_size=16, burn_in_length=2, sequence_length=4,
                        overlap=2, batch_size=4, buffer_size=4000, learning_starts=200, log_interval=500,
                        checkpoint_interval=10**6, eval_episodes=0)
    assert r2d2_mp.main(args, argv=[]) == 130
    (path,) = glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))
    assert len(calls) == 1 and load_checkpoint(path)["progress"]["updates"] == 0
    assert not shm_segments_of(os.getpid())


class ProcessInterruptedAtStart(std_mp.get_context("spawn").Process):
    """The first actor process, whose start is hit by Ctrl-C (the learner spends about a second there)."""

    interrupted = False

    def start(self):
        if not ProcessInterruptedAtStart.interrupted:
            ProcessInterruptedAtStart.interrupted = True
            os.kill(os.getpid(), signal.SIGINT)
        super().start()


def test_ctrl_c_while_the_actors_start_is_not_lost(tmp_path, monkeypatch):
    import r2d2_algo.r2d2_mp as r2d2_mp

    monkeypatch.setattr(r2d2_mp.mp.get_context("spawn"), "Process", ProcessInterruptedAtStart)
    monkeypatch.chdir(tmp_path)
    args = r2d2_mp.Args(env_id="CartPole-v1", num_actors=2, num_envs_per_actor=2, total_timesteps=3000,
                        hidden_size=16, torso_size=16, head_hidden_size=16, burn_in_length=2, sequence_length=4,
                        overlap=2, batch_size=4, buffer_size=4000, learning_starts=200, log_interval=500,
                        eval_episodes=0)
    assert r2d2_mp.main(args, argv=[]) == 130  # not a run that ignored the Ctrl-C and finished
    assert not shm_segments_of(os.getpid())


def test_min_replay_ratio_makes_the_actors_wait_for_a_slow_learner(tmp_path):
    """CartPole actors outrun a CPU learner many times over; with --min-replay-ratio they wait, so
    the run ends having trained (nearly) that many observations per observation added."""
    def final_updates(*extra):
        proc = start(tmp_path / str(len(extra)), "--env-id", "CartPole-v1", "--num-actors", "2", *SMALL,
                     "--total-timesteps", "3000", "--replay-ratio", "32", "--eval-episodes", "0", *extra)
        out, err = wait_clean(proc, timeout=300)
        assert proc.returncode == 0, err
        (run_dir,) = glob.glob(str(tmp_path / str(len(extra)) / "runs" / "*"))
        acc = EventAccumulator(run_dir)
        acc.Reload()
        updates = {e.step: e.value for e in acc.Scalars("charts/learner_updates")}
        lag = [e.value for e in acc.Scalars("charts/parameter_lag") if updates.get(e.step, 0) > 0]
        return acc.Scalars("charts/learner_updates")[-1].value, np.mean(lag)

    trained_per_update = 16 * 8  # SMALL: --batch-size 16, --sequence-length 8, --learning-starts 1000
    asked = 32 * (3000 - 1000) / trained_per_update  # updates at a replay ratio of 32
    (tmp_path / "0").mkdir()
    (tmp_path / "2").mkdir()
    updates, lag = final_updates("--min-replay-ratio", "32")
    assert updates >= 0.95 * asked
    # the actors resume from each wait with the newest weights: ~500 updates in ~2 refreshes of
    # 400 actor steps each would otherwise leave them hundreds of updates behind
    assert lag < 30, lag
    assert final_updates()[0] < 0.8 * asked  # without it the actors finish first (else this test shows nothing)


def test_a_stopped_learner_stops_the_actors_at_its_allowance(tmp_path):
    """The rate limit holds whatever the learner is doing: with the learner process frozen
    (SIGSTOP: what a stall in an update or a long wait looks like to the actors), the actors take
    no step past the allowance it set after its last update (``allowed_steps``, at most one
    batched step of each actor over). Before, the learner set a behind flag between its updates,
    and actors that had last seen it clear ran on for as long as the learner was away."""
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "10000000",
                 "--min-replay-ratio", "4", "--eval-episodes", "0", *SMALL)  # SMALL: --replay-ratio 4
    try:
        while True:  # learning: the allowance follows the updates
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            match = re.match(r"step [\d,]+: SPS \d+, updates ([\d,]+)", line)
            if match and int(match.group(1).replace(",", "")) >= 20:
                break
        steps_file = next(f for f in shm_segments_of(proc.pid) if f.endswith("_actor_steps"))
        allowed_file = next(f for f in shm_segments_of(proc.pid) if f.endswith("_allowed_steps"))
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.5)  # the steps in flight land
        before = int(np.fromfile(steps_file, dtype=np.int64).sum())
        time.sleep(3.0)
        after = int(np.fromfile(steps_file, dtype=np.int64).sum())
        allowed = float(np.fromfile(allowed_file, dtype=np.float64)[0])
        os.kill(proc.pid, signal.SIGCONT)
        assert after <= allowed + 2 * 2, (after, allowed)  # 2 actors x 2 envs: one batched step each
        assert after - before <= 2 * 2, (before, after)  # stopped, not merely slowed
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGINT)
    wait_clean(proc, timeout=60)


def test_publish_takes_over_a_weights_lock_whose_holder_died():
    """An actor SIGKILLed while it copies the weights leaves the weights lock taken for good; the
    learner's next publication, which can come before it sees the death, must not wait forever
    (it did: a run hung for an hour at ``publish``, found after a test timed out). Here the lock
    is taken and never released, as the dead actor leaves it."""
    import threading

    import r2d2_algo.r2d2_mp as r2d2_mp

    lock = std_mp.get_context("spawn").Lock()
    lock.acquire()  # the dead holder's
    net = torch.nn.Linear(3, 2)
    weights, version = np.zeros(8, dtype=np.float32), np.array([-1])
    done = threading.Event()
    worker = threading.Thread(target=lambda: (r2d2_mp.publish(net, weights, version, lock, 5), done.set()),
                              daemon=True)
    worker.start()
    assert done.wait(timeout=10), "publish waited forever on the dead holder's lock"
    assert version[0] == 5 and np.allclose(weights, torch.nn.utils.parameters_to_vector(net.parameters()).detach())
    assert lock.acquire(timeout=0)  # released after the publication: the actors can read again


def test_short_pong_run_of_the_atari_fast_preset(tmp_path):
    """The sample-efficient Atari setting (--preset atari_fast, its own network: the paper's) on
    Pong for 3,000 steps: it starts, learns at its fixed replay ratio of 2 (the actor waits for the
    learner: about one update of 16 × 20 trained steps per 160 steps added), evaluates, stops clean."""
    proc = start(tmp_path, "--env-id", "PongNoFrameskip-v4", "--preset", "atari_fast", "--num-actors", "1",
                 "--num-envs-per-actor", "8", "--total-timesteps", "3000", "--eval-interval", "3000",
                 "--eval-episodes", "1", "--log-interval", "1000", "--no-progress-bar")
    out, err = wait_clean(proc, timeout=300)
    assert proc.returncode == 0, err
    assert out.startswith("preset atari_fast (--preset") and "replay_ratio=2, min_replay_ratio=2" in out.splitlines()[0]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    updates = acc.Scalars("charts/learner_updates")[-1].value
    trained_per_added = updates * 16 * 20 / (3000 - 300)  # learning starts at a tenth of the steps
    assert updates >= 16 and 1.8 <= trained_per_added <= 2.6, (updates, trained_per_added)  # 2,700 × 2 / 320 ≈ 17
    assert 1.4 <= acc.Scalars("replay/replay_ratio")[-1].value <= 2.6
    assert np.isfinite(acc.Scalars("losses/td_loss")[-1].value)
    assert -21 <= acc.Scalars("eval/episodic_return")[-1].value <= 21


def test_checkpoint_after_sigkill_resumes_the_run(tmp_path):
    """SIGKILL the learner after its second checkpoint (what the OOM killer does): the actors and
    the evaluator go with it, its shared memory and semaphores are released without a warning
    that reads like a leak (multiprocessing's resource tracker cleans up quietly), and --resume
    continues the counters and the tensorboard run."""
    args = ["--env-id", "CartPole-v1", "--num-actors", "1", "--total-timesteps", "9000", "--checkpoint-interval",
            "2500", "--eval-episodes", "2", "--save-model", *SMALL]
    shm_before = set(os.listdir("/dev/shm"))
    proc = start(tmp_path, *args)
    lines = []
    while sum("checkpoint written" in line for line in lines) < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines) + proc.stderr.read()
        lines.append(line)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)  # to its end: the children and the tracker hold stderr too
    deadline = time.time() + 20
    while (descendants(proc.pid) or set(os.listdir("/dev/shm")) - shm_before) and time.time() < deadline:
        time.sleep(0.2)
    assert not descendants(proc.pid) and not set(os.listdir("/dev/shm")) - shm_before
    assert "leaked" not in err and "resource_tracker" not in err, err
    saved = torch.load(glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))[0], weights_only=True)
    assert saved["progress"]["global_step"] >= 5000 and saved["progress"]["updates"] > 0

    (checkpoint_dir,) = glob.glob(str(tmp_path / "saved_checkpoints" / "*"))
    resumed = start(tmp_path, "--resume", checkpoint_dir)
    out, err = wait_clean(resumed, timeout=300)
    assert resumed.returncode == 0, err
    assert f"from step {saved['progress']['global_step']:,}" in out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))  # the same tensorboard run continues
    acc = EventAccumulator(run_dir)
    acc.Reload()
    updates = [e.value for e in acc.Scalars("charts/learner_updates")]
    assert updates[-1] > saved["progress"]["updates"]
    steps = [e.step for e in acc.Scalars("charts/learner_updates")]
    assert steps == sorted(steps) and steps[-1] >= 9000
    assert acc.Scalars("eval/episodic_return")[-1].step >= 9000
    assert glob.glob(str(tmp_path / "saved_models" / "*" / "model.pt"))


def test_sigterm_to_the_group_writes_a_last_checkpoint(tmp_path):
    """A SIGTERM to the whole process group (what `kill -- -PGID`, systemd or docker send):
    the actors ignore it, the learner pauses them, writes a checkpoint and cleans up."""
    proc = start(tmp_path, "--env-id", "CartPole-v1", "--num-actors", "2", "--total-timesteps", "10000000",
                 "--checkpoint-interval", "100000000", *SMALL)
    wait_for_output(proc, tmp_path, "runs/*")
    time.sleep(3.0)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = wait_clean(proc, timeout=60)
    assert proc.returncode == 143, err
    assert "checkpoint written" in out and "--resume saved_checkpoints/" in err
    saved = torch.load(glob.glob(str(tmp_path / "saved_checkpoints" / "*" / "checkpoint.pt"))[0], weights_only=True)
    assert saved["progress"]["global_step"] > 0
    assert saved["actor_steps"].sum() == saved["progress"]["global_step"]
