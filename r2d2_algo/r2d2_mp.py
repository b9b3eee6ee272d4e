"""R2D2 on one machine (Kapturowski et al., ICLR 2019): actor processes feed one learner through
shared memory.

    python r2d2_algo/r2d2_mp.py --env-id PongNoFrameskip-v4

The algorithm is r2d2.py's, in the same lines (diff the two files: what differs is the process
plumbing); the process roles and the shared memory between them (all created by ``main``, the
layout declared in ``create_shared_memory``):

    actor() × N   envs + CPU copy of the network, ε-greedy; writes every step straight into the
                  replay's shared arrays (obs, action, reward, flags, stored state, write counts);
                  every --actor-update-interval actor steps asks for newer weights and loads them
    inference_server()  (--inference central) the network on the learner's device and every
                  env's recurrent state; answers the actors' requests (request slots in shared
                  memory, ``create_inference_memory``) with batched forward passes; the actors
                  then hold no network
    evaluator()   CPU copy of the published weights; plays evaluation episodes when asked
    learner()     main process, GPU when available:
                    Prefetcher thread: syncs the replay index with the actors' write counts,
                                       samples prioritized windows, applies priority updates
                    main thread:       burn-in, n-step double-Q loss, Adam, target copies;
                                       publishes weights (with a version) when an actor asks,
                                       asks for evaluations, logs, writes checkpoints
    main()        builds the shared memory, starts the roles (Processes), runs the learner,
                  and stops everything however the run ends

Defaults are the paper's Atari values (docs/algorithm.md) except the replay capacity, scaled to
a workstation. A run that stops for any reason (end, Ctrl-C, SIGTERM, SIGHUP, an exception in the
learner, an actor that died once more than --max-actor-restarts allows) stops its processes
within seconds and unlinks its shared memory; a dead actor is reported by name with its
traceback.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the heavy imports below load: nothing to clean, leave quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import contextlib
import ctypes
import dataclasses
import json
import os
import queue
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Literal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # this clone's r2d2_algo, installed or not

import numpy as np
import torch
import torch.multiprocessing as mp
import tyro
from tqdm import tqdm
from torch.nn.utils import parameters_to_vector
from torch.utils.tensorboard import SummaryWriter

from r2d2_algo.arguments import resolve_args
from r2d2_algo.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    atomic_save,
    learner_state,
    load_learner_state,
    save_model,
)
from r2d2_algo.checks import check_common_args, network_bytes
from r2d2_algo.devices import precision_summary, set_float32_precision
from r2d2_algo.envs import check_env_id, default_env_threads, epsilon_ladder, frame_stack_of, make_vector_env
from r2d2_algo.evaluate import EVAL_EPSILON, EVAL_SEED_OFFSET, evaluate, evaluate_saved_model
from r2d2_algo.limits import (PROCESS_BYTES, batch_bytes, check_memory, check_shared_memory, read_limits, size,
                              usable_cpus)
from r2d2_algo.model import RNNQNetwork, load_parameter_vector, parameter_count
from r2d2_algo.processes import skip_final_collection
from r2d2_algo.shared import SharedArrays, start_resource_tracker
from r2d2_algo.stopping import STOP_SIGNALS, StopRequest, StopRun
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
    env_id: str = "PongNoFrameskip-v4"
    """gymnasium id with Discrete actions and any observation space R2D2 can encode (README, "Which environments"); `module:EnvId` imports module first"""
    env_kwargs: tuple[str, ...] = ()
    """keyword arguments for the constructor of every env of the run (gym.make): key:value items read as YAML (memory_length:30), or one mapping ('{memory_length: 30}'); Atari ids take repeat_action_probability, full_action_space, frameskip"""
    total_timesteps: int = 10_000_000
    """total environment steps (summed over all envs)"""
    num_actors: int = dataclasses.field(default_factory=lambda: max(1, usable_cpus()[0] - 1))
    """actor processes (default: the usable CPUs left after the learner: affinity mask, cgroup CPU quota)"""
    num_envs_per_actor: int = 0
    """environments per actor, acted on with one batched forward pass per env split. 0: 64 (= 2 × 32:
    the forward pass is bound by reading the weights, so larger batches cost little more per call), or
    fewer when there are so many actors that each env's replay stream would keep under 8 windows"""
    env_splits: int = 2
    """Atari: each actor's envs step in this many batches, one stepping in ale-py's C++ threads while
    the network acts on another (double buffering); other envs always use 1"""
    env_threads: int = 0
    """Atari: C++ threads per actor stepping its envs (ale-py AtariVectorEnv); 0: the usable CPUs shared among the actors"""
    learner_threads: int = 0
    """the learner's torch CPU threads; 0: the usable CPUs the actors leave (at least 1, at most torch's own
    count). More helps a CPU learner whose actors wait for it (--min-replay-ratio)"""
    inference: Literal["auto", "local", "central"] = "auto"
    """where the actors' forward passes run: local (each actor its own CPU copy of the network) or central (one
    inference process on the learner's device batches them for all actors, as SEED RL); auto: central when the
    learner is on a GPU, else local"""
    actor_update_interval: int = 400
    """actor steps (batched forward passes, one per env split) between an actor's weight refreshes
    (paper: 400 steps of an actor's single env); an actor that waited (--min-replay-ratio, a checkpoint) also refreshes"""
    max_actor_restarts: int = 3
    """actors that die are restarted this many times per run (their env streams are cut there);
    one more death stops the run"""
    epsilon_base: float = 0.4
    """ε ladder base over all envs: ε_i = base^(1 + alpha·i/(N−1)) (Ape-X, Sec. 4.1)"""
    epsilon_alpha: float = 7.0
    """ε ladder exponent range (Ape-X, Sec. 4.1)"""

    # Network
    rnn_type: Literal["lstm", "gru", "none"] = "lstm"
    """recurrent core: lstm (paper), gru, or none (feed-forward ablation: n-step double DQN)"""
    hidden_size: int = 512
    """width of the recurrent core (paper: 512)"""
    torso_size: int = 512
    """width of the torso output (paper: 512)"""
    head_hidden_size: int = 512
    """hidden width of each dueling stream (paper: 512)"""

    # Replay
    buffer_size: int = 1_000_000
    """replay capacity in observations (paper: 4,000,000; scale to fit RAM: an Atari step takes ~7 KB)"""
    burn_in_length: int = 40
    """burn-in steps l unrolled from the stored state without gradient (paper: 40)"""
    sequence_length: int = 80
    """trained steps m per sequence (paper: 80)"""
    overlap: int = 40
    """steps shared by consecutive sequences; a new one starts every m − overlap steps (paper: 40)"""
    priority_exponent: float = 0.9
    """α: sampling probability ∝ priority^α (paper: 0.9)"""
    importance_sampling_exponent: float = 0.6
    """β: importance weights (N·P(i))^−β (paper: 0.6)"""
    priority_eta: float = 0.9
    """η: sequence priority = η·max|δ| + (1−η)·mean|δ| (paper: 0.9)"""

    # Learner
    learning_rate: float = 1e-4
    """Adam learning rate (paper: 1e-4)"""
    adam_eps: float = 1e-3
    """Adam epsilon (paper: 1e-3)"""
    batch_size: int = 64
    """sequences per minibatch (paper: 64)"""
    gamma: float = 0.997
    """discount γ (paper: 0.997)"""
    n_step: int = 5
    """n of the n-step double-Q target (paper: 5)"""
    value_rescaling_epsilon: float = 1e-3
    """ε of the value rescaling h(x) = sign(x)(√(|x|+1) − 1) + εx (paper: 1e-3)"""
    target_network_update_period: int = 2500
    """learner updates between hard target-network copies (paper: 2500)"""
    max_grad_norm: float = 40.0
    """gradient norm clip (Ape-X: 40)"""
    amp: bool = False
    """mixed precision: the learner's torso and head in bfloat16 autocast, its recurrent core in float32
    (targets, loss and priorities in float32; actors and evaluation in float32)"""
    tf32: bool = False
    """on CUDA, float32 matrix products, convolutions and LSTMs in TF32 (faster on Ampere and later, ~1e-3
    relative error); off: IEEE float32, as on the CPU"""
    learning_starts: int = 10_000
    """environment steps before learning starts"""
    replay_ratio: float = 0.4
    """most trained observations sampled per observation added (B·m per update ÷ env steps); the learner
    waits above it (paper: ≈ 0.4, its 5 updates/s × 64 × 80 against 256 actors × 260 steps/s)"""
    min_replay_ratio: float = 0.0
    """fewest trained observations per observation added: the actors wait while the learner is below it
    (0: the actors never wait, as in the paper; set it when a slow learner, e.g. on CPU, falls behind)"""

    # Evaluation and logging
    eval_interval: int = 0
    """environment steps between evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (0: no evaluation)"""
    eval_epsilon: float = EVAL_EPSILON
    """ε of evaluation episodes (evaluate.py's default)"""
    log_interval: int = 20_000
    """environment steps between scalar logs"""
    progress_bar: bool = True
    """show a tqdm progress bar with SPS and recent return (when stderr is a terminal)"""


