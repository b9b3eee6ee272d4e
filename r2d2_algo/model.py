"""Recurrent Q-network of R2D2 (Kapturowski et al. 2019, Sec. 2.3 and Table 2).

Shapes use T for time (sequence) and B for batch. The recurrent state of every core is one
flat float tensor of shape (B, state_size), so that replay can store it as one array row
(for the LSTM it is [h, c] concatenated).

Cores zero their state at the episode starts marked by a (T, B) ``first`` mask (the replay's
name for it): step t of row b starts a new episode when first[t, b] is True, so the state that
enters step t is zero. This lets a
sampled window cross an episode end (docs/algorithm.md, piece 6).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RNN_TYPES = ("lstm", "gru", "none")


def _segment_layout(first: torch.Tensor):
    """Cut every row of a (T, B) episode-start mask into segments that start at t=0 or at an episode start.

    Returns, all on first's device:
        seg (T, B) int64: global index of the segment that step (t, b) belongs to,
        pos (T, B) int64: position of step (t, b) inside its segment,
        lengths (S,) int64: length of every segment,
        first_seg (B,) int64: global index of the first segment of each row,
        last_seg (B,) int64: global index of the last segment of each row.
    Segments of row b are numbered consecutively, rows in order.
    """
    T, B = first.shape
    starts = first.clone()
    starts[0] = True
    seg_in_row = starts.long().cumsum(0) - 1  # (T, B)
    segs_per_row = seg_in_row[-1] + 1  # (B,)
    first_seg = segs_per_row.cumsum(0) - segs_per_row  # (B,)
    seg = seg_in_row + first_seg  # (T, B)
    num_segs = int(segs_per_row.sum())
    t_index = torch.arange(T, device=first.device).unsqueeze(1).expand(T, B)
    seg_start = torch.empty(num_segs, dtype=torch.long, device=first.device)
    seg_start[seg[starts]] = t_index[starts]
    pos = t_index - seg_start[seg]
    lengths = torch.bincount(seg.flatten(), minlength=num_segs)
    return seg, pos, lengths, first_seg, first_seg + segs_per_row - 1


def _zero_where_reset(state: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Exact zeros where ``keep`` (broadcastable bool) is False, even if the state held inf/nan."""
    return torch.where(keep, state, torch.zeros((), dtype=state.dtype, device=state.device))


