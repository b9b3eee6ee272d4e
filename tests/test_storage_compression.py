"""Compressed observations (SequenceReplayBuffer(obs_compression=...), r2d2_algo/frame_codec.py)
against the uncompressed replay, bit for bit, and against brute force where they must differ."""

import dataclasses
import threading

import numpy as np
import pytest

from r2d2_algo.checkpoint import _numpy_to_torch, _torch_to_numpy
from r2d2_algo.frame_codec import CompressedFrames, FrameCodec, frames_per_chunk_for
from r2d2_algo.storage import SequenceReplayBuffer, WindowDraw

L, M, N, OVERLAP = 3, 6, 2, 2  # burn-in, sequence length, n-step, overlap -> period 4, window 11
FRAME = (8, 8)


def make(num_streams=3, capacity=3 * 24, frame_stack=4, compression=None, bytes_per_frame=64, frames_per_chunk=0,
         **kwargs):
    shape = (frame_stack, *FRAME) if frame_stack > 1 else FRAME
    extra = {} if compression is None else dict(obs_compression=compression, compressed_bytes_per_frame=bytes_per_frame,
                                                frames_per_chunk=frames_per_chunk)
    return SequenceReplayBuffer(num_streams, capacity, shape, np.uint8, 2, L, M, N, OVERLAP, frame_stack=frame_stack,
                                **extra, **kwargs)


def random_frames(rng, count, noisy=0.2):
    """Frames that compress unevenly: mostly a few lit pixels on black, as Atari's, some pure noise."""
    frames = np.zeros((count, *FRAME), dtype=np.uint8)
    lit = rng.integers(0, frames[0].size, (count, 4))
    frames.reshape(count, -1)[np.arange(count)[:, None], lit] = rng.integers(1, 256, (count, 4))
    noise = rng.random(count) < noisy
    frames[noise] = rng.integers(0, 256, (int(noise.sum()), *FRAME), dtype=np.uint8)
    return frames


class Writer:
    """Writes the same random steps (episodes of random length, some truncated) to several buffers
    and keeps every step in plain lists (``steps[stream]``)."""

    def __init__(self, buffers, seed, noisy=0.2):
        self.buffers, self.rng, self.noisy = buffers, np.random.default_rng(seed), noisy
        rb = buffers[0]
        self.first = np.ones(rb.num_streams, dtype=bool)
        self.steps = [[] for _ in range(rb.num_streams)]

    def write(self, num_steps, streams_per_call=None, noisy=None):
        rb, rng = self.buffers[0], self.rng
        for _ in range(num_steps):
            E = rb.num_streams
            streams = np.arange(E) if streams_per_call is None else rng.choice(E, streams_per_call, replace=False)
            K = len(streams)
            frames = random_frames(rng, K, self.noisy if noisy is None else noisy)
            obs = np.repeat(frames[:, None], rb.frame_stack, axis=1) if rb.frame_stack > 1 else frames
            action = rng.integers(0, 4, K)
            reward = rng.normal(size=K).astype(np.float32)
            end = rng.random(K) < 0.1
            terminated = end & (rng.random(K) < 0.5)
            truncated = end & ~terminated
            state = rng.normal(size=(K, rb.state_size)).astype(np.float32)
            for buffer in self.buffers:
                buffer.add(obs, action, reward, self.first[streams], terminated, truncated, state, streams=streams)
            for j, e in enumerate(streams):
                self.steps[e].append(dict(frame=frames[j], action=action[j], state=state[j]))
            self.first[streams] = terminated | truncated

    def cut(self, streams):
        for buffer in self.buffers:
            buffer.cut_streams(streams)
        self.first[streams] = True


