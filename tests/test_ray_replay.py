"""ray_replay.py: which actor writes where, a replay shard's protocol (without Ray), and the two
sides that talk to the shards over an in-process Ray (CPU): an actor's ShardWriter and the
learner's ShardedReplay (counts, batches, priorities, allowances, checkpoint states, refill)."""

import tempfile
import time
import types

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from r2d2_algo.checkpoint import CHECKPOINT_FORMAT, atomic_save, to_storable  # noqa: E402
from r2d2_algo.ray_replay import (  # noqa: E402
    ReplayShard,
    ShardedReplay,
    ShardWriter,
    actors_of_shard,
    shard_arguments,
    shard_of,
    shard_quotas,
)
from r2d2_algo.ray_supervisor import REBUILT  # noqa: E402

SPACE = types.SimpleNamespace(shape=(3,), dtype=np.float32)


def run_args(**changes):
    """The arguments the module reads, for 3 actors × 2 envs on 2 shards."""
    args = dict(num_actors=3, num_replay_shards=2, num_envs_per_actor=2, total_timesteps=1000, buffer_size=4000,
                burn_in_length=2, sequence_length=4, n_step=1, overlap=2, priority_exponent=0.9,
                importance_sampling_exponent=0.6, seed=1)
    return types.SimpleNamespace(**{**args, **changes})


def block(streams, steps: int, start: int = 0) -> list[tuple]:
    """``steps`` steps of ``streams`` as an actor pushes them: (obs, action, reward, first,
    terminated, truncated, state, streams) per step, no episode end."""
    E = len(streams)
    return [(np.full((E, 3), start + t, np.float32), np.zeros(E, np.int64), np.ones(E, np.float32),
             np.full(E, start + t == 0), np.zeros(E, bool), np.zeros(E, bool), np.zeros((E, 8), np.float32),
             np.asarray(streams)) for t in range(steps)]


def test_every_stream_of_a_shard_has_one_actor_and_the_quotas_cover_the_run():
    args = run_args(num_actors=5, num_replay_shards=2, total_timesteps=1001)
    owners = {}
    for actor in range(args.num_actors):
        shard, streams = shard_of(actor, args)
        for stream in streams:
            assert (shard, stream) not in owners
            owners[shard, int(stream)] = actor
    kwargs = shard_arguments(args, SPACE, 8, 1)
    for shard in range(args.num_replay_shards):
        assert sorted(stream for s, stream in owners if s == shard) == list(range(kwargs[shard]["num_streams"]))
        assert kwargs[shard]["num_streams"] == actors_of_shard(shard, args) * args.num_envs_per_actor
        assert kwargs[shard]["capacity"] == args.buffer_size // args.num_replay_shards
    quotas = shard_quotas(args)
    assert quotas == [601, 401] and sum(quotas) >= args.total_timesteps  # 3 and 2 of 5 actors, rounded up


def test_a_shard_counts_its_steps_against_its_quota_and_allowance():
    """Without Ray: ``add_block`` answers (wants more, allowed more, steps held); the streams a
    checkpoint's load cut start an episode at their next step; ``stats`` hands each episode once."""
    args = run_args()
    shard = ReplayShard(shard_arguments(args, SPACE, 8, 1)[0], seed=0, quota=20)
    assert shard.add_block(block([0, 1], 4), [(1.0, 4)], actor_id=0, version=3) == (True, False, 8)  # none allowed
    shard.allow(float("inf"))
    assert shard.add_block(block([2, 3], 6), [], actor_id=2, version=5) == (False, True, 20)  # its quota reached
    assert shard.add_block([], [], 0, 4) == (False, True, 20)
    stats = shard.stats()
    assert stats["steps"] == 20 and stats["episodes"] == [(1.0, 4)] and stats["versions"] == {0: 4, 2: 5}
    assert shard.stats()["episodes"] == []

    state = shard.state(include_replay=True)
    other = ReplayShard(shard_arguments(args, SPACE, 8, 1)[0], seed=5, quota=100)
    other.load(state)
    assert other.steps == 20 and other.cut.all()  # every written stream is cut
    other.add_block(block([0, 1], 1, start=7), [], 0, 6)
    position = (other.replay.write_count[0] - 1) % other.replay.capacity_per_stream
    assert other.replay.first[0, position] and not other.cut[[0, 1]].any() and other.cut[[2, 3]].all()


@pytest.fixture(scope="module")
def local_ray():
    """An in-process Ray (1 CPU), its files in a short temporary folder."""
    with tempfile.TemporaryDirectory(prefix="rr_", dir="/tmp") as folder:
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=folder, configure_logging=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def start_shards(args) -> list:
    return [ray.remote(**REBUILT)(ReplayShard).remote(kwargs, args.seed + i, quota)
            for i, (kwargs, quota) in enumerate(zip(shard_arguments(args, SPACE, 8, 1), shard_quotas(args)))]


