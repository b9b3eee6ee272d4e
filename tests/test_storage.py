"""SequenceReplayBuffer and SumTree against brute-force references."""

import numpy as np
import pytest
from scipy import stats

from r2d2_algo.storage import SequenceReplayBuffer, SumTree, later_state_offsets, sequence_priorities

L, M, N, OVERLAP = 3, 6, 2, 2  # burn-in, sequence length, n-step, overlap -> period 4, window 11


def make_buffer(num_streams=3, capacity=3 * 24, state_size=2, obs_shape=(2,), **kwargs):
    return SequenceReplayBuffer(num_streams, capacity, obs_shape, np.float32, state_size, L, M, N, OVERLAP, **kwargs)


class Reference:
    """Keeps every step ever written, per stream, in plain Python lists."""

    def __init__(self, num_streams):
        self.steps = [[] for _ in range(num_streams)]

    def add(self, e, **step):
        self.steps[e].append(step)


def fill(rb, ref, num_steps, rng, streams_per_call=None):
    """Write random steps (episodes of random length, some truncated) to rb and ref."""
    E = rb.num_streams
    first = np.ones(E, dtype=bool)
    for _ in range(num_steps):
        streams = np.arange(E) if streams_per_call is None else rng.choice(E, streams_per_call, replace=False)
        K = len(streams)
        obs = rng.normal(size=(K, *rb.obs_shape)).astype(np.float32)
        action = rng.integers(0, 4, K)
        reward = rng.normal(size=K).astype(np.float32)
        end = rng.random(K) < 0.1
        terminated = end & (rng.random(K) < 0.5)
        truncated = end & ~terminated
        state = rng.normal(size=(K, rb.state_size)).astype(np.float32)
        rb.add(obs, action, reward, first[streams], terminated, truncated, state, streams=streams)
        for j, e in enumerate(streams):
            ref.add(e, obs=obs[j], action=action[j], reward=reward[j], first=first[e], terminated=terminated[j],
                    truncated=truncated[j], state=state[j])
        first[streams] = terminated | truncated


def check_window(rb, ref, batch, b, stream):
    k = batch.sequence_ids[b]
    P, W = rb.period, rb.window_length
    window = ref.steps[stream][k * P : k * P + W]
    assert len(window) == W, "window extends past what was written"
    np.testing.assert_array_equal(batch.obs[:, b], np.stack([s["obs"] for s in window]))
    np.testing.assert_array_equal(batch.action[:, b], [s["action"] for s in window])
    np.testing.assert_array_equal(batch.reward[:, b], [s["reward"] for s in window])
    np.testing.assert_array_equal(batch.first[:, b], [s["first"] for s in window])
    np.testing.assert_array_equal(batch.terminated[:, b], [s["terminated"] for s in window])
    np.testing.assert_array_equal(batch.truncated[:, b], [s["truncated"] for s in window])
    np.testing.assert_array_equal(batch.initial_state[b], window[0]["state"])
    for j, offset in enumerate(batch.later_state_offsets):  # the actor's states of later sequence starts
        np.testing.assert_array_equal(batch.later_states[j, b], window[offset]["state"])
    # previous action / reward: from the step before, none (-1, 0) at an episode start
    for t in range(W):
        if window[t]["first"] or (t == 0 and k * P == 0):
            expected = (-1, 0.0)
        else:
            prev = ref.steps[stream][k * P + t - 1]
            expected = (prev["action"], prev["reward"])
        assert (batch.prev_action[t, b], batch.prev_reward[t, b]) == expected


@pytest.mark.parametrize("streams_per_call", [None, 1, 2])
def test_windows_equal_reference_after_many_wraparounds(streams_per_call):
    rng = np.random.default_rng(0)
    rb = make_buffer()
    ref = Reference(rb.num_streams)
    assert rb.capacity_per_stream == 24 and rb.window_length == 11 and rb.period == 4
    assert rb.later_state_offsets == (4, 8)  # the later starts in the trained part [3, 9)
    for _ in range(12):  # each round writes ~60 steps per stream: > 2 wrap-arounds per round
        fill(rb, ref, 60 if streams_per_call is None else 90, rng, streams_per_call)
        batch = rb.sample(32, rng)
        streams = batch.indices // rb.slots_per_stream
        for b in range(32):
            check_window(rb, ref, batch, b, streams[b])
    assert rb.write_count.min() > 10 * rb.capacity_per_stream


