"""Single-process R2D2 (Kapturowski et al., ICLR 2019), in one readable file.

    python r2d2_algo/r2d2.py --env-id CartPole-v1

Vector environments act with ε-greedy per-env exploration (each env one rung of the Ape-X ε
ladder) and write sequences to a prioritized sequence replay; the learner burns in the online
and target networks from the stored recurrent state, trains on n-step double-Q targets with
value rescaling, and updates the sampled sequences' priorities. Defaults suit CartPole on a
CPU; the paper's Atari values are given in each field's docstring and are the defaults of
r2d2_mp.py. The algorithm follows R2D2_SPEC.md.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from r2d2_algo.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    atomic_save,
    from_storable,
    learner_state,
    load_learner_state,
    pickled_envs,
    restore_rng_states,
    resume_run,
    rng_states,
    save_model,
    to_storable,
    unpickle_envs,
)
from r2d2_algo.envs import check_env_id, epsilon_ladder, frame_stack_of, make_vector_env
from r2d2_algo.evaluate import (
    EVAL_EPSILON,
    EVAL_SEED_OFFSET,
    evaluate,
    evaluate_saved_model,
)
from r2d2_algo.model import RNNQNetwork, parameter_count
from r2d2_algo.storage import (
    SequenceBatch,
    SequenceReplayBuffer,
    sequence_priorities,
    stack_frames,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (envs, networks, replay sampling, exploration)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and CUDA is available, the network runs on the GPU"""
    save_model: bool = False
    """save the model to `saved_models/{run_name}/model.pt` at the end and evaluate it as evaluate.py does"""
    checkpoint_interval: int = 0
    """env steps between checkpoints to `saved_checkpoints/{run_name}/` (0: none; else Ctrl-C/SIGTERM write one too)"""
    checkpoint_replay: bool = True
    """checkpoints include the replay and its priorities (else a resumed run refills it)"""
    resume: str | None = None
    """checkpoint file or `saved_checkpoints/{run_name}` folder to continue (its arguments are used)"""

    # Environment
    env_id: str = "CartPole-v1"
    """gymnasium id with a Box observation and Discrete actions; `module:EnvId` imports module first"""
    total_timesteps: int = 100_000
    """total environment steps (summed over all envs)"""
    num_envs: int = 8
    """parallel environments; env i explores with ε_i of the Ape-X ladder"""
    epsilon_base: float = 0.4
    """ε ladder base: ε_i = base^(1 + alpha·i/(N−1)) (Ape-X, Sec. 4.1)"""
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
    """replay capacity in observations, over all envs (paper: 4,000,000)"""
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
    learning_starts: int = 2_000
    """environment steps before learning starts"""
    replay_ratio: float = 32.0
    """trained observations sampled per observation added (B·m per update ÷ env steps)"""

    # Evaluation and logging
    eval_interval: int = 5_000
    """environment steps between greedy evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (0: no evaluation)"""
    eval_epsilon: float = EVAL_EPSILON
    """ε of evaluation episodes (evaluate.py's default)"""
    log_interval: int = 1_000
    """environment steps between scalar logs"""
    progress_bar: bool = True
    """show a tqdm progress bar with SPS and recent return"""


# arguments a resumed run may change on its command line; every other one comes from the checkpoint
RESUMABLE_ARGS = ("total_timesteps", "checkpoint_interval", "checkpoint_replay", "save_model", "cuda", "eval_interval",
                  "eval_episodes", "eval_epsilon", "log_interval", "progress_bar")
POSITIVE_ARGS = ("total_timesteps", "num_envs", "hidden_size", "torso_size", "head_hidden_size", "buffer_size",
                 "sequence_length", "batch_size", "n_step", "target_network_update_period", "log_interval")


def check_args(args, positive: tuple[str, ...] = POSITIVE_ARGS) -> None:
    """Refuse inconsistent arguments with a one-line ValueError, before anything is written.

    ``positive`` names the integer fields that must be >= 1 (r2d2_mp.py passes its own)."""
    for name in positive:
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