class _ResettingRNN(nn.Module):
    """Shared logic of ResettingLSTM and ResettingGRU around one fused torch RNN.

    Without resets the whole (T, B) unroll is one fused ``nn.LSTM``/``nn.GRU`` call. With
    resets, two exact strategies are available and the cheaper one is taken per batch:

    - ``chunked``: cut the time axis at the k distinct steps where any row resets and run
      k + 1 fused calls, zeroing the reset rows' state between them. Costs one call overhead
      per reset step; on CPU the faster one for training at every size measured.
    - ``packed``: cut every row into segments at its resets; all segments form the batch of
      one packed-sequence call (first segments start from the given state, others from
      zeros) and outputs are scattered back: one call however many resets. Used on CUDA
      when resets are dense (many chunks would mean many kernel launches).
    """

    rnn: nn.RNNBase
    num_state_parts: int
    max_chunks_cuda: int = 16  # on CUDA each chunk is a kernel launch: from this many on, pack

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.state_size = self.num_state_parts * hidden_size

    def _split(self, state: torch.Tensor):
        """(B, state_size) -> the torch RNN's state: tensors of shape (1, B, H)."""
        parts = state.unsqueeze(0).chunk(self.num_state_parts, dim=-1)
        return tuple(p.contiguous() for p in parts) if self.num_state_parts > 1 else parts[0].contiguous()

    def _join(self, rnn_state) -> torch.Tensor:
        """The torch RNN's state -> (B, state_size)."""
        if isinstance(rnn_state, tuple):
            return torch.cat(rnn_state, dim=-1).squeeze(0)
        return rnn_state.squeeze(0)

    def forward(self, x: torch.Tensor, state: torch.Tensor, first: torch.Tensor, strategy: str = "auto"):
        """Unroll over a sequence, zeroing the state where ``first`` is True.

        Args:
            x: (T, B, input_size) float inputs.
            state: (B, state_size) float state entering step 0.
            first: (T, B) bool; True at t means step t begins an episode (state zeroed before it).
            strategy: 'auto', 'chunked' or 'packed' (all exact; they differ only in speed).
        Returns:
            out: (T, B, hidden_size) float outputs.
            state: (B, state_size) float state after step T-1.
        """
        if x.shape[0] == 1 and strategy == "auto":
            # acting: one step, where the fused kernel's fixed cost (ms on CPU) dominates
            keep = (~first[0]).unsqueeze(-1)
            out, state = self._cell(x[0], _zero_where_reset(state, keep))
            return out.unsqueeze(0), state
        reset_times = first[1:].any(dim=1).nonzero().flatten() + 1  # (k,) distinct steps > 0
        if strategy == "auto":
            strategy = "packed" if self._packing_is_cheaper(x, len(reset_times)) else "chunked"
        if strategy == "packed" and len(reset_times) > 0:
            return self._packed(x, state, first)
        keep = (~first).unsqueeze(-1)  # (T, B, 1)
        rnn_state = self._split(_zero_where_reset(state, keep[0]))
        bounds = [0, *reset_times.tolist(), x.shape[0]]
        outs = []
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            if t0 > 0:
                if isinstance(rnn_state, tuple):
                    rnn_state = tuple(_zero_where_reset(part, keep[t0]) for part in rnn_state)
                else:
                    rnn_state = _zero_where_reset(rnn_state, keep[t0])
            out, rnn_state = self.rnn(x[t0:t1], rnn_state)
            outs.append(out)
        return torch.cat(outs) if len(outs) > 1 else outs[0], self._join(rnn_state)

    def _packing_is_cheaper(self, x: torch.Tensor, num_reset_steps: int) -> bool:
        """On CPU never: forward + backward of the packed call costs 1.5–7.5× the plain call
        against 1.2–3.4× for chunks, at every size and reset density measured
        (benchmarks/bench_core.py). On CUDA, pack when there are many chunks (kernel launches)."""
        return x.is_cuda and num_reset_steps >= self.max_chunks_cuda

    def _packed(self, x: torch.Tensor, state: torch.Tensor, first: torch.Tensor):
        seg, pos, lengths, first_seg, last_seg = _segment_layout(first)
        num_segs, max_len = lengths.shape[0], int(lengths.max())
        padded = x.new_zeros(max_len, num_segs, x.shape[-1])  # (L, S, input_size)
        padded[pos, seg] = x
        init = state.new_zeros(num_segs, self.state_size)  # (S, state_size)
        init[first_seg] = _zero_where_reset(state, (~first[0]).unsqueeze(-1))
        packed = pack_padded_sequence(padded, lengths.cpu(), enforce_sorted=False)
        out_packed, rnn_state = self.rnn(packed, self._split(init))
        out, _ = pad_packed_sequence(out_packed, total_length=max_len)  # (L, S, H)
        return out[pos, seg], self._join(rnn_state)[last_seg]


class ResettingLSTM(_ResettingRNN):
    """LSTM core whose (h, c) state is zeroed at episode starts; state = [h, c], (B, 2H)."""

    num_state_parts = 2

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        self.rnn = nn.LSTM(input_size, hidden_size)

    def _cell(self, x: torch.Tensor, state: torch.Tensor):
        """One step of nn.LSTM's equations with its weights: x (B, I), state (B, 2H)."""
        h, c = state.chunk(2, dim=-1)
        rnn = self.rnn
        gates = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0) + F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, torch.cat([h, c], dim=-1)


class ResettingGRU(_ResettingRNN):
    """GRU core whose state is zeroed at episode starts; state = h, (B, H)."""

    num_state_parts = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        self.rnn = nn.GRU(input_size, hidden_size)

    def _cell(self, x: torch.Tensor, h: torch.Tensor):
        """One step of nn.GRU's equations with its weights: x (B, I), h (B, H)."""
        rnn = self.rnn
        x_r, x_z, x_n = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0).chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0).chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        return h, h


class FeedForwardCore(nn.Module):
    """Memoryless stand-in for the recurrent core (the paper's feed-forward ablation).

    One Linear + ReLU of the same width; its state has size 0 and is passed through, so the
    rest of R2D2 (replay, burn-in, targets) runs unchanged as n-step double DQN.
    """

    state_size = 0

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.layer = nn.Linear(input_size, hidden_size)

    def forward(self, x: torch.Tensor, state: torch.Tensor, first: torch.Tensor, strategy: str = "auto"):
        """x (T, B, input_size) -> ((T, B, hidden_size), state (B, 0) unchanged)."""
        return F.relu(self.layer(x)), state


def image_layout(shape: tuple[int, ...]) -> str:
    """'chw' or 'hwc' for a 3-D image observation shape; channels are the smallest axis ≤ 4."""
    if shape[0] <= 4 or shape[0] < shape[-1]:
        return "chw"
    return "hwc"