def valid_reference(rb):
    """Brute force: sequences whose whole window is written and whose first needed step is
    more than overwrite_margin steps from being overwritten."""
    valid = set()
    for e in range(rb.num_streams):
        written = int(rb.write_count[e])
        for k in range(written // rb.period + 1):
            start = k * rb.period
            oldest_kept = written - rb.capacity_per_stream + rb.overwrite_margin
            if start + rb.window_length <= written and start - rb.history_length >= oldest_kept:
                valid.add((e, k))
    return valid


@pytest.mark.parametrize("margin", [0, 3, 9])
def test_validity_at_the_write_head_after_every_step(margin):
    rng = np.random.default_rng(1)
    rb = make_buffer(overwrite_margin=margin, capacity=3 * 24)
    ref = Reference(rb.num_streams)
    for _ in range(150):
        fill(rb, ref, 1, rng, streams_per_call=2)
        ids = rb.sequence_id
        got = {(e, int(ids[e, s])) for e in range(rb.num_streams) for s in range(rb.slots_per_stream) if ids[e, s] >= 0}
        assert got == valid_reference(rb)
        leaves = rb.tree.get(np.arange(rb.num_streams * rb.slots_per_stream)).reshape(ids.shape)
        np.testing.assert_array_equal(leaves > 0, ids >= 0)  # only valid sequences can be drawn


def test_learner_index_follows_a_separate_writer_in_bulk():
    """A writer without index (an actor) shares the arrays; the learner's sync, however late,
    gives the same sampleable set as brute force."""
    rng = np.random.default_rng(11)
    learner = make_buffer(overwrite_margin=4)
    shared = {"obs": learner.obs, "action": learner.action, "reward": learner.reward, "first": learner.first,
              "terminated": learner.terminated, "truncated": learner.truncated,
              "stored_state": learner.stored_state, "start_prev_action": learner.start_prev_action,
              "start_prev_reward": learner.start_prev_reward, "write_count": learner.write_count}
    writer = make_buffer(overwrite_margin=4, index=False, allocate=lambda name, shape, dtype: shared[name])
    ref = Reference(learner.num_streams)
    for burst in [1, 2, 5, 13, 30, 1, 70, 3]:
        fill(writer, ref, burst, rng, streams_per_call=2)
        learner.sync()
        got = {(e, int(k)) for e in range(learner.num_streams) for k in learner.sequence_id[e] if k >= 0}
        assert got == valid_reference(learner)
        if not got:
            continue
        batch = learner.sample(16, rng)
        streams = batch.indices // learner.slots_per_stream
        for b in range(16):
            check_window(learner, ref, batch, b, streams[b])


def test_window_overwritten_while_sampled_is_dropped():
    rng = np.random.default_rng(12)
    learner = make_buffer(num_streams=1, capacity=24)
    shared = {name: getattr(learner, name) for name in ["obs", "action", "reward", "first", "terminated",
              "truncated", "stored_state", "start_prev_action", "start_prev_reward", "write_count"]}
    writer = make_buffer(num_streams=1, capacity=24, index=False, allocate=lambda name, shape, dtype: shared[name])
    ref = Reference(1)
    fill(writer, ref, 40, rng)
    learner.sync()
    fill(writer, ref, 24, rng)  # the writer laps the ring before the learner syncs again
    batch = learner.sample(8, rng)
    assert np.all(batch.weights == 0) and np.all(batch.sequence_ids == -1)
    before = learner.tree.get(batch.indices).copy()
    learner.update_priorities(batch.indices, batch.sequence_ids, np.full(8, 50.0))
    np.testing.assert_array_equal(learner.tree.get(batch.indices), before)  # no update for them


class ReadHook(np.ndarray):
    """An array that runs ``after_read`` (once) right after a read of it has been taken."""

    def __getitem__(self, key):
        value = np.array(super().__getitem__(key))
        hook = getattr(self, "after_read", None)
        if hook is not None:
            self.after_read = None
            hook()
        return value


def test_a_window_that_passes_the_overwrite_check_was_read_whole_before_it():
    """A writer in another process laps the ring right after the learner has checked whether the
    windows it copied were overwritten: every window that passes the check must hold what was
    there before (all of it, end flags included), never the lap's steps."""
    rng = np.random.default_rng(5)
    learner = make_buffer(num_streams=1, capacity=24)
    shared = {name: getattr(learner, name) for name in SequenceReplayBuffer.SHARED_ARRAYS}
    writer = make_buffer(num_streams=1, capacity=24, index=False, allocate=lambda name, shape, dtype: shared[name])
    ref = Reference(1)
    fill(writer, ref, 40, rng)
    learner.sync()
    learner.write_count = learner.write_count.view(ReadHook)

    def lap():  # one ring's worth of steps, every one of them ending an episode
        for _ in range(learner.capacity_per_stream):
            writer.add(np.full((1, 2), -1.0, np.float32), np.zeros(1, int), np.zeros(1, np.float32), np.ones(1, bool),
                       np.ones(1, bool), np.ones(1, bool), np.zeros((1, 2), np.float32))

    learner.write_count.after_read = lap
    batch = learner.sample(8, rng)
    assert learner.write_count.after_read is None  # the lap happened, after the check's read
    assert (batch.sequence_ids >= 0).all()  # the check saw the count from before the lap
    for b in range(8):
        check_window(learner, ref, batch, b, 0)


@pytest.mark.parametrize("margin, frame_stack", [(0, 1), (3, 1), (0, 2)])
def test_sampleable_fraction_counts_the_steps_inside_sampleable_windows(margin, frame_stack):
    """Against brute force: the steps covered by the windows the index holds, ÷ steps held."""
    rng = np.random.default_rng(margin)
    shape = (frame_stack, 2) if frame_stack > 1 else (2,)
    rb = make_buffer(num_streams=3, capacity=3 * 40, overwrite_margin=margin, obs_shape=shape, frame_stack=frame_stack)
    for _ in range(150):
        steps = rng.integers(0, 3, 3)
        for e in range(3):
            for _ in range(steps[e]):
                rb.add(np.zeros((1, *shape), np.float32), [0], [0.0], [False], [False], [False], np.zeros((1, 2)),
                       streams=[e])
        covered = 0
        for e in range(3):
            steps_in_windows = set()
            for k in rb.sequence_id[e][rb.sequence_id[e] >= 0]:
                steps_in_windows.update(range(k * rb.period, k * rb.period + rb.window_length))
            covered += len(steps_in_windows)
        assert rb.sampleable_fraction() == pytest.approx(covered / max(rb.size, 1))


def test_a_window_whose_first_step_is_being_overwritten_is_dropped():
    """A writer in another process that has begun writing step n (its stored state goes first) but
    not yet counted it overwrites step n − capacity: the window starting there must be dropped,
    not returned with the new step's stored state."""
    rng = np.random.default_rng(4)
    learner = make_buffer(num_streams=1, capacity=24, overwrite_margin=1)  # shared with a writer process
    shared = {name: getattr(learner, name) for name in SequenceReplayBuffer.SHARED_ARRAYS}
    writer = make_buffer(num_streams=1, capacity=24, overwrite_margin=1, index=False,
                         allocate=lambda name, shape, dtype: shared[name])
    ref = Reference(1)
    fill(writer, ref, 39, rng)
    learner.sync()
    k = (40 - learner.capacity_per_stream) // learner.period  # starts at step 16 = 40 − capacity
    assert k in learner.sequence_id[0]
    fill(writer, ref, 1, rng)  # the writer goes on: 40 steps, then begins step 40 in sequence k's slot
    learner.stored_state[0, (40 // learner.period) % learner.slots_per_stream] = 99.0
    drawn = 0
    for _ in range(50):
        batch = learner.sample(8, rng)
        for b in np.flatnonzero(learner.sequence_id[0, batch.indices % learner.slots_per_stream] == k):
            drawn += 1
            assert batch.sequence_ids[b] == -1 and batch.weights[b] == 0
    assert drawn > 0


def test_never_samples_a_window_partly_overwritten():
    rng = np.random.default_rng(2)
    rb = make_buffer(num_streams=1, capacity=16)  # 16 = window 11 + room for one more period
    ref = Reference(1)
    for _ in range(300):
        fill(rb, ref, 1, rng)
        if rb.num_valid_sequences:
            batch = rb.sample(8, rng)
            start = batch.sequence_ids * rb.period
            written = rb.write_count[0]
            assert np.all(start >= written - rb.capacity_per_stream)
            assert np.all(start + rb.window_length <= written)
            for b in range(8):
                check_window(rb, ref, batch, b, 0)


def set_random_priorities(rb, rng, low, high):
    """Give every valid sequence a uniform random priority; return (leaves, priorities)."""
    leaves = np.flatnonzero(rb.sequence_id.flatten() >= 0)
    priorities = rng.uniform(low, high, len(leaves))
    streams, slots = np.divmod(leaves, rb.slots_per_stream)
    rb.update_priorities(leaves, rb.sequence_id[streams, slots], priorities)
    return leaves, priorities


def test_sampling_frequencies_follow_priority_to_the_alpha():
    rng = np.random.default_rng(3)
    alpha = 0.7
    rb = make_buffer(priority_exponent=alpha)
    fill(rb, Reference(rb.num_streams), 100, rng)
    leaves, priorities = set_random_priorities(rb, rng, 0.1, 5.0)
    draws = np.concatenate([rb.sample(64, rng).indices for _ in range(2000)])
    observed = np.array([(draws == leaf).sum() for leaf in leaves])
    assert observed.sum() == len(draws)  # nothing else was ever drawn
    p_alpha = (priorities + rb.PRIORITY_EPSILON) ** alpha
    expected = len(draws) * p_alpha / p_alpha.sum()
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3
    # and the test would notice sampling ∝ p instead of p^α
    wrong = len(draws) * priorities / priorities.sum()
    assert stats.chisquare(observed, wrong)[1] < 1e-6


def test_importance_weights_and_probabilities():
    rng = np.random.default_rng(4)
    beta = 0.6
    rb = make_buffer(importance_sampling_exponent=beta)
    fill(rb, Reference(rb.num_streams), 80, rng)
    leaves, priorities = set_random_priorities(rb, rng, 0.0, 3.0)
    batch = rb.sample(16, rng)
    p_alpha = (priorities + rb.PRIORITY_EPSILON) ** rb.priority_exponent
    prob = dict(zip(leaves, p_alpha / p_alpha.sum()))
    expected_p = np.array([prob[i] for i in batch.indices])
    np.testing.assert_allclose(batch.probabilities, expected_p, rtol=1e-12)
    w = (len(leaves) * expected_p) ** (-beta)
    np.testing.assert_allclose(batch.weights, w / w.max(), rtol=1e-6)
    assert batch.weights.max() == pytest.approx(1.0)


def test_priority_updates_skip_overwritten_sequences_and_track_max():
    rng = np.random.default_rng(5)
    rb = make_buffer(num_streams=1, capacity=24)
    ref = Reference(1)
    fill(rb, ref, 40, rng)
    batch = rb.sample(4, rng)
    fill(rb, ref, 24, rng)  # one full wrap: every sampled window is gone
    rb.update_priorities(batch.indices, batch.sequence_ids, np.full(4, 100.0))
    assert rb.max_priority == 1.0  # stale update ignored entirely
    assert np.all(rb.tree.get(batch.indices[rb.sequence_id[0, batch.indices] >= 0]) <= 1.0)
    batch = rb.sample(4, rng)
    rb.update_priorities(batch.indices, batch.sequence_ids, np.array([0.5, 2.0, 0.25, 3.0]))
    assert rb.max_priority == pytest.approx(3.0 + rb.PRIORITY_EPSILON)
    # a new sequence enters with the running maximum
    fill(rb, ref, rb.period, rng)
    newest = rb.sequence_id[0].argmax()
    assert rb.tree.get([newest])[0] == pytest.approx(rb.max_priority**rb.priority_exponent)


def test_sample_from_empty_buffer_raises():
    rb = make_buffer()
    with pytest.raises(RuntimeError, match="no complete sequence"):
        rb.sample(4, np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(capacity=3 * 10), "smaller than one window"),
        (dict(burn_in_length=-1), "burn_in_length"),
        (dict(sequence_length=0), "sequence_length"),
        (dict(n_step=0), "n_step"),
        (dict(overlap=6), "overlap"),
        (dict(overlap=-1), "overlap"),
        (dict(num_streams=0), "num_streams"),
        (dict(priority_exponent=1.5), "priority_exponent"),
        (dict(importance_sampling_exponent=-0.1), "importance_sampling_exponent"),
        (dict(overwrite_margin=-1), "overwrite_margin"),
        (dict(capacity=3 * 12, overwrite_margin=4), "plus an overwrite margin of 4"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(num_streams=3, capacity=72, obs_shape=(2,), obs_dtype=np.float32, state_size=2, burn_in_length=L,
                sequence_length=M, n_step=N, overlap=OVERLAP)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SequenceReplayBuffer(**args)


def test_bad_priorities_raise_value_error():
    rb = make_buffer()
    fill(rb, Reference(rb.num_streams), 30, np.random.default_rng(6))
    batch = rb.sample(2, np.random.default_rng(0))
    for bad in ([-1.0, 1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="priorities"):
            rb.update_priorities(batch.indices, batch.sequence_ids, np.array(bad))


def test_sum_tree_find_matches_cumulative_sum():
    rng = np.random.default_rng(7)
    tree = SumTree(37)
    values = rng.uniform(0, 2, 37)
    values[rng.random(37) < 0.3] = 0.0
    tree.set(np.arange(37), values)
    assert tree.total == pytest.approx(values.sum())
    queries = rng.uniform(0, tree.total, 10_000)
    expected = np.searchsorted(np.cumsum(values), queries, side="right")
    np.testing.assert_array_equal(tree.find(queries), expected)
    assert np.all(values[tree.find(np.array([0.0, np.nextafter(tree.total, 0)]))] > 0)


def test_sum_tree_duplicate_updates_last_wins():
    tree = SumTree(4)
    tree.set(np.array([1, 1, 2]), np.array([5.0, 3.0, 1.0]))
    assert tree.get([1])[0] == 3.0 and tree.total == 4.0


def test_sequence_priorities_match_brute_force():
    rng = np.random.default_rng(8)
    abs_td = rng.uniform(0, 3, (7, 5))
    mask = rng.random((7, 5)) < 0.7
    mask[:, 0] = False  # no valid step: priority 0
    eta = 0.9
    got = sequence_priorities(abs_td, mask, eta)
    for b in range(5):
        valid = abs_td[mask[:, b], b]
        expected = 0.0 if len(valid) == 0 else eta * valid.max() + (1 - eta) * valid.mean()
        assert got[b] == pytest.approx(expected)


def test_images_stored_once_as_uint8():
    rb = SequenceReplayBuffer(2, 2 * 40, (4, 84, 84), np.uint8, 8, L, M, N, OVERLAP)
    assert rb.obs.dtype == np.uint8 and rb.obs.shape == (2, 40, 4, 84, 84)


def test_frame_stacks_rebuilt_from_single_frames_equal_the_acted_stacks():
    """Only newest frames are stored; stacks rebuilt at sampling time equal what the actor saw
    (zero frames before an episode start), also after many wrap-arounds."""
    import torch

    from r2d2_algo.storage import stack_frames

    rng = np.random.default_rng(9)
    S, E = 4, 2
    rb = SequenceReplayBuffer(E, E * 32, (S, 3, 3), np.uint8, 2, L, M, N, OVERLAP, frame_stack=S)
    assert rb.obs.shape == (E, 32, 3, 3)  # single frames
    acted = [[] for _ in range(E)]  # every stacked observation the actor acted on
    stacks = np.zeros((E, S, 3, 3), dtype=np.uint8)
    first = np.ones(E, dtype=bool)
    for step in range(400):
        frame = rng.integers(1, 255, (E, 3, 3), dtype=np.uint8)
        stacks = np.where(first[:, None, None, None], 0, stacks)
        stacks = np.concatenate([stacks[:, 1:], frame[:, None]], axis=1)
        end = rng.random(E) < 0.15
        rb.add(stacks, rng.integers(0, 3, E), np.zeros(E), first, end, np.zeros(E, bool), np.zeros((E, 2)))
        for e in range(E):
            acted[e].append(stacks[e].copy())
        first = end
        if step > 40 and step % 10 == 0:
            batch = rb.sample(16, rng)
            assert batch.obs.shape == (rb.history_length + rb.window_length, 16, 3, 3)
            rebuilt = stack_frames(torch.as_tensor(batch.obs), torch.as_tensor(batch.frame_first), S).numpy()
            streams = batch.indices // rb.slots_per_stream
            written = rb.write_count[streams]
            for b in range(16):
                start = batch.sequence_ids[b] * rb.period
                assert start - rb.history_length >= written[b] - rb.capacity_per_stream  # history intact
                expected = np.stack(acted[streams[b]][start : start + rb.window_length])
                np.testing.assert_array_equal(rebuilt[:, b], expected)


def test_frame_stack_validity_accounts_for_history():
    rb = SequenceReplayBuffer(1, 16, (4, 2, 2), np.uint8, 0, L, M, N, OVERLAP, frame_stack=4)
    rng = np.random.default_rng(10)
    for _ in range(100):
        rb.add(rng.integers(0, 255, (1, 4, 2, 2), dtype=np.uint8), [0], [0.0], [False], [False], [False],
               np.zeros((1, 0)))
        written = int(rb.write_count[0])
        expected = {k for k in range(written // rb.period + 1)
                    if k * rb.period + rb.window_length <= written
                    and k * rb.period - 3 >= written - rb.capacity_per_stream}
        assert {int(k) for k in rb.sequence_id[0] if k >= 0} == expected


def test_frame_stack_must_fit_the_observation():
    with pytest.raises(ValueError, match="frame_stack 4 does not fit"):
        SequenceReplayBuffer(1, 64, (3, 84, 84), np.uint8, 0, L, M, N, OVERLAP, frame_stack=4)
    with pytest.raises(ValueError, match="plus 3 stacked frames"):
        SequenceReplayBuffer(1, 12, (4, 84, 84), np.uint8, 0, L, M, N, OVERLAP, frame_stack=4)


@pytest.mark.parametrize("burn_in, sequence, overlap, expected", [
    (40, 80, 40, (40, 80)),  # the paper's: the first trained step and the middle one
    (8, 16, 8, (8, 16)),  # this project's defaults
    (10, 40, 20, (20, 40)),  # --preset atari_fast: trained steps 10 and 30
    (8, 16, 0, (16,)),  # one later start inside the trained part
    (0, 16, 0, ()),  # none: windows do not overlap and there is no burn-in
    (2, 12, 9, (3, 12)),  # several inside: the first and the last
])
def test_later_state_offsets_are_the_first_and_last_sequence_starts_in_the_trained_part(burn_in, sequence, overlap,
                                                                                        expected):
    assert later_state_offsets(burn_in, sequence, overlap) == expected
    period = sequence - overlap  # brute force: every start jP (j >= 1) inside [burn_in, burn_in + sequence)
    inside = [j * period for j in range(1, 100) if burn_in <= j * period < burn_in + sequence]
    assert expected == tuple(sorted({inside[0], inside[-1]}) if inside else ())
