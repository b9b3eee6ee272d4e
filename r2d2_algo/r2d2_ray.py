"""R2D2 beyond one machine (Kapturowski et al., ICLR 2019): the roles of r2d2_mp.py as Ray actors.

    python r2d2_algo/r2d2_ray.py --env-id PongNoFrameskip-v4                 # an embedded local Ray
    python r2d2_algo/r2d2_ray.py --env-id PongNoFrameskip-v4 --ray-address HOST:PORT   # a cluster

The algorithm is r2d2.py's, in the same lines (diff the two files: what differs is the roles
below and the plumbing they call, in the ray_*.py modules). Each role is a Ray actor but the learner:

    Actor × N        envs + a CPU copy of the network (EnvActor), ε-greedy; pushes its steps to its
                     replay shard, fetches newer params from the param store
    ReplayShard × S  a SequenceReplayBuffer for the streams of its actors (ray_replay.py)
    ParamStore       the newest published params, and the allowances (ray_param_store.py)
    Evaluator        plays an evaluation on published params when asked
    Learner          the driver (GPU when the cluster has one): samples, trains, publishes params

The supervisor (ray_supervisor.py) starts them, restarts a dead actor and finds a role Ray rebuilt
after its node was lost; the learner gives that one its state back. Without --ray-address the
script starts a local Ray on loopback and stops it however the run ends (ray_start.py).
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the heavy imports below load: nothing to clean, leave quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import dataclasses
import json
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Literal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # this clone's r2d2_algo, installed or not

import numpy as np
import ray
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
    save_model,
    to_storable,
)
from r2d2_algo.checks import check_common_args
from r2d2_algo.devices import precision_summary, set_float32_precision
from r2d2_algo.envs import check_env_id, epsilon_ladder, frame_stack_of, make_vector_env
from r2d2_algo.evaluate import EVAL_EPSILON, EVAL_SEED_OFFSET, evaluate, evaluate_saved_model
from r2d2_algo.limits import usable_cpus
from r2d2_algo.model import RNNQNetwork, parameter_count
from r2d2_algo.processes import skip_final_collection
from r2d2_algo.ray_param_store import ParamFetcher, ParamPublisher, load_params
from r2d2_algo.ray_replay import ShardedReplay, ShardWriter, shard_arguments, shard_of
from r2d2_algo.ray_start import check_ray_args, check_resources, incarnation, ray_session, restarted
from r2d2_algo.ray_supervisor import Supervisor, role_nodes
from r2d2_algo.stopping import StopRequest, StopRun
from r2d2_algo.storage import SequenceBatch, SequenceReplayBuffer, stack_frames
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
    """checkpoints include the replay shards and their priorities (else a resumed run refills them)"""
    resume: str | None = None
    """checkpoint file or `saved_checkpoints/{run_name}` folder to continue (its arguments are used)"""
    preset: Literal["auto", "atari", "atari_fast", "vector", "small_image", "none"] = "auto"
    """defaults for the env's family (r2d2_algo/presets/; auto: by --env-id, none: this script's own)"""
    ray_address: str | None = None
    """an existing Ray cluster to join (HOST:PORT or `auto`); none: start a local Ray on loopback for this run"""
    ray_plasma_directory: str | None = None
    """folder of the embedded Ray's object store (none: /dev/shm); a folder on disk (slower) where /dev/shm is
    too small, as Docker's 64 MiB without --shm-size"""
    role_nodes: str | None = None
    """where roles go on the cluster, as ROLE=NODE_IP pairs separated by commas (ROLE: param-store, evaluator,
    replay-shard-K, actor-K; e.g. replay-shard-0=10.0.0.5); soft: a role whose node is lost is rebuilt
    elsewhere. Roles not named go where Ray puts them"""

    # Environment and acting
    env_id: str = "PongNoFrameskip-v4"
    """gymnasium id with Discrete actions and any observation space R2D2 can encode (README, "Which environments"); `module:EnvId` imports module first"""
    env_kwargs: tuple[str, ...] = ()
    """keyword arguments for the constructor of every env of the run (gym.make): key:value items read as YAML (memory_length:30), or one mapping ('{memory_length: 30}'); Atari ids take repeat_action_probability, full_action_space, frameskip"""
    total_timesteps: int = 10_000_000
    """total environment steps (summed over all envs)"""
    num_actors: int = dataclasses.field(default_factory=lambda: max(1, usable_cpus()[0] - 1))
    """actors (a Ray actor each, one CPU; default: the usable CPUs left after the learner: affinity mask,
    cgroup CPU quota)"""
    num_replay_shards: int = 1
    """replay shards (a Ray actor each); actor i writes to shard i mod S"""
    actor_push_interval: int = 50
    """actor steps between an actor's pushes of its steps to its replay shard"""
    samples_in_flight: int = 2
    """sample requests the learner keeps out (over all shards)"""
    num_envs_per_actor: int = 0
    """environments per actor, acted on with one batched forward pass per env split. 0: 64 (= 2 × 32:
    the forward pass is bound by reading the params, so larger batches cost little more per call), or
    fewer when there are so many actors that each env's replay stream would keep under 8 windows"""
    env_splits: int = 2
    """Atari: each actor's envs step in this many batches, one stepping in ale-py's C++ threads while
    the network acts on another (double buffering); other envs always use 1"""
    env_threads: int = 0
    """Atari: C++ threads per actor stepping its envs (ale-py AtariVectorEnv); 0: the usable CPUs shared among the actors"""
    learner_threads: int = 0
    """the learner's torch CPU threads; 0: the usable CPUs the actors leave (at least 1, at most torch's own
    count). More helps a CPU learner whose actors wait for it (--min-replay-ratio)"""
    actor_update_interval: int = 400
    """actor steps (batched forward passes, one per env split) between an actor's fetches of newer params
    (paper: 400 steps of an actor's single env); an actor that waited (--min-replay-ratio) also fetches"""
    max_actor_restarts: int = 3
    """each actor that dies is restarted this many times (Ray's max_restarts; its env streams
    are cut there); one more death stops the run"""
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
    """mixed precision: the learner's torso and head in bfloat16 autocast, its recurrent core in float32 (targets, loss and priorities in float32; acting and evaluation in float32)"""
    tf32: bool = False
    """on CUDA, float32 matrix products, convolutions and LSTMs in TF32 (faster on Ampere and later, ~1e-3 relative error); off: IEEE float32, as on the CPU"""
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
    check_ray_args(args)  # --ray-address, --ray-plasma-directory
    for name in ["total_timesteps", "num_actors", "num_replay_shards", "actor_push_interval", "samples_in_flight",
                 "env_splits", "actor_update_interval", "hidden_size", "torso_size",
                 "head_hidden_size", "buffer_size", "sequence_length", "batch_size", "n_step",
                 "target_network_update_period", "log_interval"]:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ["burn_in_length", "learning_starts", "eval_interval", "eval_episodes", "num_envs_per_actor",
                 "env_threads", "learner_threads", "max_actor_restarts", "checkpoint_interval"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.gamma <= 1.0:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    role_nodes(args)
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
    if args.num_replay_shards > args.num_actors:
        raise ValueError(f"--num-replay-shards ({args.num_replay_shards}) must be <= --num-actors "
                         f"({args.num_actors})")


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



def main(args: Args, argv: list[str] | None = None) -> int:
    """Check the arguments, start or join Ray, start the roles (below) under their supervisor, run
    the learner, and stop everything however the run ends; returns the exit code."""
    try:  # everything that can refuse the arguments runs before Ray starts
        # defaults, then the preset, the command line and the checkpoint; prints what the preset set
        args, checkpoint, sources = resolve_args(args, argv, os.path.basename(__file__))
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id, env_kwargs=args.env_kwargs)
        frame_stack = frame_stack_of(args.env_id)  # Atari: replay keeps single frames
        if args.num_envs_per_actor == 0:
            args = dataclasses.replace(args, num_envs_per_actor=64 if frame_stack > 1 else 8)
        if frame_stack > 1 and args.num_envs_per_actor % args.env_splits:
            raise ValueError(f"--env-splits ({args.env_splits}) must divide --num-envs-per-actor "
                             f"({args.num_envs_per_actor})")
        network = make_network(args, observation_space, n_actions)
        replay_kwargs = shard_arguments(args, observation_space, network.state_size, frame_stack)
        in_flight, store_size, limits = check_resources(args, observation_space, network, frame_stack, replay_kwargs)
    except ValueError as e:
        raise SystemExit(f"r2d2_ray.py: error: {e}") from None
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    stop = None
    try:
        with ray_session(args, store_size, limits.cpus):  # Ray stopped, its folder removed, however this ends
            stop = StopRequest()  # after ray.init, whose own SIGTERM handler aborts the process
            # the CPUs the local actors leave, at most torch's own count (cores, or OMP_NUM_THREADS)
            torch_threads = args.learner_threads or min(torch.get_num_threads(), limits.cpus if args.ray_address
                                                        else max(1, limits.cpus - args.num_actors))
            device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
            print(f"run {run_name}: {parameter_count(network):,} parameters, {args.num_actors} actors × "
                  f"{args.num_envs_per_actor} envs, {args.num_replay_shards} replay shard(s) of "
                  f"{args.buffer_size // args.num_replay_shards:,} observations, Ray "
                  f"{'at ' + args.ray_address if args.ray_address else 'local (127.0.0.2)'}; the run keeps at most "
                  f"{in_flight / 2**20:,.1f} MiB in Ray's object store"
                  f"{'' if args.ray_address else ' (of %.0f MiB in %s)' % (store_size / 2**20, args.ray_plasma_directory or '/dev/shm')}"
                  f"; learner on {device.type} ({precision_summary(device, args.amp, args.tf32)}); "
                  f"{limits.cpus_phrase()}: "
                  f"{'actors = CPUs - 1, ' if args.num_actors == max(1, limits.cpus - 1) else ''}learner "
                  f"{torch_threads} torch thread{'s' if torch_threads != 1 else ''}", flush=True)
            torch.set_num_threads(torch_threads)  # torch counts cores, not a cgroup CPU quota
            seed_offset = checkpoint["progress"]["global_step"] if checkpoint is not None else 0  # new env seeds
            evaluator = Evaluator if args.eval_episodes > 0 else None
            with Supervisor(args, run_name, replay_kwargs, Actor, (args, observation_space, n_actions, seed_offset),
                            evaluator, (args, observation_space, n_actions)) as supervisor:  # stopped however this ends
                supervisor.describe()
                stop.check()
                return Learner(args, sources, run_name, checkpoint, supervisor, observation_space, n_actions,
                               frame_stack, stop).run()
    except StopRun as e:
        print(f"r2d2_ray.py: stopping: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if stop is not None:
            stop.restore()


# RAY ROLES: the actors, the evaluator and the learner (the replay shards and the param store:
# ray_replay.py, ray_param_store.py; the supervisor that starts and watches them all: ray_supervisor.py)
class Actor:
    """The paper's actor as a Ray actor (one CPU): steps --num-envs-per-actor envs with ε-greedy
    actions of a CPU copy of the network (EnvActor), env j of actor i on rung i·E + j of the ε
    ladder. An actor Ray restarted after a failure first cuts its streams in its replay shard (a
    time-limit mark), then starts new episodes. The shard and the param store are found by name:
    a restarted actor finds them again (Ray keeps no handles for it)."""

    def __init__(self, actor_id: int, shard_name: str, store_name: str, args: Args, observation_space, n_actions: int,
                 seed_offset: int):
        torch.set_num_threads(1)
        shard, store = ray.get_actor(shard_name), ray.get_actor(store_name)
        self.args, self.restarted = args, restarted()
        E = args.num_envs_per_actor
        self.shard_id, streams = shard_of(actor_id, args)
        seed = args.seed + 1000 * (actor_id + 1) + seed_offset + (int(time.time()) % 100_000 if self.restarted else 0)
        if self.restarted:
            ray.get(shard.cut_streams.remote(streams))
        frame_stack = frame_stack_of(args.env_id)
        splits = args.env_splits if frame_stack > 1 else 1
        envs = make_vector_env(args.env_id, E, seed, num_splits=splits, num_threads=args.env_threads or 1,
                               thread_niceness=10 if splits > 1 else 0, env_kwargs=args.env_kwargs)
        epsilons = epsilon_ladder(args.num_actors * E, args.epsilon_base, args.epsilon_alpha)[actor_id * E + np.arange(E)]
        self.replay = ShardWriter(shard, actor_id, frame_stack)
        self.params = ParamFetcher(store, make_network(args, observation_space, n_actions))
        self.params.first()  # the learner's first params
        self.env_actor = EnvActor(envs, self.params.net, self.replay, epsilons, np.random.default_rng(seed), seed,
                                  streams=streams)

    def node(self) -> tuple[str, bool]:
        return ray.util.get_node_ip_address(), self.restarted

    def run(self) -> None:
        """Act until the run ends (Ray kills the Ray actor then). Every --actor-push-interval actor
        steps the steps go to the shard; once the shard holds the steps the learner allows
        (--min-replay-ratio) the actor waits for the learner, then acts on its newest params. Every
        --actor-update-interval actor steps it fetches newer params (the learner publishes after
        its next update) and loads them as soon as they come, acting on meanwhile."""
        args, steps_since_fetch = self.args, 0
        while True:
            for _, episodic_return, episodic_length in self.env_actor.step():
                self.replay.episodes.append((episodic_return, episodic_length))
            steps_since_fetch += 1
            if len(self.replay.steps) >= args.actor_push_interval:
                wants_more, held = self.replay.answers()  # to the pushes out (at most 2)
                if not wants_more:  # the shard holds its share of the run's steps
                    break
                if held is not None:  # the learner is below --min-replay-ratio
                    self.params.wait_for_allowance(self.shard_id, held)
                    steps_since_fetch = 0
                self.replay.push(self.params.version)
            if steps_since_fetch >= args.actor_update_interval and self.params.fetch():
                steps_since_fetch = 0
        while True:  # the run's steps are taken: wait to be stopped
            time.sleep(0.05)


class Evaluator:
    """The evaluator as a Ray actor (CPU): plays an evaluation on published params when asked."""

    def __init__(self, args: Args, observation_space, n_actions: int):
        torch.set_num_threads(1)
        self.args, self.net = args, make_network(args, observation_space, n_actions)
        self.where = incarnation()

    @ray.method(concurrency_group="where")
    def node(self) -> tuple[str, str]:
        return self.where

    def evaluate(self, params: list, step: int) -> tuple[int, np.ndarray]:
        load_params(self.net, params)
        returns, _ = evaluate(self.net, self.args.env_id, self.args.eval_episodes, self.args.seed + EVAL_SEED_OFFSET,
                              "cpu", self.args.eval_epsilon, env_kwargs=self.args.env_kwargs)
        return step, np.asarray(returns, dtype=np.float64)


class Learner:
    """The learner, on the driver (GPU when the cluster has one): ``run`` is its loop; the methods
    after it are the steps that talk to the other roles."""

    def __init__(self, args: Args, sources: dict, run_name: str, checkpoint: dict | None, supervisor: Supervisor,
                 observation_space, n_actions: int, frame_stack: int, stop: StopRequest):
        self.args, self.run_name, self.supervisor, self.stop = args, run_name, supervisor, stop
        self.observation_space, self.n_actions, self.frame_stack = observation_space, n_actions, frame_stack
        self.checkpoint_file = os.path.join("saved_checkpoints", run_name, CHECKPOINT_FILE)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        self.device = device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        set_float32_precision(args.tf32)  # on CUDA: TF32 or IEEE float32 (--tf32)
        self.q_network, self.target_network, self.optimizer = make_learner(args, observation_space, n_actions, device)
        self.epsilons = epsilon_ladder(args.num_actors * args.num_envs_per_actor, args.epsilon_base, args.epsilon_alpha)
        self.progress = progress = initial_progress(args)
        self.recent_returns: list[float] = []
        try:  # the replay is in the shards: each loads its own part
            if checkpoint is not None:
                load_learner_state(checkpoint, self.q_network, self.target_network, self.optimizer, None, progress,
                                   self.recent_returns, None, args.learning_starts)
            self.replay = ShardedReplay(supervisor, args, checkpoint and from_storable(checkpoint["replay_shards"]))
        except (KeyError, RuntimeError, ValueError, TypeError, ray.exceptions.RayTaskError) as e:
            e = getattr(e, "cause", None) or e  # a shard's own error, inside Ray's
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"r2d2_ray.py: error: checkpoint {args.resume!r} does not fit this run: {first_line[:160]}") \
                from None
        if checkpoint is not None:
            if checkpoint["replay_shards"][0]["replay"] is None:  # empty shards: learning starts again later
                progress.update(learn_from=progress["global_step"] + args.learning_starts, updates_base=progress["updates"])
            print(f"resuming {run_name} from step {progress['global_step']:,} ({progress['updates']:,} updates)")
        self.params = ParamPublisher(supervisor.store, supervisor.shards, self.allowances())
        self.behind = False  # below --min-replay-ratio: the actors wait
        self.writer = open_writer(run_name, args, sources, progress["global_step"], self.epsilons)
        self.start_time = time.time() - progress["elapsed"]

    def run(self) -> int:
        """Train until --total-timesteps; returns the exit code."""
        args, progress, replay, params, writer, stop = self.args, self.progress, self.replay, self.params, self.writer, self.stop
        q_network, target_network, optimizer, epsilons = self.q_network, self.target_network, self.optimizer, self.epsilons
        device, frame_stack = self.device, self.frame_stack
        params.publish(progress["updates"], q_network)
        self.supervisor.start_actors()
        last = {"time": time.time(), "step": progress["global_step"], "updates": progress["updates"],
                "added": replay.num_sequences_added}
        global_step, updates, stats = progress["global_step"], progress["updates"], {}
        evaluation = None
        bar = tqdm(total=args.total_timesteps, initial=global_step, disable=not args.progress_bar or not sys.stderr.isatty(),
                   unit="step", dynamic_ncols=True)
        try:
            while global_step < args.total_timesteps:
                stop.check()
                episodes, rebuilt = replay.poll()  # the shards' counts, 20 times a second
                for role, old_node, new_node in rebuilt + self.supervisor.check(global_step, writer):
                    self.restore(role, old_node, new_node)
                for episodic_return, episodic_length in episodes:
                    self.recent_returns = (self.recent_returns + [episodic_return])[-20:]
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", episodic_length, global_step)
                global_step = progress["global_step"] = replay.steps
                bar.update(min(global_step, args.total_timesteps) - bar.n)  # the actors' last pushes overshoot

                # ALGO LOGIC: train while the replay ratio allows (trained observations per observation added)
                learn_from = progress["learn_from"]
                trained = (updates - progress["updates_base"]) * args.batch_size * args.sequence_length
                self.pace_actors(behind=global_step >= learn_from and replay.num_valid_sequences > 0 and
                                 trained < args.min_replay_ratio * (global_step - learn_from))
                if global_step >= learn_from and replay.num_valid_sequences > 0 and \
                        trained <= args.replay_ratio * (global_step - learn_from):
                    batch = replay.sample(args.batch_size, args.samples_in_flight)  # None: not within 1 s
                    if batch is not None:
                        priorities, stats = update(q_network, target_network, optimizer, batch_to_torch(batch, device, frame_stack),
                                                   args, updates + 1, stop)
                        replay.update_priorities(batch.indices, batch.sequence_ids, priorities)
                        updates = progress["updates"] = updates + 1
                        if params.asked():  # an actor asked for newer params
                            params.publish(updates, q_network)
                else:
                    time.sleep(0.005)

                if global_step >= progress["next_log"]:
                    sps, updates_per_second = log_scalars(writer, global_step, updates, replay, stats,
                                                          float(epsilons.mean()), last, args)
                    mean_return = self.log_progress(sps, updates_per_second)  # parameter lag, restarts, a progress line
                    bar.set_postfix(SPS=f"{sps:.0f}", ret=mean_return.split()[0], upd=updates)
                    while progress["next_log"] <= global_step:
                        progress["next_log"] += args.log_interval

                if evaluation is not None and ray.wait([evaluation], timeout=0)[0]:
                    self.evaluated(*ray.get(evaluation))
                    evaluation = None
                if self.supervisor.evaluator is not None and evaluation is None and progress["next_eval"] is not None \
                        and global_step >= progress["next_eval"]:
                    while progress["next_eval"] <= global_step:
                        progress["next_eval"] += args.eval_interval
                    evaluation = self.supervisor.evaluator.evaluate.remote(params.publish(updates, q_network), global_step)
                    progress["evaluated_at"] = updates

                if args.checkpoint_interval > 0 and global_step >= progress["next_checkpoint"]:
                    while progress["next_checkpoint"] <= global_step:
                        progress["next_checkpoint"] += args.checkpoint_interval
                    self.write_checkpoint()

            return self.finish(evaluation, global_step)
        except StopRun as e:
            print(f"r2d2_ray.py: stopping at step {global_step:,}: {e}", file=sys.stderr, flush=True)
            if e.checkpoint and args.checkpoint_interval > 0:
                self.write_checkpoint(final=True)
            return e.exit_code
        except ray.exceptions.RayError as e:  # a lost shard, param store or evaluator
            print(f"r2d2_ray.py: stopping at step {global_step:,}: a Ray actor was lost: "
                  f"{str(e).strip().splitlines()[0][:200]}", file=sys.stderr, flush=True)
            return 1
        finally:
            bar.close()
            writer.close()

    def finish(self, evaluation, global_step: int) -> int:
        """After the last step: the losses of the run's last seconds, the evaluation out, and the
        final one (of the saved model with --save-model). Returns 0."""
        args, progress, writer, updates = self.args, self.progress, self.writer, self.progress["updates"]
        for role, old_node, new_node in self.supervisor.settle(self.stop):  # a loss in the last seconds is reported too
            self.restore(role, old_node, new_node)
        if evaluation is not None:
            self.evaluated(*self.result_of(evaluation, "the last evaluation"))
        writer.add_scalar("charts/learner_updates", updates, global_step)
        if args.save_model:  # the final evaluation is that of the saved model, as evaluate.py does it
            save_and_evaluate_model(self.run_name, self.q_network, args, self.observation_space, self.n_actions, writer,
                                    global_step, time.time() - self.start_time, self.device)
        elif self.supervisor.evaluator is not None and progress["evaluated_at"] != updates:  # final params not evaluated yet
            final = self.supervisor.evaluator.evaluate.remote(self.params.publish(updates, self.q_network), global_step)
            self.evaluated(*self.result_of(final, "the final evaluation"))
        return 0

    def log_progress(self, sps: float, updates_per_second: float) -> str:
        """The parameter lag and the actor restarts at a log interval, and a progress line; returns
        the recent mean return, as written there."""
        global_step, updates, replay = self.progress["global_step"], self.progress["updates"], self.replay
        if replay.versions:
            self.writer.add_scalar("charts/parameter_lag", updates - float(np.mean(replay.versions)), global_step)
        self.writer.add_scalar("charts/actor_restarts", self.supervisor.restarts, global_step)
        mean_return = f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "– (no episode ended yet)"
        tqdm.write(f"step {global_step:,}: SPS {sps:.0f}, updates {updates:,} ({updates_per_second:.1f}/s), "
                   f"return {mean_return}, replay {replay.size:,}")
        sys.stdout.flush()
        return mean_return

    def evaluated(self, step: int, returns: np.ndarray) -> None:
        """Log an evaluation the evaluator played at ``step``."""
        log_evaluation(self.writer, returns, step, time.time() - self.start_time)
        tqdm.write(f"step {step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f}")
        sys.stdout.flush()

    def allowances(self) -> list[float]:
        """The steps each shard may hold before its actors wait (--min-replay-ratio: the run may
        reach the step at which the observations trained so far are that ratio of those added).
        No limit without --min-replay-ratio or before the replay holds a whole sequence."""
        args, progress = self.args, self.progress
        if args.min_replay_ratio == 0 or self.replay.num_valid_sequences == 0:
            return self.replay.allowances(float("inf"))
        trained = (progress["updates"] - progress["updates_base"]) * args.batch_size * args.sequence_length
        return self.replay.allowances(progress["learn_from"] + trained / args.min_replay_ratio)

    def pace_actors(self, behind: bool) -> None:
        """New allowances to the shards and the param store, if they changed; the newest params with
        them once the learner, ``behind`` --min-replay-ratio until now, has caught up (the waiting
        actors resume on them)."""
        previous, allowed = self.params.allowed, self.allowances()
        if self.behind and not behind:
            self.params.publish(self.progress["updates"], self.q_network, allowed)
        elif allowed != previous:
            self.params.allow(allowed)
        self.behind = behind

    def restore(self, role: str, old_node: str, new_node: str) -> None:
        """A role Ray rebuilt after its node was lost: the param store gets the learner's params (and
        the allowances) again; a shard its replay from the last checkpoint, or starts empty."""
        args, global_step, updates = self.args, self.progress["global_step"], self.progress["updates"]
        self.supervisor.count_loss(f"{role} was lost with node {old_node}", global_step, self.writer)
        what = ""
        if role == "the param store":
            self.params.publish(updates, self.q_network)
            what = f"from the learner's params (update {updates:,})"
        elif role.startswith("replay shard"):
            what = self.replay.refill(int(role.rsplit(" ", 1)[1]), self.checkpoint_file if args.checkpoint_interval > 0
                                      and args.checkpoint_replay else None)
            self.params.allow(self.allowances())  # in its new count; it allows nothing until told
        print(f"r2d2_ray.py: step {global_step:,}: {role} was lost with node {old_node}; rebuilt on node {new_node}"
              f"{' ' + what if what else ''} ({self.supervisor.restarts} of --max-actor-restarts "
              f"{args.max_actor_restarts} restarts used)", file=sys.stderr, flush=True)

    def result_of(self, ref, what: str):
        """``ray.get(ref)``, but never blind: stops, actor deaths and rebuilt roles are seen while it
        waits, and a wait of more than 10 s is named on stderr. The actors wait meanwhile once
        their shards hold the steps the learner allows."""
        since, named = time.time(), False
        while not ray.wait([ref], timeout=1.0)[0]:
            self.stop.check()
            for role, old_node, new_node in self.supervisor.check(self.progress["global_step"], self.writer):
                self.restore(role, old_node, new_node)
            if not named and time.time() - since > 10:
                print(f"r2d2_ray.py: step {self.progress['global_step']:,}: the learner has waited 10 s for {what}",
                      file=sys.stderr, flush=True)
                named = True
        return ray.get(ref)

    def write_checkpoint(self, final: bool = False) -> None:
        """The learner's state and every shard's (the actors go on acting meanwhile, up to the steps
        the learner allows). ``final``: of a stopped run, where a failure only prints."""
        progress = self.progress
        try:
            shards, rebuilt = self.replay.states(self.args.checkpoint_replay)
            for role, old_node, new_node in rebuilt:  # a shard Ray rebuilt answered, empty: refill it first
                self.restore(role, old_node, new_node)
            if rebuilt:
                return self.write_checkpoint(final)
            progress.update(global_step=sum(shard["steps"] for shard in shards), elapsed=time.time() - self.start_time)
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # saved, never written
            atomic_save({"format": CHECKPOINT_FORMAT, "run_name": self.run_name, "args": vars(self.args),
                         **learner_state(self.q_network, self.target_network, self.optimizer, None, progress,
                                         self.recent_returns, None, include_replay=False),
                         "replay_shards": to_storable(shards)}, self.checkpoint_file)
        except (OSError, RuntimeError, ray.exceptions.RayError) as error:
            if not final:
                raise
            return print(f"r2d2_ray.py: no final checkpoint: {error}", file=sys.stderr, flush=True)
        tqdm.write(f"step {progress['global_step']:,}: checkpoint written to {self.checkpoint_file}")
        sys.stdout.flush()
        if final:
            print(f"resume with --resume {os.path.dirname(self.checkpoint_file)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        exit_code = main(tyro.cli(Args), sys.argv[1:])
    except KeyboardInterrupt:
        print("r2d2_ray.py: interrupted", file=sys.stderr)
        exit_code = 130
    finish_tracking(exit_code)  # --track: the W&B run ends after the writer was closed
    skip_final_collection()  # everything is closed: leave the last garbage collection out
    sys.exit(exit_code)