# ALGO LOGIC: acting
class EnvActor:
    """The acting side of R2D2 for a batch of E environments (R2D2_SPEC.md pieces 1 and 5).

    Acts ε-greedily on the recurrent Q-network, env i with ε = epsilons[i] (its rung of the
    Ape-X ladder), carrying the recurrent state through each episode, and writes every step to
    the replay with the state that entered it (the stored state). With NEXT_STEP autoreset the
    step after a final observation returns the reset observation, which begins an episode:
    the core's state is reset there and the previous action/reward are none.

    The envs may be asynchronous (``make_vector_env(num_splits > 1)``): each ``step`` acts in
    the envs whose observations are at hand and the env returns another batch (its
    ``info["env_id"]``); a step is written to the replay when its reward comes back. ale-py's
    ``reset`` returns the first split only; the other splits' reset observations come back
    from the first ``step`` calls, for envs never acted in: no step is written for them.

    Args:
        envs: vector env of E envs (NEXT_STEP autoreset), reset here with ``seed``.
        q_network: network to act with (its current weights are used at every step).
        replay: SequenceReplayBuffer to write to; ``streams`` (E,) selects its streams.
        epsilons: (E,) exploration rates.
        rng: numpy Generator for exploration.
    """

    def __init__(self, envs, q_network: RNNQNetwork, replay: SequenceReplayBuffer, epsilons: np.ndarray,
                 rng: np.random.Generator, seed: int, device: torch.device | str = "cpu",
                 streams: np.ndarray | None = None):
        self.envs, self.q_network, self.replay, self.epsilons, self.rng = envs, q_network, replay, epsilons, rng
        self.device = device
        self.num_envs, self.n_actions = len(epsilons), int(envs.single_action_space.n)
        E = self.num_envs
        self.streams = np.arange(E) if streams is None else np.asarray(streams)
        self.obs, info = envs.reset(seed=seed)
        self.env_ids = np.asarray(info["env_id"]) if "env_id" in info else np.arange(E)  # envs of `obs`
        self.state = q_network.initial_state(E, device)  # (E, state_size) entering each env's current obs
        self.prev_action = np.full(E, -1, dtype=np.int64)
        self.prev_reward = np.zeros(E, dtype=np.float32)
        self.first = np.ones(E, dtype=bool)
        self.obs_terminated = np.zeros(E, dtype=bool)  # the env's current obs is a final observation
        self.obs_truncated = np.zeros(E, dtype=bool)
        # the step each env is taking: written to replay when its reward comes back
        self.acting = np.zeros(E, dtype=bool)  # its action was sent and its step has not come back
        space = envs.single_observation_space
        self.pending_obs = np.zeros((E, *space.shape), dtype=space.dtype)
        self.pending_action = np.zeros(E, dtype=np.int64)
        self.pending_state = np.zeros((E, q_network.state_size), dtype=np.float32)
        self.episode_return = np.zeros(E)
        self.episode_length = np.zeros(E, dtype=np.int64)
        self.env_steps = 0  # steps written to replay

    def step(self) -> list[tuple[int, float, int]]:
        """Act once in the envs at hand and write the steps that completed to replay.

        Returns:
            (env index, return, length in agent steps) of each episode that ended.
        """
        ids = self.env_ids
        state = self.state[ids]
        with torch.no_grad():
            q, next_state = self.q_network(
                torch.as_tensor(self.obs, device=self.device).unsqueeze(0),
                torch.as_tensor(self.prev_action[ids], device=self.device).unsqueeze(0),
                torch.as_tensor(self.prev_reward[ids], device=self.device).unsqueeze(0),
                torch.as_tensor(self.first[ids], device=self.device).unsqueeze(0),
                state,
            )
        greedy = q[0].argmax(dim=-1).cpu().numpy()
        explore = self.rng.random(len(ids)) < self.epsilons[ids]
        action = np.where(explore, self.rng.integers(0, self.n_actions, len(ids)), greedy)
        self.pending_obs[ids] = self.obs
        self.pending_action[ids] = action
        self.pending_state[ids] = state.cpu().numpy()
        self.state[ids] = next_state
        self.acting[ids] = True
        next_obs, reward, terminated, truncated, infos = self.envs.step(action)
        returned = np.asarray(infos["env_id"]) if "env_id" in infos else ids  # envs of next_obs
        stepped = self.acting[returned]  # False: an env never acted in, returning its reset observation
        back = returned[stepped]  # envs whose step completed
        reward, terminated, truncated = reward[stepped], terminated[stepped], truncated[stepped]
        self.acting[back] = False
        self.env_steps += len(back)

        was_final = self.obs_terminated[back] | self.obs_truncated[back]  # this step was the reset
        self.replay.add(self.pending_obs[back], self.pending_action[back], reward, self.first[back],
                        self.obs_terminated[back], self.obs_truncated[back], self.pending_state[back],
                        streams=self.streams[back])
        self.episode_return[back] += np.where(was_final, 0.0, reward)
        self.episode_length[back] += ~was_final
        ended = back[terminated | truncated]
        finished = [(int(i), float(self.episode_return[i]), int(self.episode_length[i])) for i in ended]
        self.episode_return[ended], self.episode_length[ended] = 0.0, 0
        self.first[back] = was_final
        self.prev_action[back] = np.where(was_final, -1, self.pending_action[back])
        self.prev_reward[back] = np.where(was_final, 0.0, reward)
        self.obs, self.env_ids = next_obs, returned
        self.obs_terminated[back], self.obs_truncated[back] = terminated, truncated
        return finished

    STATE = ("obs", "env_ids", "prev_action", "prev_reward", "first", "obs_terminated", "obs_truncated",
             "acting", "pending_obs", "pending_action", "pending_state", "episode_return", "episode_length",
             "env_steps")

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
) -> tuple[torch.Tensor, np.ndarray, dict[str, float]]:
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
        priorities: (B,) new sequence priorities η·max|δ| + (1−η)·mean|δ|.
        stats: floats for logging (td_loss, q_values).
    """
    l, m = burn_in_length, sequence_length
    obs, prev_action, prev_reward, first = batch["obs"], batch["prev_action"], batch["prev_reward"], batch["first"]
    state = batch["initial_state"]
    with torch.no_grad():
        if l > 0:
            _, state = q_network(obs[:l], prev_action[:l], prev_reward[:l], first[:l], state)
        q_target, _ = target_network(obs, prev_action, prev_reward, first, batch["initial_state"])  # (W, B, A)
    q_online, _ = q_network(obs[l:], prev_action[l:], prev_reward[l:], first[l:], state)  # (m + n, B, A)
    with torch.no_grad():
        best_action = q_online.argmax(dim=-1, keepdim=True)  # double Q: online picks, target evaluates
        bootstrap_q = q_target[l:].gather(-1, best_action).squeeze(-1)  # (m + n, B)
        targets, mask = n_step_targets(batch["reward"][l:], batch["terminated"][l:], batch["truncated"][l:],
                                       bootstrap_q, gamma, n_step, eps)  # (m, B)
    q_taken = q_online[:m].gather(-1, batch["action"][l : l + m].unsqueeze(-1)).squeeze(-1)  # (m, B)
    td = targets - q_taken
    per_sequence = (0.5 * td.pow(2) * mask).sum(0)  # (B,) summed over the valid trained steps
    loss = (batch["weights"] * per_sequence).mean()
    abs_td = td.detach().abs().cpu().numpy()
    priorities = sequence_priorities(abs_td, mask.cpu().numpy(), priority_eta)
    valid = mask.sum().clamp(min=1.0)
    stats = {"td_loss": float((0.5 * td.detach().pow(2) * mask).sum() / valid),
             "q_values": float((q_taken.detach() * mask).sum() / valid)}
    return loss, priorities, stats


def batch_to_torch(batch: SequenceBatch, device: torch.device, frame_stack: int = 1) -> dict[str, torch.Tensor]:
    """numpy SequenceBatch -> dict of tensors on ``device``; frame stacks are rebuilt there."""
    names = ["obs", "action", "reward", "first", "terminated", "truncated", "prev_action", "prev_reward",
             "initial_state", "weights"]
    out = {name: torch.as_tensor(getattr(batch, name)).to(device, non_blocking=True) for name in names}
    if frame_stack > 1:
        frame_first = torch.as_tensor(batch.frame_first).to(device, non_blocking=True)
        out["obs"] = stack_frames(out["obs"], frame_first, frame_stack)  # (W, B, stack, H, W)
    return out


class StopRequest:
    """Ctrl-C / SIGTERM handler: records the signal; the training loop stops at the end of its
    iteration (after writing a checkpoint when checkpoints are on)."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)

    def __call__(self, signum, frame) -> None:
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum


