"""Sequence replay for R2D2: circular per-stream storage, prioritized sequence sampling.

Layout (docs/algorithm.md, pieces 1, 4 and 6; Kapturowski et al. 2019, Sec. 2.3 and 3):

- Each environment stream e owns a ring of ``capacity_per_stream`` steps. Step i of the
  stream is stored once at ring position i % capacity_per_stream: the observation, the action
  taken from it, the reward that followed, and flags saying whether it is the first
  observation of an episode and whether it is a final one (terminated or truncated).
- Sequence k of a stream is the window of steps [k·P, k·P + W) with period P
  (= sequence length − overlap) and window length W = burn-in + sequence length + n-step.
  The window's burn-in is its first ``burn_in_length`` steps, the trained part the next
  ``sequence_length``, the last ``n_step`` steps only feed n-step targets. Consecutive
  windows overlap; they are index windows into the same ring, never copies.
- At step k·P the buffer also keeps the actor's recurrent state entering that step (the
  stored state) and the previous action and reward, so the window can be replayed exactly
  as it was acted.
- A sequence is sampleable from the moment its last step is written until the moment its
  first step is overwritten; at all other times its priority is 0, so a window that wrapped
  round or was partly overwritten is never returned.
- Windows may cross episode ends: ``first`` marks where the recurrent state must be reset,
  ``terminated``/``truncated`` where targets stop (the loss in r2d2.py never bootstraps
  across an end). A truncated final observation is kept so that targets can bootstrap
  from it; a terminated one has value 0.

- Image observations that are frame stacks (Atari: 4 × 84 × 84) can be stored as single
  frames (``frame_stack`` > 1): only the newest frame of each observation is kept, and the
  stacks are rebuilt at sampling time, with zero frames before an episode start. A window
  then also needs the frame_stack − 1 frames before it, and it stops being sampleable as
  soon as the first of those is overwritten.
- Image observations can also be stored compressed (``obs_compression``, issue #28): the
  stored frames of each stream in chunks of K consecutive frames, compressed by the stream's
  writer once a chunk is complete, into a per-stream byte ring of a declared size (a budget in
  bytes per frame), and decompressed at sampling time, each chunk a batch needs once. The frames
  of the chunk not complete yet stay raw in a small staging ring, so the same windows are
  sampleable as without compression, and a sample is the same, bit for bit; a window whose
  first chunk the byte ring has overwritten (data that compress worse than the budget) stops
  being sampleable as if its first step had been overwritten. Layout: r2d2_algo/frame_codec.py.

Gymnasium's NEXT_STEP autoreset produces exactly this stream: the step after a final
observation returns the reset observation with reward 0, and the action taken from the final
observation is ignored (its step is masked out of the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from r2d2_algo.frame_codec import CompressedFrames, FrameCodec, frames_per_chunk_for


def later_state_offsets(burn_in_length: int, sequence_length: int, overlap: int) -> tuple[int, ...]:
    """Window offsets at which a sampled window also has an actor's stored state inside its trained
    part: a later sequence starts every period P = sequence_length − overlap, so offsets jP (j ≥ 1)
    with burn_in_length ≤ jP < burn_in_length + sequence_length; the first and the last of them
    (one offset if there is one; none when the trained part holds no later start, as with no
    overlap and no burn-in). The stored state there is the one the actor had when it acted, which
    the learner's state (recomputed from the window's stored state, through the burn-in) is
    compared with: R2D2 Sec. 3 measures ΔQ at the first and the last trained step.

    Example: burn-in 8, sequence 16, overlap 8 → (8, 16), the first and the middle trained step.
    """
    period = sequence_length - overlap
    inside = [o for o in range(period, burn_in_length + sequence_length, period) if o >= burn_in_length]
    return tuple(sorted({inside[0], inside[-1]})) if inside else ()


def sequence_priorities(abs_td: np.ndarray, mask: np.ndarray, eta: float) -> np.ndarray:
    """R2D2 sequence priority p = η·max_t|δ_t| + (1 − η)·mean_t|δ_t| (Sec. 2.3).

    Args:
        abs_td: (T, B) float, absolute TD errors |δ| over the trained steps.
        mask: (T, B) bool or float, 1 where the step has a target (not a final observation).
        eta: priority mix η in [0, 1] (paper: 0.9).
    Returns:
        (B,) float64 priorities; 0 for a sequence with no valid step.
    """
    abs_td = np.asarray(abs_td, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    count = mask.sum(axis=0)
    max_td = (abs_td * mask).max(axis=0)
    mean_td = (abs_td * mask).sum(axis=0) / np.maximum(count, 1.0)
    return eta * max_td + (1.0 - eta) * mean_td


class SumTree:
    """Binary sum tree over ``capacity`` leaves with batched numpy updates and queries.

    Prioritized replay's proportional sampling (Schaul et al. 2016, Sec. 3.3, App. B.2.1).
    Every operation handles a whole batch with one numpy op per tree level.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"SumTree capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.num_leaves = 1 << max(0, (capacity - 1).bit_length())
        self.depth = self.num_leaves.bit_length() - 1
        self.nodes = np.zeros(2 * self.num_leaves, dtype=np.float64)  # nodes[1] is the root

    @property
    def total(self) -> float:
        """Sum of all leaves."""
        return float(self.nodes[1])

    def get(self, leaves: np.ndarray) -> np.ndarray:
        """Values of the given leaves, (K,) float64."""
        return self.nodes[np.asarray(leaves) + self.num_leaves]

    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set leaves (K,) int to values (K,) float >= 0; with duplicates the last one wins."""
        idx = np.asarray(leaves, dtype=np.int64) + self.num_leaves
        self.nodes[idx] = values
        for _ in range(self.depth):
            idx = np.unique(idx >> 1)
            self.nodes[idx] = self.nodes[2 * idx] + self.nodes[2 * idx + 1]

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf i such that prefix_sum(i) <= value < prefix_sum(i+1), for each value (K,).

        Values are in [0, total); a descent never enters a zero-sum subtree, so every
        returned leaf has a positive value even under floating-point round-off.
        """
        values = np.array(values, dtype=np.float64)
        idx = np.ones(len(values), dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * idx
            left_sum = self.nodes[left]
            go_right = ((values >= left_sum) & (self.nodes[left + 1] > 0)) | (left_sum <= 0)
            values = np.where(go_right, values - left_sum, values)
            idx = left + go_right
        return idx - self.num_leaves


@dataclass
class SequenceBatch:
    """A prioritized batch of B windows of W = burn-in + sequence length + n-step steps.

    All arrays are time-major numpy arrays:
        obs: (W, B, *obs_shape), the stored dtype; with frame stacking the single frames
            (h + W, B, *frame_shape), h = frame_stack − 1, to be stacked by ``stack_frames``.
        action: (W, B) int64, action taken at each step (meaningless at a final observation).
        reward: (W, B) float32, reward that followed each step's action.
        first: (W, B) bool, step begins an episode (reset mask of the recurrent core).
        terminated: (W, B) bool, step's observation is terminal (value 0).
        truncated: (W, B) bool, step's observation ended its episode by a time limit.
        prev_action: (W, B) int64, action before each step; -1 at an episode start.
        prev_reward: (W, B) float32, reward before each step; 0 at an episode start.
        initial_state: (B, state_size) float32, the stored recurrent state entering step 0.
        weights: (B,) float32, importance weights (N·P(i))^−β / max over the batch.
        indices: (B,) int64, leaf indices for ``update_priorities``.
        sequence_ids: (B,) int64, which sequence of its stream each window is (k); -1 for a
            window overwritten while it was read (its weight is 0 too).
        probabilities: (B,) float64, sampling probabilities P(i).
        frame_first: with frame stacking, (h + W, B) bool ``first`` flags of the frames in obs.
        later_states: (J, B, state_size) float32, the actor's recurrent states entering window
            offsets ``later_state_offsets`` (the stored states of the later sequences that start
            inside the trained part; J ≤ 2, see ``later_state_offsets``), to measure how far the
            learner's recomputed states drift from them (R2D2 Sec. 3, ΔQ).
        later_state_offsets: (J,) int64 window offsets of ``later_states`` (burn-in included).
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    first: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    prev_action: np.ndarray
    prev_reward: np.ndarray
    initial_state: np.ndarray
    weights: np.ndarray
    indices: np.ndarray
    sequence_ids: np.ndarray
    probabilities: np.ndarray
    frame_first: np.ndarray | None = None
    later_states: np.ndarray | None = None
    later_state_offsets: np.ndarray | None = None


@dataclass
class WindowDraw:
    """The windows ``SequenceReplayBuffer.draw`` picked, for ``read``: all (B,).

    indices: int64 leaf indices; sequence_ids: int64 sequence k of each window's stream;
    weights: float32 importance weights; probabilities: float64 sampling probabilities.
    """

    indices: np.ndarray
    sequence_ids: np.ndarray
    weights: np.ndarray
    probabilities: np.ndarray


def stack_frames(frames, frame_first, frame_stack: int):
    """Rebuild frame stacks from single frames, zeroing frames before an episode start.

    Works on torch tensors (on any device), so the learner can stack on the GPU.

    Args:
        frames: (h + W, B, *frame_shape) tensor, h = frame_stack − 1.
        frame_first: (h + W, B) bool tensor, True where a frame begins an episode.
        frame_stack: number of frames per observation (Atari: 4).
    Returns:
        (W, B, frame_stack, *frame_shape) tensor, oldest frame first, as FrameStackObservation
        with zero padding returns them.
    """
    import torch

    h = frame_stack - 1
    L, B = frame_first.shape
    W = L - h
    index = torch.arange(L, device=frame_first.device).unsqueeze(1).expand(L, B)
    episode_start = torch.where(frame_first, index, torch.full_like(index, -1)).cummax(dim=0).values  # (L, B)
    source = (torch.arange(W, device=frames.device).unsqueeze(1) + torch.arange(frame_stack, device=frames.device))
    stacked = frames[source]  # (W, S, B, *frame_shape)
    same_episode = source.unsqueeze(-1) >= episode_start[h:].unsqueeze(1)  # (W, S, B)
    same_episode = same_episode.view(*same_episode.shape, *([1] * (frames.dim() - 2)))
    stacked = torch.where(same_episode, stacked, torch.zeros((), dtype=frames.dtype, device=frames.device))
    return stacked.transpose(1, 2)


def numpy_zeros(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Default array allocator; a multi-process variant can pass a shared-memory one."""
    return np.zeros(shape, dtype=dtype)


def window_length(burn_in_length: int, sequence_length: int, n_step: int) -> int:
    """Steps in one sampled window: burn-in l + trained sequence m + the n-step bootstrap n
    (R2D2 Sec. 3: the learner unrolls l + m steps and needs n more for the last targets)."""
    return burn_in_length + sequence_length + n_step


class SequenceReplayBuffer:
    """Circular sequence replay with prioritized sampling (R2D2, Sec. 2.3; PER, Sec. 3.3).

    Args:
        num_streams: number of environment streams written side by side (one per env).
        capacity: total replay capacity in observations, split evenly over the streams;
            each stream's share is rounded down to a multiple of the sequence period.
        obs_shape: shape of one observation.
        obs_dtype: numpy dtype of observations (uint8 for images).
        state_size: width of the flat recurrent state stored at each sequence start.
        burn_in_length: burn-in steps l (paper: 40).
        sequence_length: trained steps m (paper: 80).
        n_step: n of the n-step target (paper: 5).
        overlap: steps shared by consecutive trained parts (paper: 40); a new sequence starts
            every sequence_length − overlap steps.
        priority_exponent: α (paper: 0.9).
        importance_sampling_exponent: β (paper: 0.6).
        frame_stack: if > 1, observations are stacks (frame_stack, *frame_shape) of which only
            the newest frame is stored; ``sample`` returns frames and ``stack_frames`` rebuilds
            the stacks (Atari: 4).
        overwrite_margin: a window stops being sampleable this many steps before its first
            needed step is overwritten (0 in one process; > 0 when actors write while the
            learner samples, so that a window is not overwritten while it is being read).
        index: keep the sampling index (sequence ids, sum tree). True for the single process
            and for the learner; False for an actor that only writes steps (r2d2_mp.py).
        allocate: ``allocate(name, shape, dtype) -> ndarray`` used for every array that
            writers and the learner share (a shared-memory allocator in r2d2_mp.py).
        obs_compression: None to store observations raw; a codec (``frame_codec.CODECS``:
            "zstd", "zstd:LEVEL", "lz4") to store the stored frames compressed, in chunks of
            ``frames_per_chunk`` frames of a stream (0: the largest divisor of the period that
            is ≤ 32; paper: 20).
        compressed_bytes_per_frame: with compression, the byte ring's budget: each stream's
            ring holds capacity_per_stream × this many bytes (measured on Atari with zstd: 40–200
            bytes per 84 × 84 frame, 7,056 raw).
    Raises:
        ValueError: a negative or zero length, an overlap outside [0, sequence_length), a
            per-stream capacity smaller than one window, exponents out of range, an unknown
            codec, a byte ring too small for one chunk.
    """

    PRIORITY_EPSILON = 1e-6  # keeps every stored sequence sampleable (PER, Sec. 3.3)

    def __init__(
        self,
        num_streams: int,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype,
        state_size: int,
        burn_in_length: int,
        sequence_length: int,
        n_step: int,
        overlap: int,
        priority_exponent: float = 0.9,
        importance_sampling_exponent: float = 0.6,
        frame_stack: int = 1,
        overwrite_margin: int = 0,
        index: bool = True,
        allocate: Callable[[str, tuple[int, ...], object], np.ndarray] = numpy_zeros,
        obs_compression: str | None = None,
        compressed_bytes_per_frame: int = 768,
        frames_per_chunk: int = 0,
    ):
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {num_streams}")
        if burn_in_length < 0:
            raise ValueError(f"burn_in_length must be >= 0, got {burn_in_length}")
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {n_step}")
        if not 0 <= overlap < sequence_length:
            raise ValueError(f"overlap must be in [0, sequence_length={sequence_length}), got {overlap}")
        if not 0.0 <= priority_exponent <= 1.0:
            raise ValueError(f"priority_exponent must be in [0, 1], got {priority_exponent}")
        if not 0.0 <= importance_sampling_exponent <= 1.0:
            raise ValueError(f"importance_sampling_exponent must be in [0, 1], got {importance_sampling_exponent}")
        if state_size < 0:
            raise ValueError(f"state_size must be >= 0, got {state_size}")
        if frame_stack < 1 or (frame_stack > 1 and (len(obs_shape) < 2 or obs_shape[0] != frame_stack)):
            raise ValueError(f"frame_stack {frame_stack} does not fit observations of shape {tuple(obs_shape)}")
        self.frame_stack = frame_stack
        self.history_length = frame_stack - 1  # frames needed before a window's first step
        if overwrite_margin < 0:
            raise ValueError(f"overwrite_margin must be >= 0, got {overwrite_margin}")
        self.overwrite_margin = overwrite_margin
        self.concurrent_writers = overwrite_margin > 0  # other processes write while this one samples
        self.num_streams = num_streams
        self.burn_in_length = burn_in_length
        self.sequence_length = sequence_length
        self.n_step = n_step
        self.period = sequence_length - overlap
        self.later_state_offsets = later_state_offsets(burn_in_length, sequence_length, overlap)
        self.window_length = window_length(burn_in_length, sequence_length, n_step)
        per_stream = capacity // num_streams
        self.capacity_per_stream = per_stream - per_stream % self.period
        if self.capacity_per_stream < self.window_length + self.history_length + overwrite_margin:
            raise ValueError(
                f"--buffer-size {capacity} over {num_streams} env streams leaves {self.capacity_per_stream} steps per "
                f"stream, smaller than one window of --burn-in-length + --sequence-length + --n-step = {self.window_length}"
                + (f" plus {self.history_length} stacked frames" if self.history_length else "")
                + (f" plus an overwrite margin of {overwrite_margin}" if overwrite_margin else "")
            )
        self.priority_exponent = priority_exponent
        self.importance_sampling_exponent = importance_sampling_exponent
        self.obs_shape = tuple(obs_shape)
        self.state_size = state_size

        self.shared: dict[str, np.ndarray] = {}  # every array allocated through ``allocate``, by name

        def allocate_shared(name, shape, dtype):
            self.shared[name] = allocate(name, shape, dtype)
            return self.shared[name]

        E, C = num_streams, self.capacity_per_stream
        self.slots_per_stream = C // self.period
        S = self.slots_per_stream
        self.stored_obs_shape = self.obs_shape[1:] if frame_stack > 1 else self.obs_shape
        self.obs_compression = obs_compression
        if obs_compression is None:
            self.obs = allocate_shared("obs", (E, C, *self.stored_obs_shape), obs_dtype)
            self.frames = None
        else:  # step i's frame is frame i + h of its stream (frame_codec.py): a window begins a chunk
            self.obs = None
            self.frames = CompressedFrames(E, C, self.stored_obs_shape, obs_dtype, FrameCodec(obs_compression),
                                           frames_per_chunk or frames_per_chunk_for(self.period),
                                           compressed_bytes_per_frame, overwrite_margin, self.history_length,
                                           allocate_shared)
            # a window stops being sampleable this many bytes before its first chunk is overwritten
            self.arena_margin = overwrite_margin * compressed_bytes_per_frame
        self.action = allocate_shared("action", (E, C), np.int64)
        self.reward = allocate_shared("reward", (E, C), np.float32)
        self.first = allocate_shared("first", (E, C), np.bool_)
        self.terminated = allocate_shared("terminated", (E, C), np.bool_)
        self.truncated = allocate_shared("truncated", (E, C), np.bool_)
        self.stored_state = allocate_shared("stored_state", (E, S, state_size), np.float32)
        self.start_prev_action = allocate_shared("start_prev_action", (E, S), np.int64)
        self.start_prev_reward = allocate_shared("start_prev_reward", (E, S), np.float32)
        self.write_count = allocate_shared("write_count", (E,), np.int64)  # steps written per stream (by its writer)
        self.index = index
        if index:  # the sampling index is private to the process that samples
            # which sequence k a slot holds while it is sampleable; -1 otherwise
            self.sequence_id = np.full((E, S), -1, dtype=np.int64)
            self.indexed_count = np.zeros(E, dtype=np.int64)  # write_count the index reflects
            if self.frames is not None:  # the oldest frame still readable when the index was synced
                self.indexed_oldest_frame = np.zeros(E, dtype=np.int64)
            self.tree = SumTree(E * S)
            self.max_priority = 1.0
            self.num_sequences_added = 0

    @classmethod
    def shared_nbytes(cls, **kwargs) -> int:
        """Bytes of the arrays a buffer with these arguments allocates through ``allocate``
        (everything writers and the learner share), without allocating them."""
        sizes = []

        def measure(name, shape, dtype):
            sizes.append(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
            return np.empty((0,) * len(shape), dtype=dtype)

        cls(**{**kwargs, "index": False, "allocate": measure})
        return sum(sizes)

    # ------------------------------------------------------------------ checkpoints
    SHARED_ARRAYS = ("obs", "action", "reward", "first", "terminated", "truncated", "stored_state",
                     "start_prev_action", "start_prev_reward", "write_count")  # without compression

    @property
    def shared_arrays(self) -> tuple[str, ...]:
        """Names of the arrays this buffer allocated through ``allocate`` (shared with writers):
        ``SHARED_ARRAYS`` without compression; with it, ``CompressedFrames.ARRAYS`` instead of obs.
        ``shared[name]`` is the array."""
        return tuple(self.shared)

    def state_dict(self) -> dict[str, np.ndarray | float | int | str | None]:
        """Contents and sampling index (priorities included), for a checkpoint. The arrays are
        the buffer's own (no copy): save them before writing again. With compression, the
        observations are the compressed bytes in use (``CompressedFrames.state_dict``, copies):
        a checkpoint shrinks as the replay does."""
        state = {name: getattr(self, name) for name in self.SHARED_ARRAYS[1:]}
        state["obs_compression"] = self.obs_compression
        if self.frames is None:
            state["obs"] = self.obs
        else:
            state.update(self.frames.state_dict(self.write_count + self.history_length, self.capacity_per_stream))
        if self.index:
            state.update(sequence_id=self.sequence_id, indexed_count=self.indexed_count, tree=self.tree.nodes,
                         max_priority=self.max_priority, num_sequences_added=self.num_sequences_added)
            if self.frames is not None:
                state["indexed_oldest_frame"] = self.indexed_oldest_frame
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy a ``state_dict`` into this buffer (same constructor arguments, compression included).

        Raises:
            ValueError: an array is missing or has another shape (a buffer of other arguments),
                or the state was saved with other observation compression.
        """
        saved_compression = state.get("obs_compression", None)
        if (saved_compression is None) != (self.obs_compression is None):
            raise ValueError(f"replay was saved with observation compression {saved_compression or 'none'}, "
                             f"this buffer uses {self.obs_compression or 'none'}")
        names = self.SHARED_ARRAYS[1 if self.frames is not None else 0 :]
        names += (("sequence_id", "indexed_count") if self.index else ())
        names += (("indexed_oldest_frame",) if self.index and self.frames is not None else ())
        for name in names:
            target, source = getattr(self, name), state.get(name)
            if source is None or tuple(np.shape(source)) != target.shape:
                raise ValueError(f"replay array {name!r} has shape {np.shape(source) if source is not None else None}, "
                                 f"this buffer's is {target.shape}")
            target[...] = source
        if self.index:
            if np.shape(state["tree"]) != self.tree.nodes.shape:
                raise ValueError("replay priorities do not fit this buffer")
            self.tree.nodes[...] = state["tree"]
            self.max_priority = float(state["max_priority"])
            self.num_sequences_added = int(state["num_sequences_added"])
        if self.frames is not None:
            self.frames.load_state_dict(state, self.write_count + self.history_length)

    def cut_streams(self, streams: np.ndarray | None = None) -> None:
        """Mark the last step written to each stream (default: all) as truncated (a time-limit
        end): used when a resumed run or a restarted actor starts new episodes in those streams,
        so that no n-step return or sequence runs from the old episode into the new one. That
        step gets no target of its own and is the bootstrap point of the steps before it."""
        streams = np.arange(self.num_streams) if streams is None else np.asarray(streams, dtype=np.int64)
        streams = streams[self.write_count[streams] > 0]
        self.truncated[streams, (self.write_count[streams] - 1) % self.capacity_per_stream] = True

    # ------------------------------------------------------------------ writing
    @property
    def num_valid_sequences(self) -> int:
        """Sequences that can be sampled now."""
        return int((self.sequence_id >= 0).sum())

    @property
    def size(self) -> int:
        """Observations held now, over all streams."""
        return int(np.minimum(self.write_count, self.capacity_per_stream).sum())

    def add(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        first: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        state: np.ndarray,
        streams: np.ndarray | None = None,
    ) -> None:
        """Append one step to each of the given streams (default: all, in order).

        Args:
            obs: (K, *obs_shape) observation of the step.
            action: (K,) int, action taken from obs (ignored by the env at a final obs).
            reward: (K,) float, reward that followed.
            first: (K,) bool, obs is the first of an episode.
            terminated: (K,) bool, obs is terminal.
            truncated: (K,) bool, obs is the last of an episode cut by a time limit.
            state: (K, state_size) float, the actor's recurrent state entering this step.
            streams: (K,) int stream indices; all streams if None.
        """
        streams = np.arange(self.num_streams) if streams is None else np.asarray(streams, dtype=np.int64)
        first = np.asarray(first, dtype=bool)
        step = self.write_count[streams]  # (K,)
        C, P, S = self.capacity_per_stream, self.period, self.slots_per_stream
        pos = step % C

        starts = step % P == 0  # a new sequence starts here: keep what it needs to be replayed
        if starts.any():
            s_streams, s_step, s_first = streams[starts], step[starts], first[starts]
            slot = (s_step // P) % S
            self.stored_state[s_streams, slot] = np.asarray(state)[starts]
            has_prev = (s_step > 0) & ~s_first
            prev_pos = (s_step - 1) % C
            self.start_prev_action[s_streams, slot] = np.where(has_prev, self.action[s_streams, prev_pos], -1)
            self.start_prev_reward[s_streams, slot] = np.where(has_prev, self.reward[s_streams, prev_pos], 0.0)

        stored = obs[:, -1] if self.frame_stack > 1 else obs
        if self.frames is None:
            self.obs[streams, pos] = stored
        else:  # compresses the chunks this step completes
            self.frames.write(streams, step + self.history_length, np.asarray(stored))
        self.action[streams, pos] = action
        self.reward[streams, pos] = reward
        self.first[streams, pos] = first
        self.terminated[streams, pos] = terminated
        self.truncated[streams, pos] = truncated
        self.write_count[streams] = step + 1  # published last: the step is complete
        if self.index:
            self.sync(streams)

    def sampleable_range(self, written: np.ndarray, oldest_frame: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Sequences k_lo <= k <= k_hi are sampleable when a stream has ``written`` steps:
        whole window written (kP + W <= written) and its first needed step, window start −
        history, more than ``overwrite_margin`` steps away from being overwritten; with
        compression also its first frame, kP, at or after ``oldest_frame`` (the first frame the
        byte ring still holds, ``overwrite_margin`` frames' budget ahead; None: now's)."""
        P, C = self.period, self.capacity_per_stream
        k_hi = (written - self.window_length) // P
        k_lo = -((-(written - C + self.history_length + self.overwrite_margin)) // P)  # ceil division
        if self.frames is not None:
            if oldest_frame is None:
                oldest_frame = self.oldest_frame(np.arange(self.num_streams), written)
            k_lo = np.maximum(k_lo, -(-oldest_frame // P))
        return np.maximum(k_lo, 0), k_hi

    def oldest_frame(self, streams: np.ndarray, written: np.ndarray) -> np.ndarray:
        """With compression, (K,) int64: the first frame (step + history length) of each stream
        whose chunk the byte ring holds ``overwrite_margin`` frames' budget before overwriting it."""
        return self.frames.oldest_intact_frame(streams, written + self.history_length, self.arena_margin)

    def sampleable_fraction(self) -> float:
        """Fraction of the observations held now that lie in at least one sampleable window.

        The rest, per stream: the newest steps, whose window is not complete yet (fewer than
        period steps), and the oldest ones, within frame history + ``overwrite_margin`` steps of
        being overwritten (rounded up to whole periods). Needs only ``write_count``."""
        k_lo, k_hi = self.sampleable_range(self.write_count)
        covered = np.where(k_hi >= k_lo, (k_hi - k_lo) * self.period + self.window_length, 0)
        return float(covered.sum() / max(self.size, 1))

    def sync(self, streams: np.ndarray | None = None) -> None:
        """Bring the sampling index up to the streams' write counts: sequences that became
        complete enter with the running maximum priority (PER, Alg. 1); sequences that are
        about to be overwritten leave (priority 0)."""
        streams = np.arange(self.num_streams) if streams is None else np.asarray(streams)
        written = self.write_count[streams].copy()
        if self.frames is None:
            old_lo, old_hi = self.sampleable_range(self.indexed_count[streams])
            new_lo, new_hi = self.sampleable_range(written)
        else:  # the byte ring's oldest frame only moves on (read after the counts: a later one, if anything)
            oldest = np.maximum(self.oldest_frame(streams, written), self.indexed_oldest_frame[streams])
            old_lo, old_hi = self.sampleable_range(self.indexed_count[streams], self.indexed_oldest_frame[streams])
            new_lo, new_hi = self.sampleable_range(written, oldest)
            self.indexed_oldest_frame[streams] = oldest
        S = self.slots_per_stream
        leaves_out, leaves_in = [], []
        for e, o_lo, o_hi, n_lo, n_hi in zip(streams, old_lo, old_hi, new_lo, new_hi):
            if n_lo > o_lo:  # left the range: slot still holds k unless a later k took it
                k = np.arange(o_lo, min(n_lo, o_hi + 1))
                k = k[self.sequence_id[e, k % S] == k]
                self.sequence_id[e, k % S] = -1
                leaves_out.append(e * S + k % S)
            if n_hi > o_hi:  # entered the range
                k = np.arange(max(o_hi + 1, n_lo), n_hi + 1)
                self.sequence_id[e, k % S] = k
                leaves_in.append(e * S + k % S)
        self.indexed_count[streams] = written
        if leaves_out:
            out = np.concatenate(leaves_out)
            self.tree.set(out, np.zeros(len(out)))
        if leaves_in:
            entering = np.concatenate(leaves_in)
            self.tree.set(entering, np.full(len(entering), self.max_priority**self.priority_exponent))
            self.num_sequences_added += len(entering)

    # ------------------------------------------------------------------ sampling
    def window_positions(self, streams: np.ndarray, sequence_ids: np.ndarray) -> np.ndarray:
        """Ring positions (B, h + W) of the windows of sequences ``sequence_ids`` (B,) of
        ``streams``, preceded by the h = frame_stack − 1 frames their first stack needs."""
        start = np.asarray(sequence_ids, dtype=np.int64) * self.period - self.history_length
        return (start[:, None] + np.arange(self.history_length + self.window_length)) % self.capacity_per_stream

    def sample(self, batch_size: int, rng: np.random.Generator) -> SequenceBatch:
        """Draw ``batch_size`` windows with P(i) ∝ p_i^α by stratified sampling (PER, App. B.2.1)
        and read them: ``read(draw(batch_size, rng))``.

        Raises:
            ValueError: batch_size < 1.
            RuntimeError: no complete sequence is stored yet.
        """
        return self.read(self.draw(batch_size, rng))

    def draw(self, batch_size: int, rng: np.random.Generator) -> WindowDraw:
        """Pick ``batch_size`` windows with P(i) ∝ p_i^α by stratified sampling (PER, App. B.2.1),
        with their importance weights; uses only the sampling index (fast: a sampler that reads
        in several threads holds its lock only for this and ``sync``).

        Raises:
            ValueError: batch_size < 1.
            RuntimeError: no complete sequence is stored yet.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        total = self.tree.total
        if total <= 0:
            raise RuntimeError("replay holds no complete sequence yet")
        targets = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
        leaves = self.tree.find(np.minimum(targets, np.nextafter(total, 0)))
        probabilities = self.tree.get(leaves) / total
        n = self.num_valid_sequences
        weights = (n * probabilities) ** (-self.importance_sampling_exponent)
        weights = (weights / weights.max()).astype(np.float32)
        streams, slots = np.divmod(leaves, self.slots_per_stream)
        return WindowDraw(indices=leaves, sequence_ids=self.sequence_id[streams, slots], weights=weights,
                          probabilities=probabilities)

    def read(self, draw: WindowDraw) -> SequenceBatch:
        """Copy the drawn windows out of the replay (decompressing their observations). Uses no
        sampling index: several threads may read at once, and a buffer without index can read.
        Windows that a writer in another process overwrote while they were read come back with
        weight 0 and sequence id -1.

        Raises:
            RuntimeError: with compression, the bytes of a window that was not overwritten do
                not decompress (corrupt replay memory).
        """
        leaves, sequence_ids, weights = draw.indices, draw.sequence_ids, draw.weights
        streams, slots = np.divmod(leaves, self.slots_per_stream)
        h = self.history_length
        pos_ext = self.window_positions(streams, sequence_ids)  # (B, h + W), frame history first
        pos = pos_ext[:, h:]  # (B, W)
        rows = streams[:, None]
        action = self.action[rows, pos].T  # (W, B)
        reward = self.reward[rows, pos].T
        first = self.first[rows, pos].T
        prev_action = np.empty_like(action)
        prev_reward = np.empty_like(reward)
        prev_action[0] = self.start_prev_action[streams, slots]
        prev_reward[0] = self.start_prev_reward[streams, slots]
        prev_action[1:] = np.where(first[1:], -1, action[:-1])
        prev_reward[1:] = np.where(first[1:], 0.0, reward[:-1])
        terminated = self.terminated[rows, pos].T
        truncated = self.truncated[rows, pos].T
        if self.frames is None:
            obs = np.ascontiguousarray(np.swapaxes(self.obs[rows, pos_ext], 0, 1))  # (h + W, B, *stored_obs_shape)
        else:  # window k's frames are [kP, kP + h + W), stored as steps kP − h ...
            obs, receipt = self.frames.read(streams, sequence_ids * self.period, h + self.window_length,
                                            self.write_count[streams] + h)
        frame_first = self.first[rows, pos_ext].T if h else None
        initial_state = self.stored_state[streams, slots]
        # the stored states of the sequences k + j starting inside the window: their slot is
        # overwritten only C steps after their start, later than the window's first step
        offsets = np.array(self.later_state_offsets, dtype=np.int64)
        later_states = self.stored_state[streams[None, :], (slots[None, :] + offsets[:, None] // self.period)
                                         % self.slots_per_stream]  # (J, B, state_size)
        # a writer in another process may have overwritten a window while it was copied: such
        # windows are dropped from the loss. Checked after every read of the window, so that
        # nothing copied after the check can come from a later write. With n steps written, such
        # a writer may already be writing step n (its stored state first), over step n − capacity.
        in_progress = 1 if self.concurrent_writers else 0
        written_after = self.write_count[streams] + in_progress
        intact = sequence_ids * self.period - h >= written_after - self.capacity_per_stream
        if self.frames is not None:  # and its bytes: the byte ring's and the staging ring's
            intact_bytes, failed = self.frames.intact(receipt, streams, written_after + h)
            intact &= intact_bytes
            if (failed & intact).any():
                b = int(np.flatnonzero(failed & intact)[0])
                raise RuntimeError(f"replay stream {streams[b]}: the compressed frames of sequence "
                                   f"{sequence_ids[b]} do not decompress, though no writer overwrote them")
        if not intact.all():
            weights = np.where(intact, weights, 0.0).astype(np.float32)
            sequence_ids = np.where(intact, sequence_ids, -1)
        return SequenceBatch(
            obs=obs,
            action=action,
            reward=reward,
            first=first,
            terminated=terminated,
            truncated=truncated,
            prev_action=prev_action,
            prev_reward=prev_reward,
            initial_state=initial_state,
            weights=weights,
            indices=leaves,
            sequence_ids=sequence_ids,
            probabilities=draw.probabilities,
            frame_first=frame_first,
            later_states=later_states,
            later_state_offsets=offsets,
        )

    def update_priorities(self, indices: np.ndarray, sequence_ids: np.ndarray, priorities: np.ndarray) -> None:
        """Set new priorities (B,) for sampled windows; windows overwritten since they were
        sampled (their slot now holds another sequence) are skipped.

        Raises:
            ValueError: a negative or non-finite priority.
        """
        priorities = np.asarray(priorities, dtype=np.float64)
        if not np.all(np.isfinite(priorities)) or np.any(priorities < 0):
            raise ValueError("priorities must be finite and >= 0")
        streams, slots = np.divmod(np.asarray(indices), self.slots_per_stream)
        sequence_ids = np.asarray(sequence_ids)
        current = (sequence_ids >= 0) & (self.sequence_id[streams, slots] == sequence_ids)
        if not current.any():
            return
        p = priorities[current] + self.PRIORITY_EPSILON
        self.tree.set(np.asarray(indices)[current], p**self.priority_exponent)
        self.max_priority = max(self.max_priority, float(p.max()))