def assert_batches_equal(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x is None or y is None:
            assert x is None and y is None, field.name
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, field.name
            np.testing.assert_array_equal(x, y, err_msg=field.name)


def check_frames(rb, writer, batch, b):
    """Window b's frames (its history included) are the frames written, zeros before stream start."""
    stream, k = batch.indices[b] // rb.slots_per_stream, batch.sequence_ids[b]
    h = rb.history_length
    for t in range(h + rb.window_length):
        step = k * rb.period - h + t
        expected = writer.steps[stream][step]["frame"] if step >= 0 else np.zeros(FRAME, np.uint8)
        got = batch.obs[t, b] if rb.frame_stack > 1 else batch.obs[t, b]
        np.testing.assert_array_equal(got, expected)


def sample_both(plain, packed, seed, batch_size=16):
    a = plain.sample(batch_size, np.random.default_rng(seed))
    b = packed.sample(batch_size, np.random.default_rng(seed))
    assert_batches_equal(a, b)
    return a


@pytest.mark.parametrize("codec, frame_stack, frames_per_chunk, margin, streams_per_call", [
    ("zstd", 4, 0, 0, None),  # K = 4 = the period
    ("lz4", 4, 0, 0, 1),
    ("zstd:3", 4, 2, 3, 2),  # K divides the period
    ("zstd", 4, 3, 0, 1),  # K does not: windows begin inside chunks
    ("zstd", 1, 0, 3, None),  # no frame stacking: the observations themselves
    ("lz4", 2, 8, 0, 2),  # K longer than the period
])
def test_batches_equal_the_uncompressed_replays_bit_for_bit(codec, frame_stack, frames_per_chunk, margin,
                                                            streams_per_call):
    """Same writes, same rng: every batch equal, over many wrap-arounds, episode starts (frame
    history zeroed by stack_frames from frame_first, which must agree), cut streams and priority
    updates; the sampling indexes stay equal throughout."""
    if codec == "lz4":
        pytest.importorskip("lz4")  # optional: requirements.txt installs zstandard
    plain = make(overwrite_margin=margin, frame_stack=frame_stack)
    packed = make(overwrite_margin=margin, frame_stack=frame_stack, compression=codec,
                  frames_per_chunk=frames_per_chunk)
    assert packed.obs is None and packed.frames.frames_per_chunk == (frames_per_chunk or 4)
    writer = Writer([plain, packed], seed=0)
    rng = np.random.default_rng(1)
    for round in range(14):
        writer.write(int(rng.integers(1, 40)) * -(-3 // (streams_per_call or 3)), streams_per_call)
        if round % 5 == 4:
            writer.cut(np.array([round % 3]))
        np.testing.assert_array_equal(plain.sequence_id, packed.sequence_id)
        if not plain.num_valid_sequences:
            continue
        batch = sample_both(plain, packed, seed=round)
        for b in range(len(batch.indices)):
            check_frames(packed, writer, batch, b)
        priorities = rng.uniform(0, 3, len(batch.indices))
        for rb in (plain, packed):
            rb.update_priorities(batch.indices, batch.sequence_ids, priorities)
        np.testing.assert_array_equal(plain.tree.nodes, packed.tree.nodes)
    assert plain.write_count.min() > 4 * plain.capacity_per_stream
    assert plain.sampleable_fraction() == packed.sampleable_fraction()


def test_the_first_windows_read_zero_history_and_fresh_frames_from_staging():
    """Right after a stream starts (history before step 0: zero frames, as the uncompressed ring's
    unwritten slots) and while the newest chunk is incomplete (its frames still raw)."""
    plain, packed = make(num_streams=1, capacity=40), make(num_streams=1, capacity=40, compression="zstd")
    writer = Writer([plain, packed], seed=2)
    for _ in range(30):
        writer.write(1)
        if plain.num_valid_sequences:
            batch = sample_both(plain, packed, seed=int(plain.write_count[0]))
            for b in range(len(batch.indices)):
                check_frames(packed, writer, batch, b)


def shared_pair(compression, margin, capacity=24, **kwargs):
    """A learner (index) and a writer without index that share the learner's arrays, as r2d2_mp.py's."""
    learner = make(num_streams=1, capacity=capacity, compression=compression, overwrite_margin=margin, **kwargs)
    writer = make(num_streams=1, capacity=capacity, compression=compression, overwrite_margin=margin, index=False,
                  allocate=lambda name, shape, dtype: learner.shared[name], **kwargs)
    return learner, writer


def test_learner_follows_a_separate_writer_in_bulk():
    """A writer process without index (an actor) writes the shared arrays; the learner's batches,
    however late it syncs, equal an uncompressed learner's fed the same way."""
    plain_learner, plain_writer = shared_pair(None, margin=2)
    learner, writer = shared_pair("zstd", margin=2)
    assert writer.frames.arena is learner.frames.arena and writer.write_count is learner.write_count
    steps = Writer([plain_writer, writer], seed=3)
    for burst in [1, 2, 5, 13, 30, 1, 70, 3]:
        steps.write(burst)
        plain_learner.sync()
        learner.sync()
        np.testing.assert_array_equal(plain_learner.sequence_id, learner.sequence_id)
        if plain_learner.num_valid_sequences:
            sample_both(plain_learner, learner, seed=burst)


def newest_window(rb):
    """A draw of stream 0's newest sampleable window."""
    k = int(rb.sequence_id[0].max())
    leaf = int(np.flatnonzero(rb.sequence_id[0] == k)[0])
    return WindowDraw(indices=np.array([leaf]), sequence_ids=np.array([k]), weights=np.ones(1, np.float32),
                      probabilities=np.ones(1))


def oldest_window(rb):
    k = int(rb.sequence_id[0][rb.sequence_id[0] >= 0].min())
    leaf = int(np.flatnonzero(rb.sequence_id[0] == k)[0])
    return WindowDraw(indices=np.array([leaf]), sequence_ids=np.array([k]), weights=np.ones(1, np.float32),
                      probabilities=np.ones(1))


class HookedCodec(FrameCodec):
    """A codec that runs ``hook`` (once) right after its first decompression: a writer in another
    process going on while the learner reads."""

    hook = None

    def decompress_into(self, data, out):
        super().decompress_into(data, out)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()


def test_a_window_whose_bytes_the_arena_overwrites_during_the_read_is_dropped():
    """The writer pushes a chunk of incompressible frames through a byte ring that holds fewer
    frames than the step ring while the learner decompresses the oldest window: its first chunk is
    overwritten although its steps are still in the step ring and it read nothing from staging.
    The window comes back with weight 0 (no error from the garbage it may have read)."""

    def setup():
        learner, writer = shared_pair("zstd", margin=1, capacity=48, bytes_per_frame=8)  # 384 bytes per stream
        steps = Writer([writer], seed=4, noisy=0.0)  # ~11 bytes per frame: the ring holds ~32 frames
        steps.write(60)
        learner.sync()
        return learner, steps, oldest_window(learner)

    learner, steps, draw = setup()
    frames = learner.frames
    first_chunk = draw.sequence_ids[0] * learner.period // frames.frames_per_chunk
    assert frames.chunk_offset[0, first_chunk % frames.table_slots] >= frames.arena_head[0] - frames.arena_nbytes
    learner.frames.codec = HookedCodec("zstd")
    learner.frames.codec.hook = lambda: steps.write(4, noisy=1.0)  # one chunk of noise: ~270 bytes
    batch = learner.read(draw)
    assert learner.frames.codec.hook is None
    assert frames.chunk_offset[0, first_chunk % frames.table_slots] < frames.arena_head[0] - frames.arena_nbytes
    start_step = draw.sequence_ids[0] * learner.period - learner.history_length
    assert start_step >= learner.write_count[0] + 1 - learner.capacity_per_stream  # its steps: still there
    assert draw.sequence_ids[0] * learner.period + learner.history_length + learner.window_length <= \
        (60 + learner.history_length) // frames.frames_per_chunk * frames.frames_per_chunk  # none from staging
    assert batch.sequence_ids[0] == -1 and batch.weights[0] == 0
    learner, steps, draw = setup()  # without the writer going on, the same window reads whole
    batch = learner.read(draw)
    assert batch.sequence_ids[0] == draw.sequence_ids[0] and batch.weights[0] == 1
    check_frames(learner, steps, batch, 0)


def test_a_window_whose_staging_frames_are_overwritten_during_the_read_is_dropped():
    """The newest window's last frames are in the staging ring (their chunk is incomplete); the
    writer laps the staging ring while the learner reads them: dropped. A read without the lap
    keeps it, equal to what was written."""
    learner, writer = shared_pair("zstd", margin=1, frames_per_chunk=4)
    steps = Writer([writer], seed=5)
    steps.write(38)  # frames written 41: the newest chunk holds one frame, in staging
    learner.sync()
    draw = newest_window(learner)
    whole = learner.read(draw)
    assert whole.sequence_ids[0] >= 0
    check_frames(learner, steps, whole, 0)
    R = learner.frames.staging_frames
    learner.frames.codec = HookedCodec("zstd")
    learner.frames.codec.hook = lambda: steps.write(R)
    batch = learner.read(draw)
    assert batch.sequence_ids[0] == -1 and batch.weights[0] == 0


def test_a_window_that_passes_the_check_was_read_whole_before_it():
    """A writer laps the staging ring and fills the byte ring right after the learner's check:
    every window that passes must hold what was written before."""
    learner, writer = shared_pair("zstd", margin=1, bytes_per_frame=40)
    steps = Writer([writer], seed=6, noisy=0.0)
    steps.write(40)
    learner.sync()
    before = [dict(s) for s in steps.steps[0]]
    original = learner.frames.intact

    def intact_then_lap(*args):
        result = original(*args)
        steps.write(24, noisy=1.0)
        return result

    learner.frames.intact = intact_then_lap
    batch = learner.sample(8, np.random.default_rng(0))
    assert (batch.sequence_ids >= 0).all()
    steps.steps[0] = before
    for b in range(8):
        check_frames(learner, steps, batch, b)


def test_corrupt_bytes_of_an_intact_window_raise():
    rb = make(num_streams=1, capacity=24, compression="zstd")
    Writer([rb], seed=7).write(30)
    rb.frames.arena[0, : rb.frames.arena_head[0]] ^= 0x5A
    with pytest.raises(RuntimeError, match="do not decompress"):
        rb.sample(8, np.random.default_rng(0))


def brute_force_valid(rb, writer, codec):
    """Sequences valid by brute force: the step rule of the uncompressed replay, and the first chunk
    of the window still in the byte ring, from chunk sizes recomputed from the frames written and
    the placement rule (a chunk never wraps; ``overwrite_margin`` frames' budget ahead)."""
    K, A, h = rb.frames.frames_per_chunk, rb.frames.arena_nbytes, rb.history_length
    valid = set()
    for e in range(rb.num_streams):
        frames = [np.zeros(FRAME, np.uint8)] * h + [s["frame"] for s in writer.steps[e]]
        offsets, head = [], 0
        for c in range(len(frames) // K):
            size = len(codec.compress(np.stack(frames[c * K : (c + 1) * K])))
            if head % A + size > A:
                head += A - head % A
            offsets.append(head)
            head += size
        written = int(rb.write_count[e])
        for k in range(written // rb.period + 1):
            start = k * rb.period
            if start + rb.window_length > written or start - h < written - rb.capacity_per_stream + rb.overwrite_margin:
                continue
            chunk = start // K  # window k's first frame is kP
            if chunk >= len(offsets) or offsets[chunk] >= head + rb.arena_margin - A:
                valid.add((e, k))
    return valid


@pytest.mark.parametrize("margin", [0, 2])
def test_an_arena_too_small_for_the_data_loses_its_oldest_windows_never_samples_them(margin):
    """A byte ring that holds fewer chunks than the step ring has steps: the oldest windows leave
    the index when their first chunk is overwritten (brute force after every step); sampled
    windows hold what was written; the uncompressed replay keeps more."""
    plain = make(num_streams=2, capacity=2 * 24, overwrite_margin=margin)
    packed = make(num_streams=2, capacity=2 * 24, overwrite_margin=margin, compression="zstd", bytes_per_frame=20)
    writer = Writer([plain, packed], seed=8, noisy=0.4)
    rng = np.random.default_rng(9)
    smaller = round_trips = 0
    for _ in range(200):
        writer.write(1, streams_per_call=1)
        got = {(e, int(k)) for e in range(2) for k in packed.sequence_id[e] if k >= 0}
        assert got == brute_force_valid(packed, writer, FrameCodec("zstd"))
        plain_set = {(e, int(k)) for e in range(2) for k in plain.sequence_id[e] if k >= 0}
        assert got <= plain_set
        smaller += got < plain_set
        leaves = packed.tree.get(np.arange(packed.tree.capacity)).reshape(packed.sequence_id.shape)
        np.testing.assert_array_equal(leaves > 0, packed.sequence_id >= 0)
        if got:
            batch = packed.sample(8, rng)
            assert (batch.sequence_ids >= 0).all()
            for b in range(8):
                check_frames(packed, writer, batch, b)
            if got and rng.random() < 0.1:  # checkpoints save the intact chunks' bytes only
                resumed = make(num_streams=2, capacity=2 * 24, overwrite_margin=margin, compression="zstd",
                               bytes_per_frame=20)
                resumed.load_state_dict(packed.state_dict())
                np.testing.assert_array_equal(resumed.sequence_id, packed.sequence_id)
                assert_batches_equal(resumed.sample(8, np.random.default_rng(1)),
                                     packed.sample(8, np.random.default_rng(1)))
                round_trips += 1
    assert smaller > 50 and round_trips > 3
    assert packed.sampleable_fraction() < plain.sampleable_fraction()


def test_state_dict_round_trip_resumes_bit_for_bit_and_is_smaller():
    """Checkpoint both replays mid-chunk (through the checkpoint's tensor conversion), load them
    into fresh buffers, cut the streams (the resumed run's new episodes) and go on writing: the
    batches stay equal to the uncompressed replay's; the compressed state is far smaller."""
    plain, packed = make(overwrite_margin=2), make(overwrite_margin=2, compression="zstd", bytes_per_frame=40)
    writer = Writer([plain, packed], seed=10, noisy=0.05)
    writer.write(97, streams_per_call=2)
    assert ((packed.write_count + packed.history_length) % packed.frames.frames_per_chunk != 0).any()
    batch = packed.sample(8, np.random.default_rng(0))
    packed.update_priorities(batch.indices, batch.sequence_ids, np.arange(8.0))
    plain.update_priorities(batch.indices, batch.sequence_ids, np.arange(8.0))

    def nbytes(state, prefix=""):
        return sum(v.nbytes for k, v in state.items() if isinstance(v, np.ndarray) and k.startswith(prefix))

    plain_state, packed_state = plain.state_dict(), packed.state_dict()
    packed_obs = nbytes(packed_state, "obs_")
    assert packed_obs < plain_state["obs"].nbytes / 2
    assert nbytes(packed_state) < nbytes(plain_state)
    resumed_plain, resumed_packed = make(overwrite_margin=2), make(overwrite_margin=2, compression="zstd",
                                                                   bytes_per_frame=40)
    resumed_plain.load_state_dict(_torch_to_numpy(_numpy_to_torch(plain_state)))
    resumed_packed.load_state_dict(_torch_to_numpy(_numpy_to_torch(packed_state)))
    for seed in range(3):
        sample_both(resumed_plain, resumed_packed, seed)
    sample_both(plain, resumed_packed, seed=5)  # the resumed replay samples as the one saved
    writer.buffers = [resumed_plain, resumed_packed]
    writer.cut(np.arange(3))
    rng = np.random.default_rng(11)
    for round in range(8):
        writer.write(int(rng.integers(1, 30)), streams_per_call=2)
        batch = sample_both(resumed_plain, resumed_packed, seed=100 + round)
        for b in range(len(batch.indices)):
            check_frames(resumed_packed, writer, batch, b)
    # a second round trip of the resumed replay, after the byte ring has wrapped
    assert (resumed_packed.frames.arena_head > resumed_packed.frames.arena_nbytes).all()
    again = make(overwrite_margin=2, compression="zstd", bytes_per_frame=40)
    again.load_state_dict(resumed_packed.state_dict())
    sample_both(resumed_plain, again, seed=7)


def test_states_of_another_compression_are_refused():
    plain, packed = make(), make(compression="zstd")
    Writer([plain, packed], seed=12).write(20)
    with pytest.raises(ValueError, match="compression"):
        make(compression="zstd").load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="compression"):
        make().load_state_dict(packed.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        make(compression="zstd", bytes_per_frame=32).load_state_dict(packed.state_dict())


def test_shared_nbytes_is_what_is_allocated():
    kwargs = dict(num_streams=5, capacity=5 * 48, obs_shape=(4, 84, 84), obs_dtype=np.uint8, state_size=16,
                  burn_in_length=L, sequence_length=M, n_step=N, overlap=OVERLAP, frame_stack=4, overwrite_margin=2,
                  obs_compression="zstd", compressed_bytes_per_frame=700)
    allocated = {}

    def record(name, shape, dtype):
        allocated[name] = np.zeros(shape, dtype)
        return allocated[name]

    rb = SequenceReplayBuffer(**kwargs, allocate=record)
    assert set(allocated) == set(rb.shared_arrays) == set(CompressedFrames.ARRAYS + rb.SHARED_ARRAYS[1:])
    assert all(rb.shared[name] is allocated[name] for name in allocated)
    assert SequenceReplayBuffer.shared_nbytes(**kwargs) == sum(a.nbytes for a in allocated.values())
    frames = rb.frames
    assert allocated["obs_arena"].nbytes == 5 * 48 * 700
    assert frames.staging_frames == 8  # K = 4, plus the margin of 2, rounded up to whole chunks
    uncompressed = SequenceReplayBuffer.shared_nbytes(**{**kwargs, "obs_compression": None})
    assert uncompressed - SequenceReplayBuffer.shared_nbytes(**kwargs) == \
        5 * 48 * 84 * 84 - 5 * (8 * 84 * 84 + 48 * 700 + 2 * 8 * frames.table_slots + 8)


def test_the_papers_replay_fits_in_4_gb():
    """Issue #28's goal, as declared: 4 M observations (r2d2_mp.py's 960 streams on 16 cores), paper
    sequences and LSTM state, the default budget."""
    nbytes = SequenceReplayBuffer.shared_nbytes(
        num_streams=960, capacity=4_000_000, obs_shape=(4, 84, 84), obs_dtype=np.uint8, state_size=1024,
        burn_in_length=40, sequence_length=80, n_step=5, overlap=40, frame_stack=4, overwrite_margin=20,
        obs_compression="zstd")
    assert nbytes <= 4e9


def test_reads_in_several_threads_equal_serial_reads():
    rb = make(num_streams=4, capacity=4 * 40, compression="zstd")
    Writer([rb], seed=13).write(120)
    draws = [rb.draw(16, np.random.default_rng(seed)) for seed in range(8)]
    serial = [rb.read(d) for d in draws]
    parallel = [None] * len(draws)

    def read(i):
        parallel[i] = rb.read(draws[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(draws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, parallel):
        assert_batches_equal(a, b)


def test_default_chunk_length_divides_the_period():
    assert frames_per_chunk_for(40) == 20 and frames_per_chunk_for(20) == 20 and frames_per_chunk_for(8) == 8
    assert frames_per_chunk_for(64) == 32 and frames_per_chunk_for(37) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(compression="gzip"), "unknown replay compression"),
    (dict(compression="lz4:3"), "unknown replay compression"),
    (dict(compression="zstd", bytes_per_frame=2), "cannot hold one chunk"),
    (dict(compression="zstd", bytes_per_frame=0), "compressed_bytes_per_frame"),
    (dict(compression="zstd", frames_per_chunk=-1), "frames_per_chunk"),
])
def test_bad_compression_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize("name", ["zstd", "zstd:3", "lz4"])
def test_codecs_are_lossless_and_refuse_bytes_that_are_no_chunk(name):
    from r2d2_algo.frame_codec import ChunkError

    if name == "lz4":
        pytest.importorskip("lz4")
    codec = FrameCodec(name)
    frames = random_frames(np.random.default_rng(14), 20)
    data = codec.compress(frames)
    assert len(data) <= codec.bound(frames.nbytes)
    out = np.empty_like(frames)
    codec.decompress_into(data, out)
    np.testing.assert_array_equal(out, frames)
    assert codec.decompress(data, frames.nbytes) == frames.tobytes()
    noise = np.random.default_rng(15).integers(0, 256, 20 * 64, dtype=np.uint8)
    assert len(codec.compress(noise)) <= codec.bound(noise.nbytes)
    for bad in (data[: len(data) // 2], bytes(len(data)), noise[:300].tobytes()):
        with pytest.raises(ChunkError):
            codec.decompress_into(bad, out)
    with pytest.raises(ChunkError):
        codec.decompress_into(data, np.empty(frames.nbytes - 64, np.uint8))  # another size


# ---------------------------------------------------------------- writer processes, reading threads
def process_frame(seed, stream, step):
    """Deterministic frame of step ``step`` of a stream: the sampler regenerates it. Some noise, so
    that the byte ring fills unevenly."""
    rng = np.random.default_rng([seed, stream, step])
    return random_frames(rng, 1, noisy=0.15)[0]


def compressed_writer_process(layout, replay_kwargs, streams, num_steps, seed):
    import time

    from r2d2_algo.shared import SharedArrays

    arrays = SharedArrays.attach(layout)
    replay = SequenceReplayBuffer(**replay_kwargs, index=False, allocate=arrays.get)
    K = len(streams)
    for step in range(num_steps):
        frames = np.stack([process_frame(seed, e, step) for e in streams])
        replay.add(np.repeat(frames[:, None], 4, axis=1), np.full(K, step % 7), np.zeros(K, np.float32),
                   np.full(K, step == 0), np.zeros(K, bool), np.zeros(K, bool), np.zeros((K, 2), np.float32),
                   streams=np.asarray(streams))
        if step % 8 == 0:
            time.sleep(0.001)  # let the sampler interleave with the writers throughout
    arrays.close()


def test_writer_processes_and_reading_threads_in_shared_memory():
    """Two writer processes fill a compressed replay in shared memory (r2d2_mp.py's SharedArrays)
    whose byte ring is too small for its step ring, while two threads of this process draw under a
    lock and read outside it: every window returned holds the frames written; windows overwritten
    while read come back with weight 0; the declared size is what was allocated."""
    import multiprocessing
    import time

    from r2d2_algo.shared import SharedArrays

    kwargs = dict(num_streams=4, capacity=4 * 64, obs_shape=(4, *FRAME), obs_dtype=np.uint8, state_size=2,
                  burn_in_length=L, sequence_length=M, n_step=N, overlap=OVERLAP, frame_stack=4, overwrite_margin=2,
                  obs_compression="zstd", compressed_bytes_per_frame=24)
    arrays = SharedArrays()
    try:
        learner = SequenceReplayBuffer(**kwargs, index=True, allocate=arrays.allocate)
        assert sum(a.nbytes for a in learner.shared.values()) == SequenceReplayBuffer.shared_nbytes(**kwargs)
        ctx = multiprocessing.get_context("spawn")
        num_steps = 2000
        writers = [ctx.Process(target=compressed_writer_process, args=(arrays.layout, kwargs, pair, num_steps, 7))
                   for pair in ([0, 1], [2, 3])]
        for p in writers:
            p.start()
        lock, checked, dropped, errors = threading.Lock(), [0], [0], []

        def reader(seed):
            rng = np.random.default_rng(seed)
            try:
                while any(p.is_alive() for p in writers) or checked[0] == 0:
                    with lock:
                        learner.sync()
                        draw = learner.draw(8, rng) if learner.num_valid_sequences else None
                    if draw is None:
                        time.sleep(0.001)
                        continue
                    batch = learner.read(draw)
                    streams = batch.indices // learner.slots_per_stream
                    for b in range(8):
                        if batch.sequence_ids[b] < 0:
                            assert batch.weights[b] == 0
                            dropped[0] += 1
                            continue
                        start = batch.sequence_ids[b] * learner.period - learner.history_length
                        for t in range(learner.history_length + learner.window_length):
                            expected = process_frame(7, streams[b], start + t) if start + t >= 0 else 0
                            np.testing.assert_array_equal(batch.obs[t, b], expected)
                        checked[0] += 1
            except BaseException as e:  # handed to the test's thread
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in writers:
            p.join()
            assert p.exitcode == 0
        if errors:
            raise errors[0]
        assert checked[0] > 200
        assert learner.write_count.tolist() == [num_steps] * 4
        assert learner.sampleable_fraction() < 0.9  # the byte ring, not the step ring, limits what is held
    finally:
        arrays.close()
        arrays.unlink()
