"""The replay of r2d2_ray.py, in shards: how steps go from the actors to the shards and batches
from the shards to the learner.

- ``ReplayShard``, a Ray actor, holds one SequenceReplayBuffer (storage.py) for the streams of
  its actors: actor i writes to shard i mod S (``shard_of``), its env j to stream
  (i div S)·E + j there. It adds blocks of steps, samples batches, updates priorities, cuts the
  streams of a restarted actor, and counts its steps against ``quota``, its share of
  --total-timesteps (``shard_quotas``), and against the learner's allowance (--min-replay-ratio).
- ``ShardWriter`` is an actor's side: EnvActor writes its steps there as to a replay, and they
  go to the shard in blocks of --actor-push-interval actor steps, at most 2 blocks in flight.
- ``ShardedReplay`` is the learner's side: the shards' counts, polled 20 times a second, batches
  with at most --samples-in-flight requests out, drawn from a shard with probability ∝ its sum
  of priorities^α (so each sequence is drawn with p_i^α / Σ_all p^α, as from one replay), the
  priorities sent back, the allowances, and the shards' states for a checkpoint. It reads like
  one SequenceReplayBuffer where the learner logs it (size, num_sequences_added, max_priority,
  num_valid_sequences). A shard Ray rebuilt after its node was lost answers from a new
  incarnation (ray_start.incarnation): its counts stay as they were until ``refill`` gives it its
  state back, and ``steps`` goes on counting what it held (``offsets``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import ray

from r2d2_algo.checkpoint import from_storable, load_checkpoint
from r2d2_algo.ray_start import incarnation, restarted
from r2d2_algo.storage import SequenceBatch, SequenceReplayBuffer


def shard_of(actor_id: int, args) -> tuple[int, np.ndarray]:
    """Actor ``actor_id``'s replay shard and its streams there (E,) int64 (E = --num-envs-per-actor)."""
    E = args.num_envs_per_actor
    return actor_id % args.num_replay_shards, (actor_id // args.num_replay_shards) * E + np.arange(E)


def actors_of_shard(shard: int, args) -> int:
    return len(range(shard, args.num_actors, args.num_replay_shards))


def shard_quotas(args) -> list[int]:
    """Each shard's share of --total-timesteps: its actors' share, rounded up."""
    return [-(-args.total_timesteps * actors_of_shard(i, args) // args.num_actors)
            for i in range(args.num_replay_shards)]


def shard_arguments(args, observation_space, state_size: int, frame_stack: int) -> list[dict]:
    """SequenceReplayBuffer arguments of each shard: its actors' streams and its share of
    --buffer-size. A shard is its streams' only writer, so it needs no overwrite margin."""
    return [dict(
        num_streams=actors_of_shard(i, args) * args.num_envs_per_actor, capacity=args.buffer_size // args.num_replay_shards,
        obs_shape=observation_space.shape, obs_dtype=observation_space.dtype, state_size=state_size,
        burn_in_length=args.burn_in_length, sequence_length=args.sequence_length, n_step=args.n_step,
        overlap=args.overlap, priority_exponent=args.priority_exponent,
        importance_sampling_exponent=args.importance_sampling_exponent, frame_stack=frame_stack)
        for i in range(args.num_replay_shards)]


class ReplayShard:
    """A Ray actor holding one SequenceReplayBuffer: actors push blocks of steps, the learner
    samples batches and sends priorities back. Its memory is allocated, and stated, at start.
    Ray restarts a shard lost with its node, empty; the learner then loads it from the last
    checkpoint, if any (``load``). ``quota``: its share of --total-timesteps; once it holds that
    many steps, its actors stop acting (``add_block`` says so), so that the run ends at its
    total even while the learner is slow to see it. It is also the rate limiter of
    --min-replay-ratio, as a Reverb table's: the learner raises its allowance (``allow``) after each
    update, and ``add_block`` tells an actor past it to wait (on the param store), so a learner
    that makes no update stops the actors within a push, whatever it is doing."""

    def __init__(self, replay_kwargs: dict, seed: int, quota: int):
        self.replay = SequenceReplayBuffer(**replay_kwargs)
        self.quota = quota
        self.allowed = 0.0  # the steps it may hold (--min-replay-ratio): none until the learner says
        self.rng = np.random.default_rng(seed)
        self.steps, self.episodes, self.versions = 0, [], {}
        self.nbytes = SequenceReplayBuffer.shared_nbytes(**replay_kwargs)
        # the next step of the stream starts an episode; all of them in a shard rebuilt after a lost node
        self.cut = np.full(self.replay.num_streams, restarted())
        self.where = incarnation()

    @ray.method(concurrency_group="where")
    def node(self) -> tuple[str, str, int]:
        return (*self.where, self.nbytes)

    def add_block(self, block: list[tuple], episodes: list[tuple[float, int]], actor_id: int,
                  version: int) -> tuple[bool, bool, int]:
        """Append an actor's steps; ``version``: the params it acts with (for the parameter lag). The
        first step of a stream cut by ``load`` is written as an episode start (its old episode ended
        there, at the checkpoint, with a time-limit mark). Returns whether the shard wants more
        steps (it holds fewer than its quota), whether the learner allows more (``allow``), and the
        steps it holds (its count: see ``load``)."""
        self.versions[actor_id] = version
        for obs, action, reward, first, terminated, truncated, state, streams in block:  # in order
            if self.cut[streams].any():
                first = first | self.cut[streams]
                self.cut[streams] = False
            self.replay.add(obs, action, reward, first, terminated, truncated, state, streams)
            self.steps += len(streams)
        self.episodes.extend(episodes)
        return self.steps < self.quota, self.steps < self.allowed, self.steps

    def cut_streams(self, streams: np.ndarray | None = None) -> None:
        self.replay.cut_streams(streams)

    def allow(self, steps: float) -> None:
        """The steps it may hold before its actors wait for the learner (float("inf"): no limit)."""
        self.allowed = steps

    def set_quota(self, quota: int) -> None:
        """A rebuilt shard counts its steps again from what it holds: its quota follows."""
        self.quota = quota

    def state(self, include_replay: bool) -> dict:
        """For a checkpoint: the step count, the sampling RNG and (``include_replay``) the replay
        with its priorities (Ray serializes the arrays when it returns them: a copy)."""
        return {"steps": self.steps, "rng": self.rng.bit_generator.state,
                "replay": self.replay.state_dict() if include_replay else None, "where": self.where}

    def load(self, state: dict) -> None:
        """Inverse of ``state``; the streams are cut (the actors start new episodes).

        Raises:
            ValueError: a replay of other arguments."""
        self.steps, self.rng.bit_generator.state = state["steps"], state["rng"]
        if state["replay"] is not None:
            self.replay.load_state_dict(state["replay"])
            self.replay.cut_streams()
            self.cut = self.replay.write_count > 0

    def sample(self, batch_size: int) -> SequenceBatch | None:
        return self.replay.sample(batch_size, self.rng) if self.replay.num_valid_sequences else None

    def update_priorities(self, indices: np.ndarray, sequence_ids: np.ndarray, priorities: np.ndarray) -> None:
        self.replay.update_priorities(indices, sequence_ids, priorities)

    def stats(self) -> dict:
        """Counters for the learner, and the episodes finished since the last call."""
        episodes, self.episodes = self.episodes, []
        return {"steps": self.steps, "size": self.replay.size, "added": self.replay.num_sequences_added,
                "max_priority": self.replay.max_priority, "valid": self.replay.num_valid_sequences,
                "priority_total": float(self.replay.tree.total),
                "episodes": episodes, "versions": dict(self.versions), "where": self.where}


class ShardWriter:
    """An actor's side of its replay shard (a Ray actor handle): EnvActor writes steps here as to a
    replay (``add``), the actor appends the episodes that ended to ``episodes``, and ``push``
    sends both to the shard as one block. Atari observations keep their newest frame only (the
    shard stores single frames)."""

    def __init__(self, shard, actor_id: int, frame_stack: int):
        self.shard, self.actor_id, self.frame_stack = shard, actor_id, frame_stack
        self.steps, self.episodes, self.pushes = [], [], []

    def add(self, obs, action, reward, first, terminated, truncated, state, streams) -> None:
        if self.frame_stack > 1:
            obs = obs[:, -1:]  # SequenceReplayBuffer.add keeps obs[:, -1]
        # EnvActor passes arrays it does not keep (fancy-indexed copies, the env's fresh outputs)
        self.steps.append((obs, action, reward, first, terminated, truncated, state, streams))

    def answers(self) -> tuple[bool, int | None]:
        """What the shard answered to the pushes out, waiting first while 2 are: (whether it wants
        more steps: it holds fewer than its share of the run's; the steps it holds if the learner
        allows it no more (--min-replay-ratio), else None)."""
        if not self.pushes:
            return True, None
        if len(self.pushes) >= 2:  # a bound on the pushes in flight
            ray.wait(self.pushes, num_returns=1)
        answered, self.pushes = ray.wait(self.pushes, num_returns=len(self.pushes), timeout=0)
        replies = ray.get(answered)
        wants_more = all(wants for wants, _, _ in replies)
        held = None if all(allowed for _, allowed, _ in replies) else max(steps for _, _, steps in replies)
        return wants_more, held

    def push(self, version: int) -> None:
        """Send the steps and episodes since the last push; ``version``: the params they were acted with."""
        self.pushes.append(self.shard.add_block.remote(self.steps, self.episodes, self.actor_id, version))
        self.steps, self.episodes = [], []


def to_writable(batch: SequenceBatch) -> SequenceBatch:
    """Arrays out of Ray's object store are read-only: copies torch can take."""
    return dataclasses.replace(batch, **{f.name: np.array(getattr(batch, f.name))
                                         for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None})


class ShardedReplay:
    """The learner's side of the replay shards (module docstring).

    Args:
        supervisor: ray_supervisor.Supervisor: the shards (``shards``), where each is (``where``)
            and whether an answer comes from a shard Ray rebuilt (``moved``).
        args: the run's arguments (shard shares and quotas, --seed for the choice of shard).
        states: each shard's checkpoint state (a resumed run), loaded first.
    Raises:
        ray.exceptions.RayTaskError: a state that does not fit its shard (the shard's ValueError inside).
    """

    def __init__(self, supervisor, args, states: list[dict] | None = None):
        self.supervisor, self.shards = supervisor, supervisor.shards
        S = len(self.shards)
        self.shares = [actors_of_shard(i, args) / args.num_actors for i in range(S)]
        self.quotas = shard_quotas(args)
        if states is not None:
            ray.get([shard.load.remote(state) for shard, state in zip(self.shards, states, strict=True)])
        self.stats = ray.get([shard.stats.remote() for shard in self.shards], timeout=600)
        self.offsets = [0] * S  # steps each shard counted before Ray rebuilt it and that it no longer counts
        self.asking, self.asked_at = None, 0.0
        self.samples, self.rng = [], np.random.default_rng(args.seed)  # sample requests out: (shard, reference)
        self.sampled_from = 0  # the shard of the last batch
        self.waiting_since, self.waited_named = None, 0.0

    @property
    def steps(self) -> int:
        """The env steps of the run: what the shards hold, and what rebuilt ones held before."""
        return sum(shard["steps"] + offset for shard, offset in zip(self.stats, self.offsets))

    @property
    def size(self) -> int:
        return sum(shard["size"] for shard in self.stats)

    @property
    def num_sequences_added(self) -> int:
        return sum(shard["added"] for shard in self.stats)

    @property
    def max_priority(self) -> float:
        return max(shard["max_priority"] for shard in self.stats)

    @property
    def num_valid_sequences(self) -> int:
        return sum(shard["valid"] for shard in self.stats)

    @property
    def versions(self) -> list[int]:
        """The params version each actor acted with at its last push."""
        return [v for shard in self.stats for v in shard["versions"].values()]

    def poll(self) -> tuple[list[tuple[float, int]], list[tuple[str, str, str]]]:
        """The shards' new counts, asked for 20 times a second. Returns the episodes finished since
        the last answer, (return, length) each, and (role, old node, new node) of each shard that
        answered from a new incarnation (Ray rebuilt it: ``refill``)."""
        if self.asking is None and time.time() - self.asked_at > 0.05:
            self.asking, self.asked_at = [shard.stats.remote() for shard in self.shards], time.time()
        if self.asking is None or ray.wait(self.asking, num_returns=len(self.asking), timeout=0)[1]:
            return [], []
        asking, self.asking = self.asking, None
        try:
            stats = ray.get(asking)
        except ray.exceptions.RayError:  # a shard lost meanwhile (the supervisor finds it): the last counts stay
            return [], []
        episodes, rebuilt = [], []
        for i, shard in enumerate(stats):
            moved = self.supervisor.moved(f"replay shard {i}", shard["where"])
            if moved:  # Ray rebuilt it and replayed this call there: the old one's counts stay
                rebuilt.append(moved)
            else:
                self.stats[i] = shard
                episodes += shard["episodes"]
        return episodes, rebuilt

    def sample(self, batch_size: int, samples_in_flight: int) -> SequenceBatch | None:
        """The batch of the oldest sample request, or None if it is not answered within 1 s (the
        learner is never blocked for long: stops, losses and faults are seen) or its shard had
        nothing to sample or was lost. Keeps ``samples_in_flight`` requests out; a wait of more
        than 10 s is named on stderr (every 30 s)."""
        totals = np.array([shard["priority_total"] for shard in self.stats])
        while len(self.samples) < samples_in_flight:  # a bound on the sample requests out
            shard = int(self.rng.choice(len(totals), p=totals / totals.sum())) if totals.sum() > 0 else 0
            self.samples.append((shard, self.shards[shard].sample.remote(batch_size)))
        shard, ref = self.samples[0]
        if not ray.wait([ref], timeout=1.0)[0]:
            self.waiting_since = self.waiting_since or time.time()
            if time.time() - self.waiting_since > 10 and time.time() - self.waited_named > 30:
                self.waited_named = time.time()
                print(f"r2d2_ray.py: step {self.steps:,}: the learner has waited "
                      f"{time.time() - self.waiting_since:.0f} s for a batch from replay shard {shard} "
                      f"(node {self.supervisor.where[f'replay shard {shard}'][0]})", file=sys.stderr, flush=True)
            return None
        self.samples.pop(0)
        self.waiting_since = None
        try:
            batch = ray.get(ref)
        except ray.exceptions.RayError:  # lost with its shard (the supervisor rebuilds it): drawn again
            return None
        self.sampled_from = shard
        return to_writable(batch) if batch is not None else None

    def update_priorities(self, indices: np.ndarray, sequence_ids: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities of the batch ``sample`` returned last, to its shard."""
        self.shards[self.sampled_from].update_priorities.remote(indices, sequence_ids, priorities)

    def allowances(self, total: float) -> list[float]:
        """The steps each shard may hold when the run may reach ``total``: its actors' share, in its
        own count (``offsets``)."""
        return [share * total - offset for share, offset in zip(self.shares, self.offsets)]

    def states(self, include_replay: bool) -> tuple[list[dict] | None, list[tuple[str, str, str]]]:
        """Each shard's state for a checkpoint (``ReplayShard.state``), its steps in the run's count;
        a shard answers after the priority updates sent before. A wait of 10 s is named on stderr
        (every 10 s). Returns (None, rebuilt) instead if a shard Ray rebuilt answered, empty:
        (role, old node, new node) of each, to ``refill`` before the states are asked again.

        Raises:
            RuntimeError: a shard did not answer within 600 s.
        """
        refs, since = [shard.state.remote(include_replay) for shard in self.shards], time.time()
        named_at = since
        while len(ray.wait(refs, num_returns=len(refs), timeout=1)[0]) < len(refs):  # never a blind wait
            late = [i for i, ref in enumerate(refs) if not ray.wait([ref], timeout=0)[0]]
            if time.time() - named_at >= 10:  # every 10 s
                named_at = time.time()
                print(f"r2d2_ray.py: the checkpoint has waited {time.time() - since:.0f} s for replay shard(s) "
                      + ", ".join(f"{i} (node {self.supervisor.where[f'replay shard {i}'][0]})" for i in late),
                      file=sys.stderr, flush=True)
            if time.time() - since > 600:
                raise RuntimeError(f"replay shard(s) {late} did not answer within 600 s")
        states = ray.get(refs)
        rebuilt = [moved for i, state in enumerate(states)
                   if (moved := self.supervisor.moved(f"replay shard {i}", state["where"]))]
        if rebuilt:
            return None, rebuilt
        for state, offset in zip(states, self.offsets):
            state["steps"] += offset  # what the run counted for it, restored as its count
        return states, []

    def refill(self, i: int, checkpoint_file: str | None) -> str:
        """Shard ``i``, which Ray rebuilt empty, loads its replay from ``checkpoint_file`` (None, or
        no such file: it stays empty) and counts its steps on from there; the steps it held since
        are counted as before. Returns how it was refilled, for the learner's message."""
        state, what = None, "empty (no checkpoint with a replay to load)"
        if checkpoint_file is not None and os.path.exists(checkpoint_file):
            saved = load_checkpoint(checkpoint_file)
            state = from_storable(saved["replay_shards"][i])
            what = (f"from the checkpoint of step {saved['progress']['global_step']:,} (its steps since are lost, "
                    f"its streams cut there)")
            ray.get(self.shards[i].load.remote(state), timeout=600)
        counted = self.stats[i]["steps"] + self.offsets[i]
        self.offsets[i] = counted - (state["steps"] if state is not None else 0)
        ray.get(self.shards[i].set_quota.remote(self.quotas[i] - self.offsets[i]), timeout=600)
        self.stats[i] = {**self.stats[i], "steps": counted - self.offsets[i], "size": 0, "valid": 0,
                         "priority_total": 0.0, "episodes": []}
        self.asking = None  # asked of the lost shard, maybe: ask again
        return what
