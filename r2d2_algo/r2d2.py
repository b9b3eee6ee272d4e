"""Single-process R2D2 (Kapturowski et al., ICLR 2019), in one readable file.

    python r2d2_algo/r2d2.py --env-id CartPole-v1

A vector of environments acts ε-greedily (each env one rung of the Ape-X ε ladder) with the
recurrent Q-network and writes every step to a prioritized sequence replay; the learner burns in
the online and target networks from the stored recurrent state, trains on n-step double-Q targets
with value rescaling, and updates the sampled sequences' priorities. Defaults suit CartPole on a
CPU; the paper's Atari values are given in each field's docstring and are the defaults of
r2d2_mp.py, which runs the same algorithm with actor processes (diff the two files: what differs
is the process plumbing). The algorithm, and where this code departs from the paper, is described
in docs/algorithm.md.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # this clone's r2d2_algo, installed or not

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from r2d2_algo.arguments import resolve_args
from r2d2_algo.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    atomic_save,
    from_storable,
    learner_state,
    load_learner_state,
    pickled_envs,
    save_model,
    to_storable,
    unpickle_envs,
)
from r2d2_algo.checks import check_common_args, network_bytes
from r2d2_algo.devices import precision_summary, set_float32_precision
from r2d2_algo.envs import check_env_id, epsilon_ladder, frame_stack_of, make_vector_env
from r2d2_algo.evaluate import EVAL_EPSILON, EVAL_SEED_OFFSET, evaluate, evaluate_saved_model
from r2d2_algo.limits import batch_bytes, check_memory, read_limits
from r2d2_algo.model import RNNQNetwork, parameter_count
from r2d2_algo.processes import skip_final_collection
from r2d2_algo.stopping import StopRequest, StopRun
from r2d2_algo.storage import SequenceBatch, SequenceReplayBuffer, stack_frames, window_length
from r2d2_algo.tracking import finish_tracking, log_videos, start_tracking


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (envs, networks, replay sampling, exploration)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and CUDA is available, the learner runs on the GPU"""
    save_model: bool = False
    """save the model to `saved_models/{run_name}/model.pt` at the end and evaluate it as evaluate.py does"""
    capture_video: bool = False
    """record the final evaluation of the saved model (--save-model) as one mp4 per episode under `videos/{run_name}/`"""
    track: bool = False
    """sync the run to Weights & Biases: its tensorboard scalars, arguments and --capture-video videos (needs wandb)"""
    wandb_project_name: str = "r2d2"
    """the Weights & Biases project of --track"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user) of --track (None: your default entity)"""
    checkpoint_interval: int = 0
    """env steps between checkpoints to `saved_checkpoints/{run_name}/` (0: none; else Ctrl-C/SIGTERM/SIGHUP write one too)"""
    checkpoint_replay: bool = True
    """checkpoints include the replay and its priorities (else a resumed run refills it)"""
    resume: str | None = None
    """checkpoint file or `saved_checkpoints/{run_name}` folder to continue (its arguments are used)"""
    preset: Literal["auto", "atari", "atari_fast", "vector", "small_image", "none"] = "auto"
    """defaults for the env's family (r2d2_algo/presets/; auto: by --env-id, none: this script's own)"""

    # Environment and acting
    env_id: str = "CartPole-v1"
    """gymnasium id with Discrete actions and any observation space R2D2 can encode (README, "Which environments"); `module:EnvId` imports module first"""
    env_kwargs: tuple[str, ...] = ()
    """keyword arguments for the constructor of every env of the run (gym.make): key:value items read as YAML (memory_length:30), or one mapping ('{memory_length: 30}'); Atari ids take repeat_action_probability, full_action_space, frameskip"""
    total_timesteps: int = 100_000
    """total environment steps (summed over all envs)"""
    num_envs: int = 8
    """environments, acted on with one batched forward pass per step"""
    epsilon_base: float = 0.4
    """ε ladder base over all envs: ε_i = base^(1 + alpha·i/(N−1)) (Ape-X, Sec. 4.1)"""
    epsilon_alpha: float = 7.0
    """ε ladder exponent range (Ape-X, Sec. 4.1)"""

    # Network
    rnn_type: Literal["lstm", "gru", "none"] = "lstm"
    """recurrent core: lstm (paper), gru, or none (feed-forward ablation: n-step double DQN)"""
    hidden_size: int = 128
    """width of the recurrent core (paper: 512)"""
    torso_size: int = 128
    """width of the torso output (paper: 512)"""
    head_hidden_size: int = 128
    """hidden width of each dueling stream (paper: 512)"""

    # Replay
    buffer_size: int = 100_000
    """replay capacity in observations (paper: 4,000,000; scale to fit RAM: an Atari step takes ~7 KB)"""
    burn_in_length: int = 8
    """burn-in steps l unrolled from the stored state without gradient (paper: 40)"""
    sequence_length: int = 16
    """trained steps m per sequence (paper: 80)"""
    overlap: int = 8
    """steps shared by consecutive sequences; a new one starts every m − overlap steps (paper: 40)"""
    priority_exponent: float = 0.9
    """α: sampling probability ∝ priority^α (paper: 0.9)"""
    importance_sampling_exponent: float = 0.6
    """β: importance weights (N·P(i))^−β (paper: 0.6)"""
    priority_eta: float = 0.9
    """η: sequence priority = η·max|δ| + (1−η)·mean|δ| (paper: 0.9)"""

    # Learner
    learning_rate: float = 1e-3
    """Adam learning rate (paper: 1e-4)"""
    adam_eps: float = 1e-3
    """Adam epsilon (paper: 1e-3)"""
    batch_size: int = 32
    """sequences per minibatch (paper: 64)"""
    gamma: float = 0.99
    """discount γ (paper: 0.997)"""
    n_step: int = 5
    """n of the n-step double-Q target (paper: 5)"""
    value_rescaling_epsilon: float = 1e-3
    """ε of the value rescaling h(x) = sign(x)(√(|x|+1) − 1) + εx (paper: 1e-3)"""
    target_network_update_period: int = 50
    """learner updates between hard target-network copies (paper: 2500)"""
    max_grad_norm: float = 40.0
    """gradient norm clip (Ape-X: 40)"""
    amp: bool = False
    """mixed precision: the learner's torso and head in bfloat16 autocast, its recurrent core in float32 (targets, loss and priorities in float32; acting and evaluation in float32)"""
    tf32: bool = False
    """on CUDA, float32 matrix products, convolutions and LSTMs in TF32 (faster on Ampere and later, ~1e-3 relative error); off: IEEE float32, as on the CPU"""
    learning_starts: int = 2_000
    """environment steps before learning starts"""
    replay_ratio: float = 32.0
    """most trained observations sampled per observation added (B·m per update ÷ env steps); the learner waits above it (paper: ≈ 0.4)"""

    # Evaluation and logging
    eval_interval: int = 5_000
    """environment steps between evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (0: no evaluation)"""
    eval_epsilon: float = EVAL_EPSILON
    """ε of evaluation episodes (evaluate.py's default)"""
    log_interval: int = 1_000
    """environment steps between scalar logs"""
    progress_bar: bool = True
    """show a tqdm progress bar with SPS and recent return"""