def until(condition, timeout: float = 30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # saved, never written
def test_actors_push_to_their_shards_and_the_learner_samples_them(local_ray):
    """Two actors write to two shards through ShardWriter (at most 2 pushes out; a shard past the
    learner's allowance says how many steps it holds); the learner's ShardedReplay counts the run's
    steps and episodes, samples writable batches, sends priorities to the batch's shard, splits
    allowances by the shards' shares, and gives a shard Ray rebuilt its count back (``refill``),
    from a checkpoint or empty."""
    args = run_args(num_actors=2, total_timesteps=10_000)
    shards = start_shards(args)
    roles = {f"replay shard {i}": ("127.0.0.2", "first") for i in range(2)}
    supervisor = types.SimpleNamespace(shards=shards, where=roles, moved=lambda role, where: None)
    writers = [ShardWriter(shards[shard_of(i, args)[0]], i, frame_stack=1) for i in range(2)]
    replay = ShardedReplay(supervisor, args)
    assert replay.steps == 0 and replay.num_valid_sequences == 0
    for i, writer in enumerate(writers):
        for start in (0, 10):
            for step in block(shard_of(i, args)[1], 10, start):
                writer.add(*step)
            writer.episodes.append((float(i), 10))
            writer.push(version=i)
        ray.wait(writer.pushes, num_returns=2)
        assert writer.answers() == (True, 40) and writer.pushes == []  # nothing allowed yet: the steps it holds
    episodes = []
    until(lambda: episodes.extend(replay.poll()[0]) or replay.steps == 80)
    until(lambda: episodes.extend(replay.poll()[0]) or len(episodes) == 4)
    assert sorted(episodes) == [(0.0, 10), (0.0, 10), (1.0, 10), (1.0, 10)] and sorted(replay.versions) == [0, 1]
    assert replay.num_valid_sequences > 0 and replay.size == 80

    batches = []
    until(lambda: batches.append(replay.sample(4, samples_in_flight=2)) or batches[-1] is not None)
    batch = batches[-1]
    assert all(getattr(batch, name).flags.writeable for name in ("obs", "weights", "indices"))
    shard = replay.sampled_from
    before = ray.get(shards[shard].stats.remote())["priority_total"]
    replay.update_priorities(batch.indices, batch.sequence_ids, np.full(4, 100.0, np.float32))
    until(lambda: ray.get(shards[shard].stats.remote())["priority_total"] > before)

    assert replay.allowances(100.0) == [50.0, 50.0]
    states, rebuilt = replay.states(include_replay=True)
    assert rebuilt == [] and [state["steps"] for state in states] == [40, 40]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_file = f"{folder}/checkpoint.pt"
        atomic_save({"format": CHECKPOINT_FORMAT, "progress": {"global_step": 80},
                     "replay_shards": to_storable(states)}, checkpoint_file)
        for step in block(shard_of(0, args)[1], 10, 20):  # 20 more steps in shard 0, lost with it below
            writers[0].add(*step)
        writers[0].push(version=2)
        until(lambda: replay.poll() and replay.steps == 100)
        shards[0] = ray.remote(**REBUILT)(ReplayShard).remote(shard_arguments(args, SPACE, 8, 1)[0], 9, 5000)
        assert replay.refill(0, checkpoint_file).startswith("from the checkpoint of step 80")
        assert replay.steps == 100 and replay.offsets == [20, 0]  # the lost steps still count
        assert ray.get(shards[0].stats.remote())["steps"] == 40 and replay.allowances(100.0) == [30.0, 50.0]
        shards[1] = ray.remote(**REBUILT)(ReplayShard).remote(shard_arguments(args, SPACE, 8, 1)[1], 9, 5000)
        assert replay.refill(1, None) == "empty (no checkpoint with a replay to load)"
        until(lambda: replay.poll() and replay.stats[1]["size"] == 0 and replay.stats[0]["size"] == 40)
        assert replay.steps == 100 and replay.offsets == [20, 40]
        states, _ = replay.states(include_replay=False)
        assert [state["steps"] for state in states] == [60, 40] and states[0]["replay"] is None
    for shard in shards:
        ray.kill(shard)


def test_a_shard_answering_from_a_new_incarnation_is_reported_not_counted(local_ray):
    """A shard whose answer the supervisor calls moved (Ray rebuilt it) keeps its last counts until
    the learner refills it, and is reported once; the checkpoint states are refused meanwhile."""
    args = run_args(num_actors=2, num_replay_shards=1)
    shards = start_shards(args)
    moved = []
    supervisor = types.SimpleNamespace(shards=shards, where={"replay shard 0": ("127.0.0.2", "old")},
                                       moved=lambda role, where: moved.pop() if moved else None)
    replay = ShardedReplay(supervisor, args)
    writer = ShardWriter(shards[0], 0, 1)
    for step in block([0, 1], 5):
        writer.add(*step)
    writer.push(0)
    moved.append(("replay shard 0", "127.0.0.2", "127.0.0.3"))
    rebuilt = []
    until(lambda: rebuilt.extend(replay.poll()[1]) or rebuilt)
    assert rebuilt == [("replay shard 0", "127.0.0.2", "127.0.0.3")] and replay.steps == 0
    moved.append(("replay shard 0", "127.0.0.3", "127.0.0.4"))
    assert replay.states(include_replay=False) == (None, [("replay shard 0", "127.0.0.3", "127.0.0.4")])
    until(lambda: replay.poll() and replay.steps == 10)
    ray.kill(shards[0])