class NatureTorso(nn.Module):
    """Nature-DQN conv torso (Mnih et al. 2015) -> FC ``out_size`` (R2D2 Table 2).

    Takes (N, C, H, W) or (N, H, W, C) uint8 or float images; uint8 are scaled to [0, 1].
    """

    def __init__(self, obs_shape: tuple[int, ...], out_size: int):
        super().__init__()
        self.channels_last = image_layout(obs_shape) == "hwc"
        c, h, w = (obs_shape[2], obs_shape[0], obs_shape[1]) if self.channels_last else obs_shape
        self.convs = nn.Sequential(
            nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, c, h, w)).shape[1]
        self.fc = nn.Linear(n_flat, out_size)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (N, *obs_shape) -> features (N, out_size)."""
        if self.channels_last:
            obs = obs.permute(0, 3, 1, 2)
        x = obs.float().div_(255.0) if obs.dtype == torch.uint8 else obs.float()  # in place: one pass less
        return F.relu(self.fc(self.convs(x)))


class SmallImageTorso(nn.Module):
    """Torso for small images (either side under 36 pixels, e.g. MinAtar's 10×10×C): one 3×3
    conv of 16 channels, stride 1, then FC ``out_size`` (the network of the MinAtar paper, Young &
    Tian 2019, Sec. 4, with R2D2's torso width). Takes (N, C, H, W) or (N, H, W, C); values are
    used as they are (MinAtar's are 0/1)."""

    def __init__(self, obs_shape: tuple[int, ...], out_size: int):
        super().__init__()
        self.channels_last = image_layout(obs_shape) == "hwc"
        c, h, w = (obs_shape[2], obs_shape[0], obs_shape[1]) if self.channels_last else obs_shape
        self.conv = nn.Sequential(nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(16 * (h - 2) * (w - 2), out_size)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (N, *obs_shape) -> features (N, out_size)."""
        if self.channels_last:
            obs = obs.permute(0, 3, 1, 2)
        return F.relu(self.fc(self.conv(obs.float())))


SMALL_IMAGE = 36  # the Nature torso's three convs need at least 36 pixels a side


class MLPTorso(nn.Module):
    """Two Linear + ReLU layers for 1-D vector observations: (N, obs_dim) -> (N, out_size)."""

    def __init__(self, obs_dim: int, out_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, out_size), nn.ReLU(), nn.Linear(out_size, out_size), nn.ReLU())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float())


def make_core(rnn_type: str, input_size: int, hidden_size: int) -> nn.Module:
    """Build the core named by ``rnn_type`` ('lstm', 'gru' or 'none'); ValueError otherwise."""
    cores = {"lstm": ResettingLSTM, "gru": ResettingGRU, "none": FeedForwardCore}
    if rnn_type not in cores:
        raise ValueError(f"rnn_type must be one of {RNN_TYPES}, got {rnn_type!r}")
    return cores[rnn_type](input_size, hidden_size)


class RNNQNetwork(nn.Module):
    """R2D2's recurrent dueling Q-network (Kapturowski et al. 2019, Sec. 2.3, Table 2).

    torso (MLP for 1-D Box observations, Nature-DQN conv for 3-D images, one small conv for
    images under 36 pixels a side)
    -> core input [features, one-hot previous action, tanh(previous reward)]
    -> core (ResettingLSTM, ResettingGRU or feed-forward) -> dueling head (Wang et al. 2016):
    Q = V + A - mean_a A.

    Args:
        observation_space: gymnasium Box, shape (obs_dim,) or an image (C, H, W) / (H, W, C).
        n_actions: number of discrete actions.
        rnn_type: 'lstm' (paper), 'gru' or 'none'.
        hidden_size: width of the core (paper: 512).
        torso_size: width of the torso output (paper: FC 512).
        head_hidden_size: hidden width of each dueling stream (paper: 512).
    Raises:
        ValueError: observation space not a 1-D or 3-D Box, or unknown rnn_type.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        n_actions: int,
        rnn_type: str = "lstm",
        hidden_size: int = 512,
        torso_size: int = 512,
        head_hidden_size: int = 512,
    ):
        super().__init__()
        shape = tuple(observation_space.shape)
        if len(shape) == 1:
            self.torso = MLPTorso(shape[0], torso_size)
        elif len(shape) == 3:
            c, h, w = (shape[2], shape[0], shape[1]) if image_layout(shape) == "hwc" else shape
            if min(h, w) < 3:
                raise ValueError(f"images must be at least 3×3 pixels, got shape {shape}")
            self.torso = NatureTorso(shape, torso_size) if min(h, w) >= SMALL_IMAGE else SmallImageTorso(shape, torso_size)
        else:
            raise ValueError(f"observations must be 1-D vectors or 3-D images, got shape {shape}")
        self.obs_shape = shape
        self.n_actions = n_actions
        self.rnn_type = rnn_type
        self.core = make_core(rnn_type, torso_size + n_actions + 1, hidden_size)
        self.value = nn.Sequential(nn.Linear(hidden_size, head_hidden_size), nn.ReLU(), nn.Linear(head_hidden_size, 1))
        self.advantage = nn.Sequential(
            nn.Linear(hidden_size, head_hidden_size), nn.ReLU(), nn.Linear(head_hidden_size, n_actions)
        )

    @property
    def state_size(self) -> int:
        """Width of the flat recurrent state (2H for LSTM, H for GRU, 0 for none)."""
        return self.core.state_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Zero state, (batch_size, state_size) float32."""
        return torch.zeros(batch_size, self.state_size, device=device)

    def forward(
        self,
        obs: torch.Tensor,
        prev_action: torch.Tensor,
        prev_reward: torch.Tensor,
        first: torch.Tensor,
        state: torch.Tensor,
    ):
        """Q-values along a sequence.

        Args:
            obs: (T, B, *obs_shape), uint8 images or float vectors.
            prev_action: (T, B) int64, action taken before each step; -1 for none (encoded
                as an all-zero one-hot), as at an episode start.
            prev_reward: (T, B) float, reward received before each step (0 at an episode start);
                the core sees tanh of it.
            first: (T, B) bool, True where the step begins an episode (state zeroed there).
            state: (B, state_size) float, recurrent state entering step 0.
        Returns:
            q: (T, B, n_actions) float32; bfloat16 under a bfloat16 autocast (--amp), where the torso
                and the head compute in bfloat16 and the core in float32.
            state: (B, state_size) float32 after the last step.
        """
        T, B = obs.shape[:2]
        features = self.torso(obs.reshape(T * B, *self.obs_shape)).view(T, B, -1)  # (T, B, torso)
        one_hot = F.one_hot(prev_action.clamp(min=0), self.n_actions).float()
        one_hot = one_hot * (prev_action >= 0).unsqueeze(-1).float()  # (T, B, A)
        # the reward enters squashed to (−1, 1), as in Acme's R2D2 (OAREmbedding): a task's reward
        # scale must not saturate the core's gates
        core_in = torch.cat([features, one_hot, torch.tanh(prev_reward.float()).unsqueeze(-1)], dim=-1)
        # the core runs in float32 under any autocast (--amp): on CUDA, autocast runs cuDNN's LSTM in
        # float16 whatever dtype it was given, without gradient scaling; and the state it carries
        # through burn-in and the stored state in replay keep float32's precision on every device
        with torch.autocast(core_in.device.type, enabled=False):
            out, state = self.core(core_in.float(), state.float(), first)  # (T, B, H) float32
        value = self.value(out)  # (T, B, 1)
        advantage = self.advantage(out)  # (T, B, A)
        return value + advantage - advantage.mean(dim=-1, keepdim=True), state


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(np.prod(p.shape) for p in module.parameters() if p.requires_grad))


def load_parameter_vector(module: nn.Module, vector: torch.Tensor | np.ndarray) -> None:
    """Copy a flat vector (P,) of any float dtype and device, in ``module.parameters()`` order
    (``torch.nn.utils.parameters_to_vector``'s layout), into the parameters in place.

    Each parameter keeps its device, dtype and storage (an LSTM's stay inside cuDNN's flat weight
    buffer); values are cast to the parameter's dtype. ``vector_to_parameters`` is not used
    because it rebinds every parameter to a slice of the vector: a CPU vector loaded into a CUDA
    network would leave it on the CPU.

    Raises:
        ValueError: the vector is not 1-D or its length is not the module's parameter count.
    """
    parameters = list(module.parameters())
    if isinstance(vector, np.ndarray) and not vector.flags.writeable:  # e.g. from Ray's object store
        vector = vector.copy()  # torch warns on (and never writes to) a read-only array
    vector = torch.as_tensor(vector)
    if parameters:
        vector = vector.to(parameters[0].device)  # one transfer to a CUDA network, not one per parameter
    total = sum(p.numel() for p in parameters)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"a parameter vector of shape {tuple(vector.shape)} does not fit {total:,} parameters")
    offset = 0
    with torch.no_grad():
        for p in parameters:
            p.copy_(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