# arguments a resumed run may change on its command line; every other one comes from the checkpoint


def check_args(args: Args) -> None:
    """Refuse inconsistent arguments with a one-line ValueError, before anything is written."""
    check_common_args(args)  # seeds, ε ladder, optimizer, exponents, overlap, network memory, names
    for name in ["total_timesteps", "num_actors", "env_splits", "actor_update_interval", "hidden_size", "torso_size",
                 "head_hidden_size", "buffer_size", "sequence_length", "batch_size", "n_step",
                 "target_network_update_period", "log_interval"]:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ["burn_in_length", "learning_starts", "eval_interval", "eval_episodes", "checkpoint_interval",
                 "num_envs_per_actor", "env_threads", "learner_threads", "max_actor_restarts"]:
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
    if not 0.0 <= args.min_replay_ratio <= args.replay_ratio:
        raise ValueError(f"--min-replay-ratio must be in [0, --replay-ratio={args.replay_ratio}], "
                         f"got {args.min_replay_ratio}")


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
        inference: central inference (InferenceClient): the forward pass runs in the inference
            process, which keeps the recurrent states; ``q_network`` then gives only the state size.
    """

    def __init__(self, envs, q_network: RNNQNetwork, replay: SequenceReplayBuffer, epsilons: np.ndarray,
                 rng: np.random.Generator, seed: int, device: torch.device | str = "cpu",
                 streams: np.ndarray | None = None, inference: InferenceClient | None = None):
        self.envs, self.q_network, self.replay, self.epsilons, self.rng = envs, q_network, replay, epsilons, rng
        self.device, self.inference = device, inference
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
        self.episode_return = np.zeros(E)
        self.episode_length = np.zeros(E, dtype=np.int64)
        self.env_steps = 0  # steps written to replay
        # the step each env is taking: written to replay when its reward comes back
        self.acting = np.zeros(E, dtype=bool)  # its action was sent and its step has not come back
        space = envs.single_observation_space
        self.pending_obs = np.zeros((E, *space.shape), dtype=space.dtype)
        self.pending_action = np.zeros(E, dtype=np.int64)
        self.pending_state = np.zeros((E, q_network.state_size), dtype=np.float32)

    def step(self) -> list[tuple[int, float, int]]:
        """Act once in the envs at hand and write the steps that completed to replay.

        Returns:
            (env index, return, length in agent steps) of each episode that ended.
        """
        ids = self.env_ids
        if self.inference is not None:  # central inference: the inference process keeps the states
            greedy, state = self.inference.act(ids, self.obs, self.prev_action[ids], self.prev_reward[ids],
                                               self.first[ids])
        else:
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
            self.state[ids] = next_state
            state = state.cpu().numpy()
        explore = self.rng.random(len(ids)) < self.epsilons[ids]
        action = np.where(explore, self.rng.integers(0, self.n_actions, len(ids)), greedy)
        self.pending_obs[ids], self.pending_action[ids], self.pending_state[ids] = self.obs, action, state
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
        self.prev_reward[back] = np.where(was_final, 0.0, reward).astype(np.float32)
        self.obs, self.env_ids = next_obs, returned
        self.obs_terminated[back], self.obs_truncated[back] = terminated, truncated
        return finished


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


# PROCESS PLUMBING: the shared-memory layout, declared in one place
MAX_ENVS_PER_ACTOR = 64  # the default: the peak of an actor's SPS on Pong (README, bench_mp.py)
MIN_WINDOWS_PER_STREAM = 8  # fewer envs per actor than MAX when each env stream would hold fewer windows


def resolve_envs_per_actor(args: Args, frame_stack: int) -> int:
    """``--num-envs-per-actor``, or for 0 the default: MAX_ENVS_PER_ACTOR, or fewer (a multiple of
    the env splits, at least one split each) so that every env's replay stream holds at least
    MIN_WINDOWS_PER_STREAM windows. Every stream leaves under one window of its newest and oldest
    steps unsampleable, so 8 windows keep ≥ 90 % of the replay sampleable (tests/test_r2d2_mp.py);
    with 127 actors and a 1 M replay that means 6 envs per actor instead of 64."""
    if args.num_envs_per_actor > 0:
        return args.num_envs_per_actor
    splits = args.env_splits if frame_stack > 1 else 1
    window = window_length(args.burn_in_length, args.sequence_length, args.n_step)
    fit = args.buffer_size // (args.num_actors * MIN_WINDOWS_PER_STREAM * window)
    return max(splits, min(MAX_ENVS_PER_ACTOR, fit) // splits * splits)


def replay_arguments(args: Args, observation_space, state_size: int, frame_stack: int) -> dict:
    """Constructor arguments of the shared replay, the same in the learner and every actor."""
    period = args.sequence_length - args.overlap
    return dict(
        num_streams=args.num_actors * args.num_envs_per_actor, capacity=args.buffer_size,
        obs_shape=observation_space.shape, obs_dtype=observation_space.dtype, state_size=state_size,
        burn_in_length=args.burn_in_length, sequence_length=args.sequence_length, n_step=args.n_step,
        overlap=args.overlap, priority_exponent=args.priority_exponent,
        importance_sampling_exponent=args.importance_sampling_exponent, frame_stack=frame_stack,
        # a window leaves the sampling index this many steps before it can be overwritten, so the
        # prefetch thread seldom copies a window an actor is overwriting: half a period is ~0.5 s
        # of one Atari stream's writing (a copy takes ~0.1 s), and costs at most one period of
        # each stream. A window overwritten all the same is dropped from the loss (storage.py).
        overwrite_margin=period // 2,
    )


def create_shared_memory(arrays: SharedArrays, replay_kwargs: dict, num_params: int, num_actors: int):
    """Every segment of a run (learner side). Returns the learner's indexed replay.

    replay:   obs, action, reward, first, terminated, truncated (per env stream and step),
              stored_state, start_prev_action, start_prev_reward (per sequence), write_count
    weights:  the learner's parameters as one float32 vector, and weights_version (its update
              count; -1 until the first publication, which the actors wait for);
              weights_wanted: an actor (or the inference process, last) asks for newer weights
              (the learner publishes only then)
    counters: actor_steps (env steps per actor), actor_weights_version (version each actor acts with)
    checkpoints: pause (the learner asks the actors to wait), actor_paused (each actor waits)
    rate limit: allowed_steps (the env steps the run may reach before the actors wait for the
              learner, --min-replay-ratio; inf: no limit)
    """
    replay = SequenceReplayBuffer(**replay_kwargs, index=True, allocate=arrays.allocate)
    arrays.allocate("weights", (num_params,), np.float32)
    arrays.allocate("weights_version", (1,), np.int64)[0] = -1
    arrays.allocate("actor_steps", (num_actors,), np.int64)
    arrays.allocate("actor_weights_version", (num_actors,), np.int64)
    arrays.allocate("weights_wanted", (num_actors + 1,), np.int64)  # the last: the inference process
    arrays.allocate("pause", (1,), np.int64)  # set by the learner while it writes a checkpoint
    arrays.allocate("actor_paused", (num_actors,), np.int64)  # each actor's acknowledgement
    arrays.allocate("allowed_steps", (1,), np.float64)[0] = np.inf
    return replay


def take_weights_lock(lock, holder: str = "a process killed while it copied the weights?") -> None:
    """Learner side: acquire the weights lock. One still held after 2 s was taken by a process
    killed while it copied the weights (a copy takes milliseconds), which will never release it:
    the learner takes it over (any process may release a multiprocessing lock), said on stderr
    with the ``holder`` it assumes."""
    if not lock.acquire(timeout=2.0):
        print(f"r2d2_mp.py: the weights lock was held for 2 s ({holder}); taken over", file=sys.stderr, flush=True)


def publish(network: torch.nn.Module, weights: np.ndarray, version: np.ndarray, lock, updates: int) -> None:
    """Learner side: copy the parameters into the shared float32 vector ``weights`` (P,) and set
    ``version`` (1,) int64 to ``updates``, both under ``lock`` (R2D2 Sec. 2.3: actors act with
    the learner's recent weights). The lock is taken with ``take_weights_lock``: the learner can
    publish before it sees that an actor died holding it, and would otherwise wait forever."""
    take_weights_lock(lock)
    try:
        weights[:] = parameters_to_vector(network.parameters()).detach().cpu().numpy()
        version[0] = updates
    finally:
        lock.release()


def load_published_weights(network: torch.nn.Module, weights: np.ndarray, version: np.ndarray, lock) -> int:
    """Actor side of ``publish``: load the shared weights into ``network``; returns their version."""
    with lock:
        load_parameter_vector(network, weights)  # in place: device, dtype and storage stay
        return int(version[0])


def ignore_stop_signals(name: str, parent_pid: int) -> None:
    """First lines of a child process: the learner handles Ctrl-C / SIGTERM / SIGHUP for the whole
    run (children start with them blocked, see Processes.spawn, and ignore them from here), and a
    learner that dies without stopping them (SIGKILL, the OOM killer) takes them along at once
    (PR_SET_PDEATHSIG; the loops' own checks of the parent are the fallback). ``name`` is the role
    shown by ps and top (Linux: /proc/PID/comm, 15 characters)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the learner died before the line above
            os._exit(0)
    except (OSError, AttributeError):  # not Linux: the default name stays
        pass
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)


def wait_for_weights(arrays: SharedArrays, parent_pid: int, stop_event) -> bool:
    """Wait until the learner has published its first weights (after resuming a checkpoint, if
    any); False if the run stopped first or the learner is gone."""
    while arrays["weights_version"][0] < 0:
        if os.getppid() != parent_pid or stop_event.is_set():
            return False
        time.sleep(0.01)
    return True


# CENTRAL INFERENCE (SEED RL, Espeholt et al. 2020): one process acts for every actor
INFERENCE_INPUTS = ("obs", "stream", "prev_action", "prev_reward", "first", "new")


def create_inference_memory(arrays: SharedArrays, num_actors: int, batch: int, observation_space, state_size: int):
    """One request slot per actor (an actor has one forward pass in flight at a time):

    inputs:  inference_obs (A, batch, *obs_shape) obs dtype, inference_stream (A, batch) int64 (the
             env's replay stream), inference_prev_action int64, inference_prev_reward float32,
             inference_first bool, inference_new bool (an env this actor has not acted in: zero its
             state), inference_count (A,) int64 (rows in use)
    outputs: inference_greedy (A, batch) int64, inference_state (A, batch, state_size) float32
             (the state that entered the step: the one the replay stores)
    flags:   inference_request / inference_response (A,) int64: the actor's request number, and the
             last one answered
    """
    A = num_actors
    arrays.allocate("inference_obs", (A, batch, *observation_space.shape), observation_space.dtype)
    arrays.allocate("inference_stream", (A, batch), np.int64)
    arrays.allocate("inference_prev_action", (A, batch), np.int64)
    arrays.allocate("inference_prev_reward", (A, batch), np.float32)
    arrays.allocate("inference_first", (A, batch), bool)
    arrays.allocate("inference_new", (A, batch), bool)
    arrays.allocate("inference_count", (A,), np.int64)
    arrays.allocate("inference_greedy", (A, batch), np.int64)
    arrays.allocate("inference_state", (A, batch, state_size), np.float32)
    arrays.allocate("inference_request", (A,), np.int64)
    arrays.allocate("inference_response", (A,), np.int64)


class InferenceClient:
    """Actor side of central inference: ``act`` writes one batch of observations into the actor's
    slot, wakes the inference process and waits for its answer. Raises StopRun if the run stops
    (or the learner is gone) while it waits."""

    def __init__(self, arrays: SharedArrays, actor_id: int, num_envs: int, requests, response_ready, stop_event,
                 parent_pid: int):
        self.inputs = {name: arrays[f"inference_{name}"][actor_id] for name in INFERENCE_INPUTS}
        self.greedy, self.state = arrays["inference_greedy"][actor_id], arrays["inference_state"][actor_id]
        self.count = arrays["inference_count"][actor_id : actor_id + 1]
        self.request = arrays["inference_request"][actor_id : actor_id + 1]
        self.response = arrays["inference_response"][actor_id : actor_id + 1]
        self.requests, self.response_ready, self.stop_event, self.parent_pid = requests, response_ready, stop_event, parent_pid
        self.first_stream = actor_id * num_envs
        self.acted = np.zeros(num_envs, dtype=bool)  # envs this actor has acted in (their state is on the server)
        self.wait(int(self.request[0]))  # a restarted actor: the dead one's last request is answered first

    def act(self, ids: np.ndarray, obs: np.ndarray, prev_action: np.ndarray, prev_reward: np.ndarray,
            first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greedy actions (n,) int64 and entering states (n, state_size) float32 for the envs ``ids``
        (n,) of this actor, given their observations (n, *obs_shape) and previous action, reward
        and first flags (n,)."""
        n = len(ids)
        self.inputs["obs"][:n], self.inputs["stream"][:n] = obs, self.first_stream + ids
        self.inputs["prev_action"][:n], self.inputs["prev_reward"][:n] = prev_action, prev_reward
        self.inputs["first"][:n], self.inputs["new"][:n] = first, ~self.acted[ids]
        self.acted[ids] = True
        self.count[0] = n
        number = int(self.request[0]) + 1
        self.request[0] = number  # after the inputs: the inference process reads them once it sees it
        self.requests.release()
        self.wait(number)
        return self.greedy[:n].copy(), self.state[:n].copy()

    def wait(self, number: int) -> None:
        while self.response[0] != number:
            if not self.response_ready.acquire(timeout=0.1) and (
                    self.stop_event.is_set() or os.getppid() != self.parent_pid):
                raise StopRun("the run stopped while waiting for actions")


def inference_server(args: Args, layout: dict, weights_lock, requests, responses: list, stop_event, error_queue,
                     observation_space, n_actions: int, parent_pid: int, device_name: str) -> None:
    """Serve every actor's forward passes on ``device_name`` (the learner's device), batching all
    requests at hand into one forward pass. Keeps the recurrent state of every env (zeroed when an
    actor starts acting in it) and answers each request with the greedy actions and the states
    that entered the step. Its weights follow the actors' rule: newer ones are asked for once the
    actors have taken --actor-update-interval steps each on average since the last refresh, or
    while they wait (--min-replay-ratio, a checkpoint); its version is every actor's."""
    ignore_stop_signals("r2d2-inference", parent_pid)
    arrays = SharedArrays.attach(layout)
    try:
        device = torch.device(device_name)
        set_float32_precision(args.tf32)  # as the learner's
        A, E = args.num_actors, args.num_envs_per_actor
        net = make_network(args, observation_space, n_actions).to(device)
        inputs = {name: arrays[f"inference_{name}"] for name in INFERENCE_INPUTS}
        greedy_out, state_out, count = arrays["inference_greedy"], arrays["inference_state"], arrays["inference_count"]
        request, response = arrays["inference_request"], arrays["inference_response"]
        weights, version = arrays["weights"], arrays["weights_version"]
        wanted, acting_version = arrays["weights_wanted"][A : A + 1], arrays["actor_weights_version"][:A]
        pause, allowed, all_steps = arrays["pause"], arrays["allowed_steps"], arrays["actor_steps"][:A]
        state = net.initial_state(A * E, device)  # (A·E, state_size): entering each env's current obs
        pinned = device.type == "cuda"
        staging = torch.empty((A * inputs["obs"].shape[1], *observation_space.shape),
                              dtype=torch.from_numpy(inputs["obs"][:0]).dtype, pin_memory=pinned)
        if not wait_for_weights(arrays, parent_pid, stop_event):
            return
        acting_version[:] = load_published_weights(net, weights, version, weights_lock)
        served = 0  # actor steps served since the last refresh
        while not stop_event.is_set() and os.getppid() == parent_pid:
            if served >= args.actor_update_interval * A or pause[0] or all_steps.sum() >= allowed[0]:
                wanted[0] = 1
                if version[0] > acting_version[0]:
                    acting_version[:] = load_published_weights(net, weights, version, weights_lock)
                    wanted[0], served = 0, 0
            if not requests.acquire(timeout=0.05):
                continue
            while requests.acquire(block=False):  # one wake-up for every request at hand
                pass
            numbers = request.copy()
            slots = np.flatnonzero(numbers != response)
            if len(slots) == 0:
                continue
            counts = count[slots].copy()
            rows = [(a, k) for a, k in zip(slots, counts)]
            total = int(counts.sum())
            obs = staging[:total]
            np.concatenate([inputs["obs"][a, :k] for a, k in rows], out=obs.numpy())
            small = {name: torch.from_numpy(np.concatenate([inputs[name][a, :k] for a, k in rows])).to(device)
                     for name in ("stream", "prev_action", "prev_reward", "first", "new")}
            streams = small["stream"]
            with torch.no_grad():
                state[streams[small["new"]]] = 0.0
                entering = state[streams]
                q, next_state = net(obs.to(device, non_blocking=pinned).unsqueeze(0), small["prev_action"].unsqueeze(0),
                                    small["prev_reward"].unsqueeze(0), small["first"].unsqueeze(0), entering)
                state[streams] = next_state
                greedy, entering = q[0].argmax(dim=-1).cpu().numpy(), entering.cpu().numpy()
            offset = 0
            for a, k in rows:
                greedy_out[a, :k], state_out[a, :k] = greedy[offset : offset + k], entering[offset : offset + k]
                response[a] = numbers[a]  # after the outputs: the actor reads them once it sees it
                responses[a].release()
                offset += k
            served += len(rows)
    except Exception:
        error_queue.put(("inference", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        arrays.close()
        skip_final_collection()  # this process exits next


# ACTOR PROCESS
def actor(actor_id: int, args: Args, layout: dict, replay_kwargs: dict, weights_lock, stop_event, episode_queue,
          error_queue, observation_space, n_actions: int, parent_pid: int, seed_offset: int,
          inference_channel: tuple | None = None) -> None:
    """Step ``num_envs_per_actor`` envs with ε-greedy actions of a CPU copy of the network and
    write every step to the shared replay. Env j of this actor is stream / ε rung
    actor_id · num_envs_per_actor + j. Every ``actor_update_interval`` actor steps it asks for
    newer weights and loads them as soon as the learner has published them. While the learner's
    ``pause`` flag is set (a checkpoint is being written), or once all actors together have
    taken ``total_timesteps`` steps, or the learner is below ``min_replay_ratio``, the actor waits
    between steps, and it resumes with the newest published weights. ``seed_offset`` (the resumed
    step count, or the step of a restart) gives new episodes. With ``inference_channel`` (the
    inference process's request semaphore and this actor's response semaphore) the forward passes
    run in the central inference process, which also keeps the weights up to date."""
    ignore_stop_signals(f"r2d2-actor-{actor_id}", parent_pid)
    arrays = SharedArrays.attach(layout)
    envs = None
    try:
        E = args.num_envs_per_actor
        seed = args.seed + 1000 * (actor_id + 1) + seed_offset
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        splits = args.env_splits if frame_stack_of(args.env_id) > 1 else 1
        # with splits, the env threads run ahead in the background: the policy thread comes first
        threads = args.env_threads or default_env_threads(args.num_actors)
        envs = make_vector_env(args.env_id, E, seed, num_splits=splits, num_threads=threads,  # built while the
                               thread_niceness=10 if splits > 1 else 0, env_kwargs=args.env_kwargs)  # learner starts
        if not wait_for_weights(arrays, parent_pid, stop_event):  # (and, resuming, restores the replay)
            return
        streams = actor_id * E + np.arange(E)
        epsilons = epsilon_ladder(args.num_actors * E, args.epsilon_base, args.epsilon_alpha)[streams]
        net = make_network(args, observation_space, n_actions)  # central inference: only its sizes are used
        replay = SequenceReplayBuffer(**replay_kwargs, index=False, allocate=arrays.get)
        weights, version = arrays["weights"], arrays["weights_version"]
        acting_version = arrays["actor_weights_version"][actor_id : actor_id + 1]
        wanted = arrays["weights_wanted"][actor_id : actor_id + 1]
        client = None if inference_channel is None else InferenceClient(arrays, actor_id, E, *inference_channel,
                                                                        stop_event, parent_pid)
        if client is None:
            acting_version[0] = load_published_weights(net, weights, version, weights_lock)
        env_actor = EnvActor(envs, net, replay, epsilons, rng, seed, streams=streams, inference=client)
        steps_since_refresh = 0  # actor steps (batched forward passes)
        steps_before = int(arrays["actor_steps"][actor_id])  # a resumed or restarted actor continues the count
        pause, paused, allowed = arrays["pause"], arrays["actor_paused"], arrays["allowed_steps"]
        all_steps = arrays["actor_steps"][: args.num_actors]

        def must_wait() -> bool:  # a checkpoint, a learner below --min-replay-ratio, or the run's steps are done
            return bool(pause[0] or all_steps.sum() >= min(allowed[0], args.total_timesteps))

        while not stop_event.is_set():
            if os.getppid() != parent_pid:
                return  # the learner is gone: nobody will read what we write
            if must_wait():
                paused[actor_id] = 1
                wanted[0] = client is None  # resume with the newest weights: the learner went on while we waited
                while must_wait() and not stop_event.is_set() and os.getppid() == parent_pid:
                    time.sleep(0.002)
                paused[actor_id] = 0
                if client is None and version[0] > acting_version[0]:
                    acting_version[0] = load_published_weights(net, weights, version, weights_lock)
                    wanted[0], steps_since_refresh = 0, 0
                continue
            for _, episodic_return, episodic_length in env_actor.step():
                episode_queue.put((episodic_return, episodic_length))
            arrays["actor_steps"][actor_id] = steps_before + env_actor.env_steps
            steps_since_refresh += 1
            if client is None and steps_since_refresh >= args.actor_update_interval:
                wanted[0] = 1  # the learner publishes its next update for us
                if version[0] > acting_version[0]:
                    acting_version[0] = load_published_weights(net, weights, version, weights_lock)
                    wanted[0], steps_since_refresh = 0, 0
    except StopRun:  # the run stopped while this actor waited for central inference
        return
    except Exception:
        error_queue.put((f"actor-{actor_id}", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if envs is not None:
            envs.close()
        arrays.close()
        skip_final_collection()  # this process exits next


# EVALUATOR PROCESS
def evaluator(args: Args, layout: dict, weights_lock, requests, results, error_queue, observation_space,
              n_actions: int, parent_pid: int) -> None:
    """For each request (the env step to log it at), play ``eval_episodes`` episodes with
    ε = ``eval_epsilon`` on a CPU copy of the latest published weights and put
    (step, weights version, returns (episodes,) float64) on ``results``. It runs beside the
    learner at a lower CPU priority (nice 10), so learning never waits for an evaluation; a
    ``None`` request, or a learner that is gone, ends it."""
    ignore_stop_signals("r2d2-evaluator", parent_pid)
    try:
        os.nice(10)
    except OSError:  # not allowed here: it keeps the normal priority
        pass
    arrays = SharedArrays.attach(layout)
    try:
        net = make_network(args, observation_space, n_actions)
        while os.getppid() == parent_pid:
            try:
                global_step = requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if global_step is None:
                return
            weights_version = load_published_weights(net, arrays["weights"], arrays["weights_version"], weights_lock)
            returns, _ = evaluate(net, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, "cpu",
                                  args.eval_epsilon, env_kwargs=args.env_kwargs)
            results.put((global_step, weights_version, returns))
    except Exception:
        error_queue.put(("evaluator", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        arrays.close()
        skip_final_collection()  # this process exits next


class Processes:
    """The child processes of a run (main's plumbing): starts the actors and the evaluator,
    restarts an actor that dies (up to --max-actor-restarts), carries their queues, and stops
    them all. Children are started with SIGINT, SIGTERM and SIGHUP blocked (see ``spawn``)."""

    def __init__(self, args: Args, arrays: SharedArrays, replay_kwargs: dict, observation_space, n_actions: int):
        self.args, self.arrays, self.replay_kwargs = args, arrays, replay_kwargs
        self.observation_space, self.n_actions = observation_space, n_actions
        self.ctx = mp.get_context("spawn")
        self.weights_lock, self.stop_event = self.ctx.Lock(), self.ctx.Event()
        # one episode queue per actor: an actor killed while it writes to its queue can leave the
        # queue's write lock held, which would silence every other actor sharing it
        self.episode_queues = [self.ctx.Queue() for _ in range(args.num_actors)]
        self.error_queue, self.eval_requests, self.eval_results = self.ctx.Queue(), self.ctx.Queue(), self.ctx.Queue()
        self.actors: list = []
        self.evaluator, self.inference = None, None
        if args.inference == "central":  # an actor's request wakes the inference process, which answers on the actor's
            self.inference_requests = self.ctx.Semaphore(0)
            self.inference_responses = [self.ctx.Semaphore(0) for _ in range(args.num_actors)]
        self.restarts, self.checked_at, self.reported_errors = 0, 0.0, []
        self.cut_streams, self.writer = None, None  # set by the learner (attach)

    def attach(self, cut_streams, writer: SummaryWriter) -> None:
        """``cut_streams(streams)`` marks where a dead actor's env streams stopped; restarts are
        logged to ``writer``."""
        self.cut_streams, self.writer = cut_streams, writer

    def spawn(self, target, name: str, *process_args):
        # Ctrl-C in a terminal, a SIGTERM to the group or a closed terminal's SIGHUP reaches every
        # process, and only the learner must act on it (it pauses the actors for a last checkpoint,
        # then stops them). Children start with them blocked (the mask is inherited through exec,
        # before Python even loads) and ignore them from their first line. Blocked, not ignored,
        # here too: a stop that arrives during the spawn (about a second) is not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process = self.ctx.Process(target=target, name=name, daemon=True, args=process_args)
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return process

    def start_actor(self, actor_id: int, seed_offset: int):
        channel = None
        if self.inference is not None:
            channel = (self.inference_requests, self.inference_responses[actor_id])
        return self.spawn(actor, f"actor-{actor_id}", actor_id, self.args, self.arrays.layout, self.replay_kwargs,
                          self.weights_lock, self.stop_event, self.episode_queues[actor_id], self.error_queue,
                          self.observation_space, self.n_actions, os.getpid(), seed_offset, channel)

    def start(self, seed_offset: int, device: torch.device, stop_check) -> None:
        """Start the inference process (central inference, on ``device``), every actor (they wait
        for the learner's first weights) and the evaluator. ``stop_check()`` runs after each start
        (a second each on a busy machine) and raises StopRun to start no more."""
        if self.args.inference == "central":
            self.inference = self.spawn(inference_server, "inference", self.args, self.arrays.layout, self.weights_lock,
                                        self.inference_requests, self.inference_responses, self.stop_event,
                                        self.error_queue, self.observation_space, self.n_actions, os.getpid(),
                                        str(device))
            stop_check()
        for actor_id in range(self.args.num_actors):
            self.actors.append(self.start_actor(actor_id, seed_offset))
            stop_check()
        if self.args.eval_episodes > 0:
            self.evaluator = self.spawn(evaluator, "evaluator", self.args, self.arrays.layout, self.weights_lock,
                                        self.eval_requests, self.eval_results, self.error_queue,
                                        self.observation_space, self.n_actions, os.getpid())

    def traceback_of(self, process) -> str:
        """The traceback a dead process reported, or its exit code if it reported none (a signal)."""
        deadline = time.time() + 2.0
        while True:
            for i, (name, trace) in enumerate(self.reported_errors):
                if name == process.name:
                    return self.reported_errors.pop(i)[1]
            try:
                self.reported_errors.append(self.error_queue.get(timeout=max(0.0, deadline - time.time())))
            except queue.Empty:
                return f"exit code {process.exitcode} (no traceback: killed by a signal?)"

    def supervise(self, global_step: int) -> None:
        """Restart an actor that died: its env streams are cut where they stopped (``attach``),
        then a new process takes them over; one death more than --max-actor-restarts, or a dead
        evaluator, raises StopRun. Checks every 0.2 s at most."""
        if time.monotonic() - self.checked_at < 0.2:
            return
        self.checked_at = time.monotonic()
        for actor_id, p in enumerate(self.actors):
            if p.exitcode is None:
                continue
            trace = self.traceback_of(p)
            if self.restarts >= self.args.max_actor_restarts:
                raise StopRun(f"{p.name} died ({self.restarts} of --max-actor-restarts "
                              f"{self.args.max_actor_restarts} restarts used):\n{trace}")
            self.restarts += 1
            print(f"r2d2_mp.py: {p.name} died at step {global_step:,}; restart {self.restarts} of "
                  f"{self.args.max_actor_restarts}:\n{trace}", file=sys.stderr, flush=True)
            self.writer.add_text("actor_restarts", f"step {global_step}: {p.name} died\n\n    "
                                 + trace.replace("\n", "\n    "), global_step)
            take_weights_lock(self.weights_lock, f"{p.name} died holding it")  # then free for the others
            self.weights_lock.release()
            E = self.args.num_envs_per_actor
            self.cut_streams(actor_id * E + np.arange(E))
            self.arrays["actor_paused"][actor_id] = 0
            self.arrays["weights_wanted"][actor_id] = 0
            self.episode_queues[actor_id].cancel_join_thread()  # the dead actor may have left it locked
            self.episode_queues[actor_id] = self.ctx.Queue()
            self.actors[actor_id] = self.start_actor(actor_id, global_step + self.restarts)
        if self.evaluator is not None and self.evaluator.exitcode is not None:
            raise StopRun(f"the evaluator died:\n{self.traceback_of(self.evaluator)}")
        if self.inference is not None and self.inference.exitcode is not None:
            raise StopRun(f"the inference process died:\n{self.traceback_of(self.inference)}")

    def episodes(self):
        """(return, length) of every episode the actors have finished since the last call."""
        for episode_queue in self.episode_queues:
            while True:
                try:
                    yield episode_queue.get_nowait()
                except queue.Empty:
                    break

    def stop(self) -> None:
        """Stop every child: the actors at their next step, the evaluator at once (an evaluation
        still running is of no use now); what has not exited after 2 s (a child still starting) is
        killed: the shared memory is the learner's to unlink, so nothing is left behind."""
        self.stop_event.set()
        children = self.actors + [p for p in (self.evaluator, self.inference) if p is not None]
        self.eval_requests.put(None)
        if self.evaluator is not None:
            self.evaluator.join(timeout=0.2)
            if self.evaluator.is_alive():  # in an evaluation nobody will read (it only reads the shared memory)
                self.evaluator.kill()
        deadline = time.time() + 2
        for p in children:
            p.join(timeout=max(0.0, deadline - time.time()))
        for p in children:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for q in (*self.episode_queues, self.error_queue, self.eval_requests, self.eval_results):
            q.cancel_join_thread()
            q.close()


# LEARNER: prefetch thread
PINNED_FIELDS = ("obs", "action", "reward", "first", "terminated", "truncated", "prev_action", "prev_reward",
                 "initial_state", "weights", "frame_first", "later_states")  # what batch_to_torch copies to the device


class Prefetcher(threading.Thread):
    """Owns the replay's sampling index: syncs it with the actors' write counts, samples the
    next batches ahead of the learner (queue of ``depth``), applies priority updates. With ``pin``
    (a GPU learner) it hands over the batch's arrays as page-locked tensors, so that the learner's
    copies to the GPU are asynchronous (``batch_to_torch``'s non_blocking) and this thread, not
    the learner, pays for the copy out of the replay."""

    def __init__(self, replay: SequenceReplayBuffer, batch_size: int, rng: np.random.Generator, depth: int = 2,
                 pin: bool = False):
        super().__init__(name="prefetch", daemon=True)
        self.replay, self.batch_size, self.rng, self.pin = replay, batch_size, rng, pin
        self.batches: queue.Queue = queue.Queue(maxsize=depth)
        self.priority_updates: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held while the index is used; the learner takes it to checkpoint
        self.error: BaseException | None = None
        self.wait_seconds, self.dropped_windows = 0.0, 0  # the learner's, since the last log

    def apply_priority_updates(self) -> None:
        while True:
            try:
                self.replay.update_priorities(*self.priority_updates.get_nowait())
            except queue.Empty:
                return

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    self.apply_priority_updates()
                    self.replay.sync()
                    batch = self.replay.sample(self.batch_size, self.rng) if self.replay.num_valid_sequences else None
                if batch is None:
                    time.sleep(0.01)
                    continue
                if self.pin:
                    batch = dataclasses.replace(batch, **{name: torch.from_numpy(getattr(batch, name)).pin_memory()
                                                          for name in PINNED_FIELDS if getattr(batch, name) is not None})
                while not self.stop.is_set():
                    try:
                        self.batches.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        with self.lock:
                            self.apply_priority_updates()
        except BaseException as e:  # handed to the learner, which stops the run
            self.error = e

    def cut_streams(self, streams: np.ndarray) -> None:
        """Cut these env streams where they stopped (a dead actor's): no n-step return or window
        runs across the cut (SequenceReplayBuffer.cut_streams, while no batch is sampled)."""
        with self.lock:
            self.replay.cut_streams(streams)

    def next_batch(self, stop: StopRequest) -> SequenceBatch:
        """The next prefetched batch; stop requests and prefetch errors are raised while waiting.
        Counts the time waited and the windows overwritten while they were copied (weight 0)."""
        t0 = time.time()
        while True:
            if self.error is not None:
                raise self.error
            try:
                batch = self.batches.get(timeout=0.1)
                break
            except queue.Empty:
                stop.check()
        self.wait_seconds += time.time() - t0
        self.dropped_windows += int((batch.sequence_ids < 0).sum())
        return batch


# LEARNER PROCESS (the main process)
def learner(args: Args, sources: dict, run_name: str, checkpoint: dict | None, replay: SequenceReplayBuffer,
            arrays: SharedArrays, processes: Processes, observation_space, n_actions: int, frame_stack: int,
            stop: StopRequest) -> int:
    """Train on the replay the actors fill; returns the exit code (0, 1, or 128 + signal)."""
    checkpoint_file = os.path.join("saved_checkpoints", run_name, CHECKPOINT_FILE)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)  # replay sampling (the prefetch thread's)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    set_float32_precision(args.tf32)  # on CUDA: TF32 or IEEE float32 (--tf32)
    q_network, target_network, optimizer = make_learner(args, observation_space, n_actions, device)
    epsilons = epsilon_ladder(args.num_actors * args.num_envs_per_actor, args.epsilon_base, args.epsilon_alpha)
    actor_steps = arrays["actor_steps"][: args.num_actors]

    progress = initial_progress(args)
    recent_returns: deque[float] = deque(maxlen=20)
    if checkpoint is not None:
        try:
            load_learner_state(checkpoint, q_network, target_network, optimizer, rng, progress, recent_returns, replay,
                               args.learning_starts)
            actor_steps[:] = checkpoint["actor_steps"].numpy()
            replay.cut_streams()  # the actors' envs (ale-py's cannot be saved) start new episodes
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"r2d2_mp.py: error: checkpoint {args.resume!r} does not fit this run: {first_line[:160]}") \
                from None
        print(f"resuming {run_name} from step {progress['global_step']:,} ({progress['updates']:,} updates)")
        del checkpoint  # the replay copy can be large
    prefetcher = Prefetcher(replay, args.batch_size, rng, pin=device.type == "cuda")
    weights = Publisher(q_network, arrays, processes.weights_lock, args.num_actors)

    def write_checkpoint(final: bool = False) -> None:  # final: of a stopped run, where a failure only prints
        try:
            with paused(arrays, processes, prefetcher, final):
                progress.update(global_step=int(actor_steps.sum()), elapsed=time.time() - start_time)
                atomic_save({
                    "format": CHECKPOINT_FORMAT, "run_name": run_name, "args": vars(args),
                    **learner_state(q_network, target_network, optimizer, rng, progress, recent_returns, replay,
                                    args.checkpoint_replay),
                    "actor_steps": torch.from_numpy(actor_steps.copy()),
                }, checkpoint_file)
        except (StopRun, OSError, RuntimeError) as error:
            if not final:
                raise
            return print(f"r2d2_mp.py: no final checkpoint: {error}", file=sys.stderr, flush=True)
        tqdm.write(f"step {progress['global_step']:,}: checkpoint written to {checkpoint_file}")
        sys.stdout.flush()
        if final:
            print(f"resume with --resume {os.path.dirname(checkpoint_file)}", file=sys.stderr, flush=True)

    writer = open_writer(run_name, args, sources, progress["global_step"], epsilons)
    processes.attach(prefetcher.cut_streams, writer)
    prefetcher.start()
    weights.publish(progress["updates"], force=True)  # the actors start acting

    start_time = time.time() - progress["elapsed"]
    last = {"time": time.time(), "step": progress["global_step"], "updates": progress["updates"],
            "added": replay.num_sequences_added, "actor_steps": actor_steps.copy(), "actor_time": time.time()}
    global_step, updates, stats = progress["global_step"], progress["updates"], {}
    evaluation = Evaluations(processes, weights, writer, start_time)
    bar = tqdm(total=args.total_timesteps, initial=global_step, unit="step", dynamic_ncols=True,
               disable=not args.progress_bar or not sys.stderr.isatty())
    first_line_due = None  # a first line a second after the first steps, then one per --log-interval
    try:
        while global_step < args.total_timesteps:
            stop.check()
            processes.supervise(global_step)
            for episodic_return, episodic_length in processes.episodes():
                recent_returns.append(episodic_return)
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)
            global_step = progress["global_step"] = int(actor_steps.sum())
            bar.update(global_step - bar.n)
            if first_line_due is None and global_step > last["step"]:
                first_line_due = time.time() + 1

            # ALGO LOGIC: train while the replay ratio allows (trained observations per observation added)
            learn_from = progress["learn_from"]
            trained = (updates - progress["updates_base"]) * args.batch_size * args.sequence_length
            # the rate limit: the actors wait once the run has taken the steps at which what the learner has
            # trained is --min-replay-ratio of them (Reverb's SampleToInsertRatio); raised after each update,
            # so a learner that makes none (a stall, a long wait) stops them within a step
            arrays["allowed_steps"][0] = (learn_from + trained / args.min_replay_ratio if args.min_replay_ratio > 0
                                          and replay.num_valid_sequences > 0 else np.inf)
            if global_step >= learn_from and replay.num_valid_sequences > 0 and \
                    trained <= args.replay_ratio * (global_step - learn_from):
                batch = prefetcher.next_batch(stop)
                priorities, stats = update(q_network, target_network, optimizer, batch_to_torch(batch, device, frame_stack),
                                           args, updates + 1, stop)
                prefetcher.priority_updates.put((batch.indices, batch.sequence_ids, priorities))
                updates = progress["updates"] = updates + 1
            else:
                time.sleep(0.005)
            weights.publish(updates)  # if an actor asked for newer weights
            evaluation.collect(updates)

            if global_step >= progress["next_log"] or (first_line_due and time.time() > first_line_due
                                                       and global_step > last["step"]):
                first_line_due = 0
                sps, updates_per_second = log_scalars(writer, global_step, updates, replay, stats,
                                                      float(epsilons.mean()), last, args)
                log_actor_scalars(writer, global_step, updates, arrays, processes.restarts, prefetcher, last)
                mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "– (no episode ended yet)"
                tqdm.write(f"step {global_step:,}: SPS {sps:.0f}, updates {updates:,} ({updates_per_second:.1f}/s), "
                           f"return {mean_return}, replay {replay.size:,}, {last['status']}")
                sys.stdout.flush()
                bar.set_postfix(SPS=f"{sps:.0f}", ret=mean_return.split()[0], upd=updates)
                while progress["next_log"] <= global_step:
                    progress["next_log"] += args.log_interval

            evaluation.request_if_due(global_step, updates, progress, args)

            if args.checkpoint_interval > 0 and global_step >= progress["next_checkpoint"]:
                while progress["next_checkpoint"] <= global_step:
                    progress["next_checkpoint"] += args.checkpoint_interval
                write_checkpoint()

        evaluation.wait(updates, stop)
        if last["step"] != global_step:  # the final count, always
            writer.add_scalar("charts/learner_updates", updates, global_step)
        if args.save_model:  # the final evaluation is that of the saved model, as evaluate.py does it
            save_and_evaluate_model(run_name, q_network, args, observation_space, n_actions, writer, global_step,
                                    time.time() - start_time, device)
        elif args.eval_episodes > 0 and progress["evaluated_at"] != updates:  # final weights not evaluated yet
            evaluation.request(global_step, updates, progress)
            evaluation.wait(updates, stop)
        return 0
    except StopRun as e:
        print(f"r2d2_mp.py: stopping at step {global_step:,}: {e}", file=sys.stderr, flush=True)
        if e.checkpoint and args.checkpoint_interval > 0:
            write_checkpoint(final=True)
        return e.exit_code
    finally:
        bar.close()
        prefetcher.stop.set()
        prefetcher.join(timeout=5)
        writer.close()


def log_actor_scalars(writer: SummaryWriter, global_step: int, updates: int, arrays: SharedArrays, restarts: int,
                      prefetcher: Prefetcher, last: dict) -> None:
    """The multi-process scalars of a log interval: parameter lag, per-actor SPS, restarts, the
    learner's waits for batches and the windows dropped from them; ``last`` as log_scalars', whose
    "status" gets the lag and the wait for the status line."""
    lag = updates - arrays["actor_weights_version"][: len(last["actor_steps"])]
    writer.add_scalar("charts/parameter_lag", float(lag.mean()), global_step)
    dt = time.time() - last["actor_time"]
    steps = arrays["actor_steps"][: len(last["actor_steps"])].copy()
    for actor_id, (now, before) in enumerate(zip(steps, last["actor_steps"])):
        writer.add_scalar(f"actors/SPS_actor_{actor_id}", (now - before) / dt, global_step)
    writer.add_scalar("charts/actor_restarts", restarts, global_step)
    writer.add_scalar("charts/sample_wait_seconds", prefetcher.wait_seconds, global_step)
    writer.add_scalar("replay/dropped_windows", prefetcher.dropped_windows, global_step)
    last["status"] = f"lag {lag.mean():.0f}, sample wait {prefetcher.wait_seconds:.1f}s"
    last.update(actor_steps=steps, actor_time=time.time())
    prefetcher.wait_seconds, prefetcher.dropped_windows = 0.0, 0


class Publisher:
    """The learner's side of the weights in shared memory: publishes its parameters (with their
    update count as version) when an actor has asked for newer ones, or when forced (the first
    weights, an evaluation): no more often than the actors use them, and so no GPU
    synchronisation after every update."""

    def __init__(self, q_network: RNNQNetwork, arrays: SharedArrays, lock, num_actors: int):
        self.q_network, self.lock = q_network, lock
        self.weights, self.version = arrays["weights"], arrays["weights_version"]
        self.wanted = arrays["weights_wanted"][: num_actors + 1]  # the actors', the inference process's
        self.published = -1

    def publish(self, updates: int, force: bool = False) -> None:
        if updates != self.published and (force or self.wanted.any()):
            publish(self.q_network, self.weights, self.version, self.lock, updates)
            self.published = updates


class Evaluations:
    """The learner's side of the evaluator process: one evaluation at a time, of the weights
    published for it, logged at the step it was asked for when its result comes back."""

    def __init__(self, processes: Processes, weights: Publisher, writer: SummaryWriter, start_time: float):
        self.processes, self.weights, self.writer, self.start_time = processes, weights, writer, start_time
        self.running: dict = {}  # global_step, updates and wall-clock of the evaluation asked for

    def request(self, global_step: int, updates: int, progress: dict) -> None:
        self.weights.publish(updates, force=True)
        self.processes.eval_requests.put(global_step)
        self.running = {"global_step": global_step, "updates": updates, "wall_clock": time.time() - self.start_time}
        progress["evaluated_at"] = updates

    def request_if_due(self, global_step: int, updates: int, progress: dict, args: Args) -> None:
        """Every --eval-interval steps; one at a time (a due one waits for the last to end). With
        --save-model the final evaluation is that of the saved model, after the loop."""
        final_step = args.save_model and global_step >= args.total_timesteps
        if args.eval_episodes > 0 and progress["next_eval"] is not None and global_step >= progress["next_eval"] \
                and not final_step and not self.running:
            self.request(global_step, updates, progress)
            while progress["next_eval"] <= global_step:
                progress["next_eval"] += args.eval_interval

    def collect(self, updates: int, timeout: float = 0.0) -> None:
        if not self.running:
            return
        try:
            global_step, weights_version, returns = self.processes.eval_results.get(timeout=timeout) if timeout \
                else self.processes.eval_results.get_nowait()
        except queue.Empty:
            return
        log_evaluation(self.writer, returns, global_step, self.running["wall_clock"])
        tqdm.write(f"step {global_step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f} (weights of update "
                   f"{weights_version:,}, {self.running['wall_clock']:.0f}s; the learner did "
                   f"{updates - self.running['updates']:,} updates while it ran)")
        sys.stdout.flush()
        self.running = {}

    def wait(self, updates: int, stop: StopRequest) -> None:
        while self.running:
            stop.check()
            self.processes.supervise(self.running["global_step"])
            self.collect(updates, timeout=0.1)


@contextlib.contextmanager
def paused(arrays: SharedArrays, processes: Processes, prefetcher: Prefetcher, final: bool):
    """Within the block every actor waits between two steps and the prefetch thread is idle, its
    priority updates applied (for a checkpoint). A dead actor is restarted while waiting (it
    pauses too), except in the ``final`` checkpoint of a stopped run, where it raises StopRun."""
    arrays["pause"][0] = 1
    try:
        deadline = time.time() + 120
        while not arrays["actor_paused"][: len(processes.actors)].all():
            if final and any(p.exitcode is not None for p in processes.actors) or time.time() > deadline:
                raise StopRun("an actor died or did not pause for the checkpoint")
            if not final:
                processes.supervise(int(arrays["actor_steps"].sum()))
            time.sleep(0.005)
        with prefetcher.lock:
            prefetcher.apply_priority_updates()
            yield
    finally:
        arrays["pause"][0] = 0


def main(args: Args, argv: list[str] | None = None) -> int:
    """Build the shared memory, start the actors and the evaluator, run the learner, and stop and
    clean up everything however it ends; returns the exit code."""
    try:  # everything that can refuse the arguments runs before anything is created
        # defaults, then the preset, the command line and the checkpoint; prints what the preset set
        args, checkpoint, sources = resolve_args(args, argv, os.path.basename(__file__))
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id, env_kwargs=args.env_kwargs)
        frame_stack = frame_stack_of(args.env_id)  # Atari: replay keeps single frames
        envs_per_actor_given = args.num_envs_per_actor > 0
        args = dataclasses.replace(args, num_envs_per_actor=resolve_envs_per_actor(args, frame_stack))
        if frame_stack > 1 and args.num_envs_per_actor % args.env_splits:
            raise ValueError(f"--env-splits ({args.env_splits}) must divide --num-envs-per-actor "
                             f"({args.num_envs_per_actor})")
        learner_device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if args.inference == "auto":
            args = dataclasses.replace(args, inference="central" if learner_device.type == "cuda" else "local")
        network = make_network(args, observation_space, n_actions)
        replay_kwargs = replay_arguments(args, observation_space, network.state_size, frame_stack)
        replay_bytes = SequenceReplayBuffer.shared_nbytes(**replay_kwargs)
        # the replay and the published weights live in /dev/shm, which is also memory (of the cgroup)
        limits, shared_bytes = read_limits(), replay_bytes + 4 * parameter_count(network)
        children = args.num_actors + 1 + (args.inference == "central")
        window = window_length(args.burn_in_length, args.sequence_length, args.n_step)
        others = {"2 learner batches": 2 * batch_bytes(args.batch_size, window, observation_space.shape,
                                                       observation_space.dtype),
                  "networks and Adam": network_bytes(args.hidden_size, args.torso_size, args.head_hidden_size,
                                                     args.rnn_type),
                  f"{children} processes (actors, evaluator{', inference' if args.inference == 'central' else ''}) "
                  f"× {PROCESS_BYTES // 2**20} MiB": children * PROCESS_BYTES}
        room = min(np.inf if limits.shm_bytes is None else limits.shm_bytes, limits.memory_bytes - sum(others.values()))
        fit = f"about {max(0, int(0.9 * args.buffer_size * room / shared_bytes)):,} fit"
        check_memory({"replay in /dev/shm": shared_bytes, **others}, limits,
                     f"lower --buffer-size ({fit}), --batch-size or --num-actors")
        check_shared_memory(shared_bytes, f"the replay ({args.buffer_size:,} observations) with the weights",
                            f"or lower --buffer-size ({fit})", limits)
        # the CPUs the actors leave, at most torch's own count (cores, or OMP_NUM_THREADS)
        torch_threads = args.learner_threads or min(torch.get_num_threads(), max(1, limits.cpus - args.num_actors))
    except ValueError as e:
        raise SystemExit(f"r2d2_mp.py: error: {e}") from None
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"

    start_resource_tracker()  # first: it must outlive a hangup of the group, and clean up after a SIGKILL quietly
    arrays = SharedArrays()
    stop = StopRequest()  # from here on, Ctrl-C, SIGTERM and SIGHUP stop the run cleanly
    processes = Processes(args, arrays, replay_kwargs, observation_space, n_actions)
    try:
        replay = create_shared_memory(arrays, replay_kwargs, parameters_to_vector(network.parameters()).numel(),
                                      args.num_actors)
        if args.inference == "central":
            splits = args.env_splits if frame_stack > 1 else 1
            create_inference_memory(arrays, args.num_actors, args.num_envs_per_actor // splits, observation_space,
                                    network.state_size)
        print("progress lines: SPS = environment steps per second; updates = learner updates (per second); return = "
              "mean of the last 20 episodes; replay = observations stored; lag = learner updates the actors' weights "
              "are behind; sample wait = seconds the learner waited for batches since the last line", flush=True)
        print(f"run {run_name}: {parameter_count(network):,} parameters, {args.num_actors} actor{'s' if args.num_actors != 1 else ''} × "
              f"{args.num_envs_per_actor} envs{'' if envs_per_actor_given else ' (default)'}, replay "
              f"{args.buffer_size:,} observations = {size(shared_bytes)} in shared memory with the weights, "
              f"{replay.capacity_per_stream:,} per env stream; inference {args.inference} on "
              f"{learner_device.type if args.inference == 'central' else 'the actors (CPU)'}; learner on {learner_device.type} "
              f"({precision_summary(learner_device, args.amp, args.tf32)}); {limits.cpus_phrase()}: "
              f"{'actors = CPUs - 1, ' if args.num_actors == max(1, limits.cpus - 1) else ''}learner {torch_threads} "
              f"torch thread{'s' if torch_threads != 1 else ''}"
              f"{', %d ale-py threads per actor' % (args.env_threads or default_env_threads(args.num_actors)) if frame_stack > 1 else ''}",
              flush=True)
        processes.start(checkpoint["progress"]["global_step"] if checkpoint is not None else 0, learner_device,
                        stop.check)
        # the learner's CPU threads take the cores the actors leave: a CPU learner computes there; a GPU
        # learner needs few (copies, Python), and idle OpenMP threads spinning on all cores would slow the actors
        torch.set_num_threads(torch_threads)
        stop.check()  # a stop that came while they started
        return learner(args, sources, run_name, checkpoint, replay, arrays, processes, observation_space, n_actions,
                       frame_stack, stop)
    except StopRun as e:  # before the learner started
        print(f"r2d2_mp.py: stopping: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        processes.stop()
        arrays.close()
        arrays.unlink()
        stop.restore()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        exit_code = main(tyro.cli(Args), sys.argv[1:])
    except KeyboardInterrupt:  # before any process or shared memory exists
        print("r2d2_mp.py: interrupted", file=sys.stderr)
        exit_code = 130
    finish_tracking(exit_code)  # --track: the W&B run ends after the writer was closed
    skip_final_collection()  # everything is closed: leave the last garbage collection out
    sys.exit(exit_code)