# arguments a resumed run may change on its command line; every other one comes from the checkpoint


def check_args(args: Args) -> None:
    """Refuse inconsistent arguments with a one-line ValueError, before anything is written."""
    check_common_args(args)  # seeds, ε ladder, optimizer, exponents, overlap, network memory, names
    for name in ["total_timesteps", "num_envs", "hidden_size", "torso_size", "head_hidden_size", "buffer_size",
                 "sequence_length", "batch_size", "n_step", "target_network_update_period", "log_interval"]:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ["burn_in_length", "learning_starts", "eval_interval", "eval_episodes", "checkpoint_interval"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.gamma <= 1.0:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    if args.learning_rate <= 0 or args.replay_ratio <= 0:
        raise ValueError("--learning-rate and --replay-ratio must be > 0")
    if args.value_rescaling_epsilon < 0:
        raise ValueError(f"--value-rescaling-epsilon must be >= 0, got {args.value_rescaling_epsilon}")
    if not 0.0 <= args.priority_eta <= 1.0:
        raise ValueError(f"--priority-eta must be in [0, 1], got {args.priority_eta}")
    if not 0.0 <= args.eval_epsilon <= 1.0:
        raise ValueError(f"--eval-epsilon must be in [0, 1], got {args.eval_epsilon}")


def make_network(args: Args, observation_space, n_actions: int) -> RNNQNetwork:
    return RNNQNetwork(observation_space, n_actions, args.rnn_type, args.hidden_size, args.torso_size,
                       args.head_hidden_size)


def make_learner(args: Args, observation_space, n_actions: int, device: torch.device):
    """The online network, the target network (a copy of it) and the online network's Adam."""
    q_network = make_network(args, observation_space, n_actions).to(device)
    target_network = make_network(args, observation_space, n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    return q_network, target_network, optimizer


# ALGO LOGIC: acting
class EnvActor:
    """The acting side of R2D2 for a vector of E environments (docs/algorithm.md, pieces 1 and 5).

    Acts ε-greedily on the recurrent Q-network, env i with ε = epsilons[i] (its rung of the
    Ape-X ladder), carrying the recurrent state through each episode, and writes every step to
    the replay with the state that entered it (the stored state). With NEXT_STEP autoreset the
    step after a final observation returns the reset observation, which begins an episode:
    the core's state is reset there and the previous action/reward are none.

    Args:
        envs: vector env of E envs (NEXT_STEP autoreset), reset here with ``seed``.
        q_network: network to act with (its current weights are used at every step).
        replay: SequenceReplayBuffer to write to, one stream per env.
        epsilons: (E,) exploration rates.
        rng: numpy Generator for exploration.
    """

    def __init__(self, envs, q_network: RNNQNetwork, replay: SequenceReplayBuffer, epsilons: np.ndarray,
                 rng: np.random.Generator, seed: int, device: torch.device | str = "cpu"):
        self.envs, self.q_network, self.replay, self.epsilons, self.rng = envs, q_network, replay, epsilons, rng
        self.device = device
        self.num_envs, self.n_actions = len(epsilons), int(envs.single_action_space.n)
        E = self.num_envs
        self.obs, _ = envs.reset(seed=seed)
        self.state = q_network.initial_state(E, device)  # (E, state_size) entering each env's current obs
        self.prev_action = np.full(E, -1, dtype=np.int64)
        self.prev_reward = np.zeros(E, dtype=np.float32)
        self.first = np.ones(E, dtype=bool)
        self.obs_terminated = np.zeros(E, dtype=bool)  # the env's current obs is a final observation
        self.obs_truncated = np.zeros(E, dtype=bool)
        self.episode_return = np.zeros(E)
        self.episode_length = np.zeros(E, dtype=np.int64)
        self.env_steps = 0  # steps written to replay

    def step(self) -> list[tuple[int, float, int]]:
        """Act once in every env and write the steps to replay.

        Returns:
            (env index, return, length in agent steps) of each episode that ended.
        """
        state = self.state
        with torch.no_grad():
            q, next_state = self.q_network(
                torch.as_tensor(self.obs, device=self.device).unsqueeze(0),
                torch.as_tensor(self.prev_action, device=self.device).unsqueeze(0),
                torch.as_tensor(self.prev_reward, device=self.device).unsqueeze(0),
                torch.as_tensor(self.first, device=self.device).unsqueeze(0),
                state,
            )
        greedy = q[0].argmax(dim=-1).cpu().numpy()
        explore = self.rng.random(self.num_envs) < self.epsilons
        action = np.where(explore, self.rng.integers(0, self.n_actions, self.num_envs), greedy)
        self.state = next_state
        next_obs, reward, terminated, truncated, _ = self.envs.step(action)
        back = np.arange(self.num_envs)  # envs whose step completed: all of them
        self.env_steps += len(back)

        was_final = self.obs_terminated | self.obs_truncated  # this step was the reset
        self.replay.add(self.obs, action, reward, self.first, self.obs_terminated, self.obs_truncated,
                        state.cpu().numpy())
        self.episode_return += np.where(was_final, 0.0, reward)
        self.episode_length += ~was_final
        ended = back[terminated | truncated]
        finished = [(int(i), float(self.episode_return[i]), int(self.episode_length[i])) for i in ended]
        self.episode_return[ended], self.episode_length[ended] = 0.0, 0
        self.first = was_final
        self.prev_action = np.where(was_final, -1, action)
        self.prev_reward = np.where(was_final, 0.0, reward).astype(np.float32)
        self.obs = next_obs
        self.obs_terminated, self.obs_truncated = terminated, truncated
        return finished

    STATE = ("obs", "prev_action", "prev_reward", "first", "obs_terminated", "obs_truncated", "episode_return",
             "episode_length", "env_steps")

    def state_dict(self) -> dict:
        """Everything of the acting loop but the envs (for a checkpoint)."""
        return {"state": self.state.cpu().numpy(), **{name: getattr(self, name) for name in self.STATE}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict`` with the envs as they were when it was taken."""
        for name in self.STATE:
            setattr(self, name, state[name])
        self.state = torch.as_tensor(state["state"], device=self.device)


# ALGO LOGIC: value rescaling and n-step double-Q targets (R2D2 Sec. 2.3; Pohlen et al. 2018)
def value_rescale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """h(x) = sign(x)(√(|x|+1) − 1) + εx, elementwise."""
    return torch.sign(x) * (torch.sqrt(x.abs() + 1.0) - 1.0) + eps * x


def inverse_value_rescale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """h⁻¹(x) = sign(x)·(((√(1 + 4ε(|x| + 1 + ε)) − 1) / 2ε)² − 1), the exact inverse of h."""
    if eps == 0.0:
        return torch.sign(x) * ((x.abs() + 1.0) ** 2 - 1.0)
    return torch.sign(x) * (((torch.sqrt(1.0 + 4.0 * eps * (x.abs() + 1.0 + eps)) - 1.0) / (2.0 * eps)) ** 2 - 1.0)


def n_step_targets(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    bootstrap_q: torch.Tensor,
    gamma: float,
    n_step: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R2D2 targets y_t = h(Σ_{k<n} γ^k r_{t+k} + γ^n h⁻¹(q̂_{t+n})) for t = 0..L−n−1.

    An episode end inside the n steps stops the sum there: at a terminated observation
    nothing is bootstrapped, at a truncated one the value is bootstrapped from that final
    observation (time limits are not terminal). An observation both terminated and truncated
    (the last allowed step was also a failure) is terminal. A step whose own observation is
    final has no target (its action was never executed) and is masked out.

    Args:
        reward: (L, B) reward after each step's action.
        terminated, truncated: (L, B) bool flags of each step's observation.
        bootstrap_q: (L, B) rescaled Q_target(s_j, argmax_a Q_online(s_j, a)) at each step j.
        gamma, n_step, eps: discount γ, n, value-rescaling ε.
    Returns:
        targets: (L − n, B) float, rescaled targets y_t.
        mask: (L − n, B) float, 1 where step t has a target.
    """
    T = reward.shape[0] - n_step
    last = terminated | truncated
    running = ~last[:T]  # (T, B) the step has a target and its episode is still going
    mask = running.float()
    discounted = torch.zeros_like(reward[:T])
    bootstrap = torch.zeros_like(reward[:T])
    value = inverse_value_rescale(bootstrap_q, eps)  # (L, B) unrescaled values
    for k in range(n_step):
        discounted += running * (gamma**k) * reward[k : k + T]
        ends = running & last[k + 1 : k + 1 + T]
        # termination wins over a time limit at the same step (gymnasium's TimeLimit sets both)
        truncated_only = truncated[k + 1 : k + 1 + T] & ~terminated[k + 1 : k + 1 + T]
        bootstrap += (ends & truncated_only) * (gamma ** (k + 1)) * value[k + 1 : k + 1 + T]
        running = running & ~last[k + 1 : k + 1 + T]
    bootstrap += running * (gamma**n_step) * value[n_step : n_step + T]
    return value_rescale(discounted + bootstrap, eps), mask


def r2d2_loss(
    q_network: RNNQNetwork,
    target_network: RNNQNetwork,
    batch: dict[str, torch.Tensor],
    burn_in_length: int,
    sequence_length: int,
    gamma: float,
    n_step: int,
    eps: float,
    priority_eta: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Burn-in from the stored state, n-step double-Q loss and new sequence priorities.

    The online network is burned in without gradient on the first l steps, then unrolled with
    gradient on the remaining m + n; the target network unrolls the whole window from the
    same stored state (R2D2 Sec. 3, "burn-in"). Loss per sequence = sum over its valid
    trained steps of ½δ², weighted by the importance weights, averaged over the batch. The
    sum over time is the reduction of Acme's and SEED RL's R2D2 learners, which pair it with
    the paper's Adam ε of 1e-3 (the paper does not state it); a mean over the m steps would
    shrink every gradient m-fold, below the scale at which Adam's ε damps the step.

    Args:
        batch: tensors of a SequenceBatch (time-major, see storage.py).
    Returns:
        loss: scalar tensor with gradient.
        priorities: (B,) tensor, new sequence priorities η·max|δ| + (1−η)·mean|δ| over the valid
            trained steps (storage.sequence_priorities is the numpy reference).
        stats: 0-dim tensors for logging (td_loss, q_values; q_discrepancy_first and _last, the
            paper's ΔQ, when the batch has ``later_states``), on the batch's device.
    """
    l, m = burn_in_length, sequence_length
    obs, prev_action, prev_reward, first = batch["obs"], batch["prev_action"], batch["prev_reward"], batch["first"]
    state = batch["initial_state"]
    with torch.no_grad():
        if l > 0:
            _, state = q_network(obs[:l], prev_action[:l], prev_reward[:l], first[:l], state)
        q_target, _ = target_network(obs, prev_action, prev_reward, first, batch["initial_state"])  # (W, B, A)
    q_online, _ = q_network(obs[l:], prev_action[l:], prev_reward[l:], first[l:], state)  # (m + n, B, A)
    q_target, q_online = q_target.float(), q_online.float()  # under --amp the networks return bfloat16
    with torch.no_grad():
        best_action = q_online.argmax(dim=-1, keepdim=True)  # double Q: online picks, target evaluates
        bootstrap_q = q_target[l:].gather(-1, best_action).squeeze(-1)  # (m + n, B)
        targets, mask = n_step_targets(batch["reward"][l:], batch["terminated"][l:], batch["truncated"][l:],
                                       bootstrap_q, gamma, n_step, eps)  # (m, B)
    q_taken = q_online[:m].gather(-1, batch["action"][l : l + m].unsqueeze(-1)).squeeze(-1)  # (m, B)
    td = targets - q_taken
    per_sequence = (0.5 * td.pow(2) * mask).sum(0)  # (B,) summed over the valid trained steps
    loss = (batch["weights"] * per_sequence).mean()
    with torch.no_grad():  # priorities and stats stay on the device: update() reads them once, at its end
        abs_td = td.abs() * mask
        mean_abs_td = abs_td.sum(0) / mask.sum(0).clamp(min=1.0)
        priorities = priority_eta * abs_td.max(0).values + (1.0 - priority_eta) * mean_abs_td  # (B,)
        valid = mask.sum().clamp(min=1.0)
        stats = {"td_loss": (0.5 * td.pow(2) * mask).sum() / valid, "q_values": (q_taken * mask).sum() / valid}
        offsets = batch.get("later_state_offsets", [])
        if offsets and batch["initial_state"].shape[-1] > 0:  # a recurrent core, and actor states inside the window
            stats.update(q_discrepancy(q_network, batch, q_online, l, m, offsets))
    return loss, priorities, stats


def q_discrepancy(q_network: RNNQNetwork, batch: dict[str, torch.Tensor], q_online: torch.Tensor, l: int, m: int,
                  offsets: list[int]) -> dict[str, torch.Tensor]:
    """The paper's measure of recurrent-state staleness and representational drift (R2D2 Sec. 3):
    ΔQ = ‖q(ŝ_t; θ) − q(s_t; θ)‖₂ / max_{a, t'} |q(ŝ_t'; θ)_a|, where ŝ_t is the state the learner
    computed (the window's stored state, through the burn-in) and s_t the state the actor had
    when it acted (stored at the start of a later sequence), both through the learner's network θ;
    the scale is the largest |Q| of the sequence's trained steps (the paper divides by |max Q|,
    the same when Q > 0). Averaged over the batch's intact windows, at the first and the last
    offset of ``offsets`` (storage.later_state_offsets). Call without gradient.

    Args:
        q_online: (m + n, B, A) the learner's Q-values from window offset l on.
        offsets: window offsets (≥ l, < l + m) of ``batch["later_states"]`` (J, B, state_size).
    Returns:
        {"q_discrepancy_first": 0-dim tensor, "q_discrepancy_last": 0-dim tensor}.
    """
    J, B = len(offsets), q_online.shape[1]
    obs, steps = batch["obs"][offsets], (1, J * B)  # (J, B, *obs_shape): one step from each actor state
    q_acted, _ = q_network(obs.reshape(1, J * B, *obs.shape[2:]), batch["prev_action"][offsets].reshape(steps),
                           batch["prev_reward"][offsets].reshape(steps), batch["first"][offsets].reshape(steps),
                           batch["later_states"].reshape(J * B, -1))
    q_learner = q_online[[o - l for o in offsets]]  # (J, B, A)
    scale = q_online[:m].abs().amax(dim=(0, 2)).clamp(min=1e-6)  # (B,)
    discrepancy = (q_learner - q_acted.float().reshape(q_learner.shape)).norm(dim=-1) / scale  # (J, B)
    intact = (batch["weights"] > 0).float()  # a window overwritten while it was read has weight 0
    mean = (discrepancy * intact).sum(1) / intact.sum().clamp(min=1.0)  # (J,)
    return {"q_discrepancy_first": mean[0], "q_discrepancy_last": mean[-1]}


def batch_to_torch(batch: SequenceBatch, device: torch.device, frame_stack: int = 1) -> dict[str, torch.Tensor]:
    """numpy SequenceBatch -> dict of tensors on ``device``; frame stacks are rebuilt there."""
    names = ["obs", "action", "reward", "first", "terminated", "truncated", "prev_action", "prev_reward",
             "initial_state", "weights"]
    out = {name: torch.as_tensor(getattr(batch, name)).to(device, non_blocking=True) for name in names}
    if batch.later_states is not None:  # the actor's states inside the window (R2D2 Sec. 3's ΔQ)
        out["later_states"] = torch.as_tensor(batch.later_states).to(device, non_blocking=True)
        out["later_state_offsets"] = [int(o) for o in batch.later_state_offsets]
    if frame_stack > 1:
        frame_first = torch.as_tensor(batch.frame_first).to(device, non_blocking=True)
        out["obs"] = stack_frames(out["obs"], frame_first, frame_stack)  # (W, B, stack, H, W)
    return out


# ALGO LOGIC: one learner update
def update(q_network: RNNQNetwork, target_network: RNNQNetwork, optimizer: torch.optim.Optimizer,
           batch: dict[str, torch.Tensor], args: Args, updates: int, stop: StopRequest) -> tuple[np.ndarray, dict]:
    """One Adam step on the R2D2 loss of ``batch``, gradients clipped to --max-grad-norm; every
    --target-network-update-period updates (``updates`` counts this one) the target network copies
    the online one. Ctrl-C during the forward and backward pass abandons the update, unapplied
    (StopRun). Returns the batch's new priorities (B,) and floats for logging."""
    with stop.interruptible(q_network, target_network):
        with torch.autocast(batch["obs"].device.type, torch.bfloat16, enabled=args.amp):
            loss, priorities, stats = r2d2_loss(q_network, target_network, batch, args.burn_in_length,
                                                args.sequence_length, args.gamma, args.n_step,
                                                args.value_rescaling_epsilon, args.priority_eta)
        optimizer.zero_grad()
        loss.backward()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
    optimizer.step()
    if updates % args.target_network_update_period == 0:
        target_network.load_state_dict(q_network.state_dict())
    # the update's one host synchronisation, once all of its work is queued on the device
    priorities, stats = priorities.cpu().numpy(), {name: float(value) for name, value in stats.items()}
    stats["mean_priority"] = float(np.mean(priorities))
    return priorities, stats


def log_scalars(writer: SummaryWriter, global_step: int, updates: int, replay: SequenceReplayBuffer, stats: dict,
                epsilon: float, last: dict, args: Args) -> tuple[float, float]:
    """The scalars of a log interval (README: Logged quantities); ``last`` holds the time, step,
    update and sequence counts of the previous log and is updated. Returns the interval's SPS and
    learner updates per second."""
    dt = time.time() - last["time"]
    sps, updates_per_second = (global_step - last["step"]) / dt, (updates - last["updates"]) / dt
    writer.add_scalar("charts/SPS", sps, global_step)
    writer.add_scalar("charts/epsilon", epsilon, global_step)
    writer.add_scalar("charts/updates_per_second", updates_per_second, global_step)
    writer.add_scalar("charts/learner_updates", updates, global_step)
    writer.add_scalar("replay/size", replay.size, global_step)
    writer.add_scalar("replay/sequences_added_per_second", (replay.num_sequences_added - last["added"]) / dt,
                      global_step)
    writer.add_scalar("replay/sequences_sampled_per_second", (updates - last["updates"]) * args.batch_size / dt,
                      global_step)
    writer.add_scalar("replay/replay_ratio", updates * args.batch_size * args.sequence_length / max(global_step, 1),
                      global_step)
    writer.add_scalar("replay/max_priority", replay.max_priority, global_step)
    if stats:
        writer.add_scalar("replay/mean_priority", stats["mean_priority"], global_step)
        writer.add_scalar("losses/td_loss", stats["td_loss"], global_step)
        writer.add_scalar("losses/q_values", stats["q_values"], global_step)
        writer.add_scalar("losses/grad_norm", stats["grad_norm"], global_step)
        if "q_discrepancy_first" in stats:
            writer.add_scalar("losses/q_discrepancy_first", stats["q_discrepancy_first"], global_step)
            writer.add_scalar("losses/q_discrepancy_last", stats["q_discrepancy_last"], global_step)
    last.update(time=time.time(), step=global_step, updates=updates, added=replay.num_sequences_added)
    return sps, updates_per_second


def initial_progress(args: Args) -> dict:
    """The training loop's counters (checkpointed, so that a resumed run continues exactly)."""
    return {"global_step": 0, "updates": 0, "elapsed": 0.0, "evaluated_at": -1,
            "next_eval": args.eval_interval if args.eval_interval > 0 else None, "next_log": args.log_interval,
            "next_checkpoint": args.checkpoint_interval, "learn_from": args.learning_starts, "updates_base": 0}


def open_writer(run_name: str, args: Args, sources: dict, global_step: int, epsilons: np.ndarray) -> SummaryWriter:
    """Tensorboard writer of runs/{run_name}, with the arguments and the ε ladder as text, the
    arguments in runs/{run_name}/args.json (read back by analysis.py) and where each came from in
    args_sources.json (arguments.resolve_args). A resumed run continues its
    folder; the events logged after its checkpoint are purged. With --track, W&B syncs them."""
    start_tracking(args, run_name)  # before the writer: W&B syncs every scalar it writes
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1 if global_step else None)
    if global_step == 0:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        writer.add_text("epsilon_ladder", ", ".join(f"{e:.5f}" for e in epsilons))
    with open(f"runs/{run_name}/args.json", "w") as f:
        json.dump(vars(args), f, indent=1)
    with open(f"runs/{run_name}/args_sources.json", "w") as f:
        json.dump(sources, f, indent=1)
    return writer


def log_evaluation(writer: SummaryWriter, returns: np.ndarray, global_step: int, wall_clock: float) -> None:
    """eval/* scalars of one evaluation."""
    writer.add_scalar("eval/episodic_return", float(returns.mean()), global_step)
    writer.add_scalar("eval/episodic_return_std", float(returns.std()), global_step)
    writer.add_scalar("eval/wall_clock_seconds", wall_clock, global_step)


def save_and_evaluate_model(run_name: str, q_network: RNNQNetwork, args: Args, observation_space, n_actions: int,
                            writer: SummaryWriter, global_step: int, wall_clock: float, device) -> None:
    """--save-model: write saved_models/{run_name}/model.pt, then evaluate the saved file as
    evaluate.py does and log that as the run's final evaluation."""
    model_path = f"saved_models/{run_name}/model.pt"
    save_model(model_path, q_network, args, observation_space, n_actions)
    print(f"model saved to {model_path}")
    if args.eval_episodes > 0:
        result = evaluate_saved_model(model_path, args.eval_episodes, args.eval_epsilon, device=device,
                                      capture_video=args.capture_video)
        log_evaluation(writer, np.array(result["returns"]), global_step, wall_clock)
        log_videos(result["videos"])  # --track: to W&B
        print(f"final evaluation of the saved model: {result['mean']:.1f} ± {result['std']:.1f} "
              f"(written to {result['output']})", flush=True)


def main(args: Args, argv: list[str] | None = None) -> int:
    """Train; returns the exit code (0, or 128 + signal when stopped by Ctrl-C / SIGTERM / SIGHUP)."""
    try:  # everything that can refuse the arguments runs before the run folder is created
        # defaults, then the preset, the command line and the checkpoint; prints what the preset set
        args, checkpoint, sources = resolve_args(args, argv, os.path.basename(__file__))
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id, env_kwargs=args.env_kwargs)
        frame_stack = frame_stack_of(args.env_id)  # Atari: replay keeps single frames
        replay_kwargs = dict(
            num_streams=args.num_envs, capacity=args.buffer_size, obs_shape=observation_space.shape,
            obs_dtype=observation_space.dtype, state_size=make_network(args, observation_space, n_actions).state_size,
            burn_in_length=args.burn_in_length, sequence_length=args.sequence_length, n_step=args.n_step,
            overlap=args.overlap, priority_exponent=args.priority_exponent,
            importance_sampling_exponent=args.importance_sampling_exponent, frame_stack=frame_stack)
        replay_bytes, limits = SequenceReplayBuffer.shared_nbytes(**replay_kwargs), read_limits()
        window = window_length(args.burn_in_length, args.sequence_length, args.n_step)
        others = {"a learner batch": batch_bytes(args.batch_size, window, observation_space.shape,
                                                 observation_space.dtype),
                  "networks and Adam": network_bytes(args.hidden_size, args.torso_size, args.head_hidden_size,
                                                     args.rnn_type)}
        fit = max(0, int(0.9 * args.buffer_size * (limits.memory_bytes - sum(others.values())) / replay_bytes))
        check_memory({"replay": replay_bytes, **others}, limits,
                     f"lower --buffer-size (about {fit:,} fit) or --batch-size")
        replay = SequenceReplayBuffer(**replay_kwargs)
    except ValueError as e:
        raise SystemExit(f"r2d2.py: error: {e}") from None
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    checkpoint_file = os.path.join("saved_checkpoints", run_name, CHECKPOINT_FILE)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)  # replay sampling and exploration
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    set_float32_precision(args.tf32)  # on CUDA: TF32 or IEEE float32 (--tf32)
    torch.set_num_threads(min(torch.get_num_threads(), limits.cpus))  # torch counts cores, not a cgroup CPU quota
    q_network, target_network, optimizer = make_learner(args, observation_space, n_actions, device)
    envs = make_vector_env(args.env_id, args.num_envs, args.seed, env_kwargs=args.env_kwargs)
    epsilons = epsilon_ladder(args.num_envs, args.epsilon_base, args.epsilon_alpha)  # (E,) one rung per env
    actor = EnvActor(envs, q_network, replay, epsilons, rng, args.seed, device)

    progress = initial_progress(args)
    recent_returns: deque[float] = deque(maxlen=20)
    if checkpoint is not None:
        try:
            load_learner_state(checkpoint, q_network, target_network, optimizer, rng, progress, recent_returns, replay,
                               args.learning_starts)
            envs.close()
            if checkpoint["envs"] is not None:  # the envs exactly as they were: the run continues bit for bit
                envs = actor.envs = unpickle_envs(checkpoint["envs"])
                actor.load_state_dict(from_storable(checkpoint["actor"]))
            else:  # envs that cannot be saved (ale-py) start new episodes; the replay's streams are cut there
                envs = make_vector_env(args.env_id, args.num_envs, args.seed + progress["global_step"],
                                       env_kwargs=args.env_kwargs)
                actor = EnvActor(envs, q_network, replay, epsilons, rng, args.seed + progress["global_step"], device)
                replay.cut_streams()
                print("the envs could not be saved in the checkpoint (e.g. ale-py's): new episodes start here")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            envs.close()
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"r2d2.py: error: checkpoint {args.resume!r} does not fit this run: {first_line[:160]}") \
                from None
        print(f"resuming {run_name} from step {progress['global_step']:,} ({progress['updates']:,} updates)")
        del checkpoint  # the replay copy can be large

    def write_checkpoint() -> None:
        progress["elapsed"] = time.time() - start_time
        atomic_save({
            "format": CHECKPOINT_FORMAT, "run_name": run_name, "args": vars(args),
            **learner_state(q_network, target_network, optimizer, rng, progress, recent_returns, replay,
                            args.checkpoint_replay),
            "actor": to_storable(actor.state_dict()), "envs": pickled_envs(envs),
        }, checkpoint_file)
        tqdm.write(f"step {progress['global_step']:,}: checkpoint written to {checkpoint_file}")

    writer = open_writer(run_name, args, sources, progress["global_step"], epsilons)
    print(f"run {run_name}: {parameter_count(q_network):,} parameters on {device} "
          f"({precision_summary(device, args.amp, args.tf32)}), replay "
          f"{replay.capacity_per_stream * args.num_envs:,} observations, ε ladder {epsilons.min():.4f}..{epsilons.max():.2f}"
          f"; {limits.cpus_phrase()}: "
          f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() != 1 else ''}", flush=True)

    start_time = time.time() - progress["elapsed"]
    last = {"time": time.time(), "step": progress["global_step"], "updates": progress["updates"],
            "added": replay.num_sequences_added}
    global_step, updates, stats = progress["global_step"], progress["updates"], {}
    stop = StopRequest()
    bar = tqdm(total=args.total_timesteps, initial=global_step, disable=not args.progress_bar, unit="step",
               dynamic_ncols=True)
    try:
        while global_step < args.total_timesteps:
            stop.check()
            # ALGO LOGIC: act ε-greedily with the recurrent state, one rung of the ladder per env
            for _, episodic_return, episodic_length in actor.step():
                recent_returns.append(episodic_return)
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)
            global_step = progress["global_step"] = progress["global_step"] + args.num_envs
            bar.update(args.num_envs)

            # ALGO LOGIC: train while the replay ratio allows (trained observations per observation added)
            learn_from = progress["learn_from"]
            while global_step >= learn_from and replay.num_valid_sequences > 0 and \
                    (updates - progress["updates_base"]) * args.batch_size * args.sequence_length \
                    <= args.replay_ratio * (global_step - learn_from):
                batch = replay.sample(args.batch_size, rng)
                priorities, stats = update(q_network, target_network, optimizer, batch_to_torch(batch, device, frame_stack),
                                           args, updates + 1, stop)
                replay.update_priorities(batch.indices, batch.sequence_ids, priorities)
                updates = progress["updates"] = updates + 1

            if global_step >= progress["next_log"]:
                sps, updates_per_second = log_scalars(writer, global_step, updates, replay, stats,
                                                      float(epsilons.mean()), last, args)
                writer.add_scalar("charts/parameter_lag", 0, global_step)  # the actors act with the learner's net
                mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "–"  # no episode ended yet
                bar.set_postfix(SPS=f"{sps:.0f}", ret=mean_return, upd=updates)
                while progress["next_log"] <= global_step:
                    progress["next_log"] += args.log_interval

            # with --save-model the final evaluation is that of the saved model, after the loop
            final_step = args.save_model and global_step >= args.total_timesteps
            if args.eval_episodes > 0 and progress["next_eval"] is not None and global_step >= progress["next_eval"] \
                    and not final_step:
                returns, _ = evaluate(q_network, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device,
                                      args.eval_epsilon, env_kwargs=args.env_kwargs)
                log_evaluation(writer, returns, global_step, time.time() - start_time)
                progress["evaluated_at"] = updates
                tqdm.write(f"step {global_step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f} "
                           f"({time.time() - start_time:.0f}s, {updates:,} updates)")
                while progress["next_eval"] <= global_step:
                    progress["next_eval"] += args.eval_interval

            if args.checkpoint_interval > 0 and global_step >= progress["next_checkpoint"]:
                while progress["next_checkpoint"] <= global_step:
                    progress["next_checkpoint"] += args.checkpoint_interval
                write_checkpoint()

        if last["step"] != global_step:  # the final count, always
            writer.add_scalar("charts/learner_updates", updates, global_step)
        if args.save_model:  # the final evaluation is that of the saved model, as evaluate.py does it
            save_and_evaluate_model(run_name, q_network, args, observation_space, n_actions, writer, global_step,
                                    time.time() - start_time, device)
        elif args.eval_episodes > 0 and progress["evaluated_at"] != updates:  # final weights not evaluated yet
            returns, _ = evaluate(q_network, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device,
                                  args.eval_epsilon, env_kwargs=args.env_kwargs)
            log_evaluation(writer, returns, global_step, time.time() - start_time)
            tqdm.write(f"step {global_step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f} "
                       f"({time.time() - start_time:.0f}s, {updates:,} updates)")
        return 0
    except StopRun as e:
        print(f"r2d2.py: stopping at step {global_step:,}: {e}", file=sys.stderr, flush=True)
        if args.checkpoint_interval > 0:
            write_checkpoint()
            print(f"resume with --resume {os.path.dirname(checkpoint_file)}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        stop.restore()
        bar.close()
        envs.close()
        writer.close()


if __name__ == "__main__":
    try:
        exit_code = main(tyro.cli(Args), sys.argv[1:])
    except KeyboardInterrupt:
        print("r2d2.py: interrupted", file=sys.stderr)
        exit_code = 130
    finish_tracking(exit_code)  # --track: the W&B run ends after the writer was closed
    skip_final_collection()  # everything is closed: leave the last garbage collection out
    sys.exit(exit_code)