def main(args: Args, argv: list[str] | None = None) -> int:
    """Train; returns the exit code (0, or 128 + signal when stopped by Ctrl-C / SIGTERM)."""
    try:  # everything that can refuse the arguments runs before the run folder is created
        args, checkpoint = resume_run(args, sys.argv[1:] if argv is None else argv, RESUMABLE_ARGS)
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id)
    except ValueError as e:
        raise SystemExit(f"r2d2.py: error: {e}") from None
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    q_network = RNNQNetwork(observation_space, n_actions, args.rnn_type, args.hidden_size, args.torso_size,
                            args.head_hidden_size).to(device)
    target_network = RNNQNetwork(observation_space, n_actions, args.rnn_type, args.hidden_size, args.torso_size,
                                 args.head_hidden_size).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    frame_stack = frame_stack_of(args.env_id)  # Atari: replay keeps single frames
    try:
        rb = SequenceReplayBuffer(
            num_streams=args.num_envs, capacity=args.buffer_size, obs_shape=observation_space.shape,
            obs_dtype=observation_space.dtype, state_size=q_network.state_size, burn_in_length=args.burn_in_length,
            sequence_length=args.sequence_length, n_step=args.n_step, overlap=args.overlap,
            priority_exponent=args.priority_exponent, importance_sampling_exponent=args.importance_sampling_exponent,
            frame_stack=frame_stack,
        )
    except ValueError as e:
        raise SystemExit(f"r2d2.py: error: {e}") from None
    envs = make_vector_env(args.env_id, args.num_envs, args.seed)
    epsilons = epsilon_ladder(args.num_envs, args.epsilon_base, args.epsilon_alpha)  # (E,)
    actor = EnvActor(envs, q_network, rb, epsilons, rng, args.seed, device)

    # the loop's counters: all of them go into checkpoints, so a resumed run continues exactly
    progress = {"global_step": 0, "updates": 0, "elapsed": 0.0, "eval_return": float("nan"),
                "next_eval": args.eval_interval if args.eval_interval > 0 else args.total_timesteps,
                "next_checkpoint": args.checkpoint_interval, "last_log_step": 0, "last_log_updates": 0,
                "last_log_added": 0, "learn_from": args.learning_starts, "updates_base": 0}
    recent_returns: deque[float] = deque(maxlen=20)
    checkpoint_file = os.path.join("saved_checkpoints", run_name, CHECKPOINT_FILE)
    if checkpoint is not None:
        try:
            load_learner_state(checkpoint, q_network, target_network, optimizer)
            progress.update(checkpoint["progress"])
            recent_returns.extend(checkpoint["recent_returns"])
            if checkpoint["replay"] is not None:
                rb.load_state_dict(from_storable(checkpoint["replay"]))
            else:  # an empty replay: learning starts again after learning_starts new steps
                progress.update(learn_from=progress["global_step"] + args.learning_starts,
                                updates_base=progress["updates"])
            if checkpoint["envs"] is not None:  # the envs exactly as they were: the run continues bit for bit
                envs.close()
                envs = actor.envs = unpickle_envs(checkpoint["envs"])
                actor.load_state_dict(from_storable(checkpoint["actor"]))
            else:  # envs that cannot be saved (ale-py) start new episodes; the replay's streams are cut there
                envs.close()
                envs = actor.envs = make_vector_env(args.env_id, args.num_envs, args.seed + progress["global_step"])
                actor.__init__(envs, q_network, rb, epsilons, rng, args.seed + progress["global_step"], device)
                rb.truncate_streams()
                print("the envs could not be saved in the checkpoint (e.g. ale-py's): new episodes start here")
            restore_rng_states(checkpoint["rng"], rng)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            envs.close()
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"r2d2.py: error: checkpoint {args.resume!r} does not fit this run: {first_line[:160]}") \
                from None
        print(f"resuming {run_name} from step {progress['global_step']:,} ({progress['updates']:,} updates)")
        del checkpoint  # the replay copy can be large

    def write_checkpoint() -> None:
        atomic_save({
            "format": CHECKPOINT_FORMAT, "run_name": run_name, "args": vars(args),
            "progress": {**progress, "elapsed": time.time() - start_time},
            **learner_state(q_network, target_network, optimizer),
            "rng": rng_states(rng), "recent_returns": list(recent_returns),
            "actor": to_storable(actor.state_dict()), "envs": pickled_envs(envs),
            "replay": to_storable(rb.state_dict()) if args.checkpoint_replay else None,
        }, checkpoint_file)
        tqdm.write(f"step {progress['global_step']}: checkpoint written to {checkpoint_file}")

    # a resumed run continues its tensorboard folder; events logged after the checkpoint are purged
    writer = SummaryWriter(f"runs/{run_name}", purge_step=progress["global_step"] + 1 if progress["global_step"] else None)
    if progress["global_step"] == 0:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        writer.add_text("epsilon_ladder", ", ".join(f"{e:.5f}" for e in epsilons))
    print(f"run {run_name}: {parameter_count(q_network):,} parameters on {device}, replay "
          f"{rb.capacity_per_stream * args.num_envs:,} observations, ε ladder {epsilons.min():.4f}..{epsilons.max():.2f}")

    start_time = time.time() - progress["elapsed"]
    last_log_time = time.time()
    updates_per_step = args.replay_ratio / (args.batch_size * args.sequence_length)
    stats = None
    stop = StopRequest()
    bar = tqdm(total=args.total_timesteps, initial=progress["global_step"], disable=not args.progress_bar, unit="step",
               dynamic_ncols=True)
    try:
        while progress["global_step"] < args.total_timesteps and not stop.signum:
            # ALGO LOGIC: act ε-greedily with the recurrent state, one rung of the ladder per env
            finished = actor.step()
            progress["global_step"] += args.num_envs
            global_step = progress["global_step"]
            bar.update(args.num_envs)

            for _, episodic_return, episodic_length in finished:
                recent_returns.append(episodic_return)
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)

            # ALGO LOGIC: training, throttled to the replay ratio
            log_due = global_step - progress["last_log_step"] >= args.log_interval
            if global_step >= progress["learn_from"] and rb.num_valid_sequences > 0:
                updates_due = progress["updates_base"] + int((global_step - progress["learn_from"]) * updates_per_step) + 1
                while progress["updates"] < updates_due:
                    batch = rb.sample(args.batch_size, rng)
                    loss, priorities, stats = r2d2_loss(
                        q_network, target_network, batch_to_torch(batch, device, frame_stack), args.burn_in_length,
                        args.sequence_length, args.gamma, args.n_step, args.value_rescaling_epsilon, args.priority_eta,
                    )
                    optimizer.zero_grad()
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
                    optimizer.step()
                    rb.update_priorities(batch.indices, batch.sequence_ids, priorities)
                    progress["updates"] += 1
                    if progress["updates"] % args.target_network_update_period == 0:
                        target_network.load_state_dict(q_network.state_dict())

                if log_due and stats is not None:
                    dt = time.time() - last_log_time
                    updates = progress["updates"]
                    new_updates = updates - progress["last_log_updates"]
                    new_sequences = rb.num_sequences_added - progress["last_log_added"]
                    writer.add_scalar("losses/td_loss", stats["td_loss"], global_step)
                    writer.add_scalar("losses/q_values", stats["q_values"], global_step)
                    writer.add_scalar("losses/grad_norm", float(grad_norm), global_step)
                    writer.add_scalar("charts/updates_per_second", new_updates / dt, global_step)
                    writer.add_scalar("charts/learner_updates", updates, global_step)
                    writer.add_scalar("replay/size", rb.size, global_step)
                    writer.add_scalar("replay/sequences_added_per_second", new_sequences / dt, global_step)
                    writer.add_scalar("replay/sequences_sampled_per_second", new_updates * args.batch_size / dt,
                                      global_step)
                    writer.add_scalar("replay/replay_ratio",
                                      updates * args.batch_size * args.sequence_length / max(global_step, 1), global_step)
                    writer.add_scalar("replay/mean_priority", float(np.mean(priorities)), global_step)
                    writer.add_scalar("replay/max_priority", rb.max_priority, global_step)
                    writer.add_scalar("charts/parameter_lag", 0, global_step)  # actors act with the learner's net
                    progress.update(last_log_updates=updates, last_log_added=rb.num_sequences_added)

            if log_due:
                now = time.time()
                sps = (global_step - progress["last_log_step"]) / (now - last_log_time)
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.add_scalar("charts/epsilon", float(epsilons.mean()), global_step)
                last_log_time = now
                progress["last_log_step"] = global_step
                mean_return = np.mean(recent_returns) if recent_returns else float("nan")
                bar.set_postfix(SPS=f"{sps:.0f}", ret=f"{mean_return:.1f}", eval=f"{progress['eval_return']:.1f}",
                                upd=progress["updates"])

            final_step = global_step >= args.total_timesteps
            # with --save-model the final evaluation is that of the saved model, below
            if args.eval_episodes > 0 and (global_step >= progress["next_eval"] or final_step) \
                    and not (final_step and args.save_model):
                returns, _ = evaluate(q_network, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device,
                                      args.eval_epsilon)
                log_evaluation(writer, returns, global_step, time.time() - start_time)
                progress["eval_return"] = float(returns.mean())
                tqdm.write(f"step {global_step}: eval return {returns.mean():.1f} ± {returns.std():.1f} "
                           f"({time.time() - start_time:.0f}s, {progress['updates']} updates)")
            while global_step >= progress["next_eval"]:
                progress["next_eval"] += args.eval_interval if args.eval_interval > 0 else args.total_timesteps

            if args.checkpoint_interval > 0 and (global_step >= progress["next_checkpoint"] or stop.signum):
                while progress["next_checkpoint"] <= global_step:
                    progress["next_checkpoint"] += args.checkpoint_interval
                write_checkpoint()

        if stop.signum:
            print(f"r2d2.py: stopped by signal {stop.signum} at step {progress['global_step']:,}"
                  + (f"; resume with --resume {os.path.dirname(checkpoint_file)}" if args.checkpoint_interval else ""))
            return 128 + stop.signum
        if args.save_model:
            save_and_evaluate_model(run_name, q_network, args, observation_space, n_actions, writer,
                                    progress["global_step"], start_time, device)
        return 0
    finally:
        bar.close()
        envs.close()
        writer.close()


def save_and_evaluate_model(run_name: str, q_network: RNNQNetwork, args, observation_space, n_actions: int,
                            writer: SummaryWriter, global_step: int, start_time: float, device) -> None:
    """End of a run with --save-model (both scripts): write saved_models/{run_name}/model.pt, then
    evaluate the saved file as evaluate.py does and log it as the final eval/episodic_return."""
    model_path = f"saved_models/{run_name}/model.pt"
    save_model(model_path, q_network, args, observation_space, n_actions)
    print(f"model saved to {model_path}")
    if args.eval_episodes > 0:
        result = evaluate_saved_model(model_path, args.eval_episodes, args.eval_epsilon, device=device)
        log_evaluation(writer, np.array(result["returns"]), global_step, time.time() - start_time)
        print(f"final evaluation of the saved model: {result['mean']:.1f} ± {result['std']:.1f} "
              f"(written to {result['output']})", flush=True)


def log_evaluation(writer: SummaryWriter, returns: np.ndarray, global_step: int, wall_clock: float) -> None:
    """eval/* scalars of one evaluation (both scripts)."""
    writer.add_scalar("eval/episodic_return", float(returns.mean()), global_step)
    writer.add_scalar("eval/episodic_return_std", float(returns.std()), global_step)
    writer.add_scalar("eval/wall_clock_seconds", wall_clock, global_step)


if __name__ == "__main__":
    try:
        sys.exit(main(tyro.cli(Args)))
    except KeyboardInterrupt:
        print("r2d2.py: interrupted", file=sys.stderr)
        sys.exit(130)
