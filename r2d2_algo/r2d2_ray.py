"""R2D2 beyond one machine (Kapturowski et al., ICLR 2019): the roles of r2d2_mp.py as Ray actors.

    python r2d2_algo/r2d2_ray.py --env-id PongNoFrameskip-v4                 # an embedded local Ray
    python r2d2_algo/r2d2_ray.py --env-id PongNoFrameskip-v4 --ray-address HOST:PORT   # a cluster

The algorithm is r2d2_mp.py's, in the same lines (diff the two files: what differs is the
plumbing). The roles, each a Ray actor except the learner:

    EnvWorker × N   envs + CPU copy of the network, ε-greedy (r2d2_mp's EnvActor); steps go to a
                    local block, pushed to its replay shard every --actor-push-interval actor
                    steps (at most 2 pushes in flight); every --actor-update-interval actor
                    steps it asks the WeightStore for newer weights, which the learner
                    publishes (one ray.put) after its next update, as in r2d2_mp.py
    ReplayShard × S a SequenceReplayBuffer (sum tree and all) for the streams of its workers;
                    adds blocks, samples, updates priorities, cuts the streams of a restarted worker
    WeightStore     the newest published weights (version, object reference) and the rate limit
    Evaluator       plays evaluation episodes on published weights when asked
    learner         the driver (GPU when the cluster has one): samples with at most
                    --samples-in-flight requests out, trains, sends priorities back, publishes

Env workers restart on failure (--max-actor-restarts, Ray's max_restarts); the learner pings a
dead worker until Ray has restarted it, then starts its loop again; a restarted worker cuts its
streams (a time-limit mark) before it writes again. Ray rebuilds a shard, the store or the
evaluator lost with its node (and replays the calls made to it meanwhile); the learner finds the
new one (Cluster.watch) and gives it its state back: the store the learner's weights, a shard the
last checkpoint's replay. Every loss counts against --max-actor-restarts; --checkpoint-interval
and --resume (the learner and every shard's replay in one file) continue a stopped run, as in
r2d2_mp.py. --role-nodes places roles on chosen nodes. Without --ray-address the script
starts a local Ray on loopback and shuts it down at the end, however the run ends
(processes.py's reaper does it if this process is SIGKILLed).
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the heavy imports below load: nothing to clean, leave quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import asyncio
import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from typing import Literal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # this clone's r2d2_algo, installed or not

import numpy as np
import ray
import torch
import tyro
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch.nn.utils import parameters_to_vector
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from r2d2_algo import processes
from r2d2_algo.processes import skip_final_collection
from r2d2_algo.arguments import resolve_args
from r2d2_algo.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    atomic_save,
    from_storable,
    learner_state,
    load_checkpoint,
    load_learner_state,
    save_model,
    to_storable,
)
from r2d2_algo.checks import check_common_args, network_bytes
from r2d2_algo.devices import precision_summary, set_float32_precision
from r2d2_algo.envs import check_env_id, epsilon_ladder, frame_stack_of, make_vector_env
from r2d2_algo.evaluate import EVAL_EPSILON, EVAL_SEED_OFFSET, evaluate, evaluate_saved_model
from r2d2_algo.limits import PROCESS_BYTES, batch_bytes, check_memory, check_shared_memory, read_limits, size, usable_cpus
from r2d2_algo.model import RNNQNetwork, load_parameter_vector, parameter_count
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
    """where roles go on the cluster, as ROLE=NODE_IP pairs separated by commas (ROLE: weight-store, evaluator,
    replay-shard-K, env-worker-K; e.g. replay-shard-0=10.0.0.5); soft: a role whose node is lost is rebuilt
    elsewhere. Roles not named go where Ray puts them"""

    # Environment and acting
    env_id: str = "PongNoFrameskip-v4"
    """gymnasium id with Discrete actions and any observation space R2D2 can encode (README, "Which environments"); `module:EnvId` imports module first"""
    env_kwargs: tuple[str, ...] = ()
    """keyword arguments for the constructor of every env of the run (gym.make): key:value items read as YAML (memory_length:30), or one mapping ('{memory_length: 30}'); Atari ids take repeat_action_probability, full_action_space, frameskip"""
    total_timesteps: int = 10_000_000
    """total environment steps (summed over all envs)"""
    num_actors: int = dataclasses.field(default_factory=lambda: max(1, usable_cpus()[0] - 1))
    """env workers (Ray actors, one CPU each; default: the usable CPUs left after the learner: affinity mask,
    cgroup CPU quota)"""
    num_replay_shards: int = 1
    """replay shards (Ray actors); env worker i writes to shard i mod S"""
    actor_push_interval: int = 50
    """actor steps between an env worker's pushes of its steps to its replay shard"""
    samples_in_flight: int = 2
    """sample requests the learner keeps out (over all shards)"""
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
    """the learner's torch CPU threads; 0: the usable CPUs the env workers leave (at least 1, at most torch's own
    count). More helps a CPU learner whose env workers wait for it (--min-replay-ratio)"""
    actor_update_interval: int = 400
    """actor steps (batched forward passes, one per env split) between an actor's weight refreshes
    (paper: 400 steps of an actor's single env); an actor that waited (--min-replay-ratio) also refreshes"""
    max_actor_restarts: int = 3
    """each env worker that dies is restarted this many times (Ray's max_restarts; its env streams
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


def role_nodes(args: Args) -> dict[str, str]:
    """--role-nodes as {role: node IP}; ValueError (one line) for a malformed pair or an unknown role."""
    roles = {"weight-store", "evaluator", *(f"replay-shard-{i}" for i in range(args.num_replay_shards)),
             *(f"env-worker-{i}" for i in range(args.num_actors))}
    placed = {}
    for pair in filter(None, (args.role_nodes or "").split(",")):
        role, _, node = pair.strip().partition("=")
        if role not in roles or not node:
            raise ValueError(f"--role-nodes: {pair.strip()!r} is not ROLE=NODE_IP with ROLE one of weight-store, "
                             f"evaluator, replay-shard-0..{args.num_replay_shards - 1}, "
                             f"env-worker-0..{args.num_actors - 1}")
        placed[role] = node
    return placed


def check_args(args: Args) -> None:
    """Refuse inconsistent arguments with a one-line ValueError, before anything is written."""
    check_common_args(args)  # seeds, ε ladder, optimizer, exponents, overlap, network memory, names
    if args.ray_address and args.ray_plasma_directory:
        raise ValueError("--ray-plasma-directory is for the embedded Ray; a cluster's nodes set theirs "
                         "(ray start --plasma-directory)")
    if args.ray_address and args.ray_address != "auto":
        host, _, port = args.ray_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--ray-address: expected HOST:PORT or auto, got {args.ray_address!r}")
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




# RAY PLUMBING
def replay_arguments(args: Args, observation_space, state_size: int, frame_stack: int, num_streams: int) -> dict:
    """Constructor arguments of one replay shard holding ``num_streams`` env streams (its share of
    --buffer-size). A shard is its streams' only writer, so it needs no overwrite margin."""
    return dict(
        num_streams=num_streams, capacity=args.buffer_size // args.num_replay_shards,
        obs_shape=observation_space.shape, obs_dtype=observation_space.dtype, state_size=state_size,
        burn_in_length=args.burn_in_length, sequence_length=args.sequence_length, n_step=args.n_step,
        overlap=args.overlap, priority_exponent=args.priority_exponent,
        importance_sampling_exponent=args.importance_sampling_exponent, frame_stack=frame_stack)


def object_store_bytes(args: Args, observation_space, state_size: int, frame_stack: int, num_parameters: int) -> int:
    """Most bytes the run keeps in Ray's object store at once: 2 pushes in flight per env worker
    (--actor-push-interval actor steps of its envs), --samples-in-flight batches, the replay
    shards' step counts, and 2 published weight versions (float32)."""
    frame_bytes = int(np.prod(observation_space.shape)) // frame_stack * np.dtype(observation_space.dtype).itemsize
    step_bytes = frame_bytes + 4 * state_size + 16  # observation, stored state, action, reward, flags
    pushes = 2 * args.num_actors * args.actor_push_interval * args.num_envs_per_actor * step_bytes
    window = window_length(args.burn_in_length, args.sequence_length, args.n_step) + frame_stack - 1
    samples = args.samples_in_flight * args.batch_size * (window * (frame_bytes + 16) + 4 * state_size + 16)
    return pushes + samples + 2 * 4 * num_parameters


def shard_of(worker_id: int, args: Args) -> tuple[int, np.ndarray]:
    """Env worker ``worker_id``'s replay shard and its streams there (E,) int64."""
    E = args.num_envs_per_actor
    return worker_id % args.num_replay_shards, (worker_id // args.num_replay_shards) * E + np.arange(E)


def workers_of_shard(shard: int, args: Args) -> int:
    return len(range(shard, args.num_actors, args.num_replay_shards))


def incarnation() -> tuple[str, str]:
    """(node IP, incarnation) of the calling Ray actor; the incarnation is new each time Ray
    (re)creates the actor, so the learner tells a role rebuilt after a lost node from the old one."""
    return ray.util.get_node_ip_address(), f"{os.getpid()}-{time.time_ns()}"


class ReplayShard:
    """A Ray actor holding one SequenceReplayBuffer: env workers push blocks of steps, the learner
    samples batches and sends priorities back. Its memory is allocated, and stated, at start.
    Ray restarts a shard lost with its node, empty; the learner then loads it from the last
    checkpoint, if any (``load``). ``quota``: its share of --total-timesteps; once it holds that
    many steps, its env workers stop acting (``add_block`` says so), so that the run ends at its
    total even while the learner is slow to see it. It is also the rate limiter of
    --min-replay-ratio, as a Reverb table's: the learner raises its allowance (``allow``) after each
    update, and ``add_block`` tells a worker past it to wait (on the weight store), so a learner
    that makes no update stops the workers within a push, whatever it is doing."""

    def __init__(self, replay_kwargs: dict, seed: int, quota: int):
        self.replay = SequenceReplayBuffer(**replay_kwargs)
        self.quota = quota
        self.allowed = 0.0  # the steps it may hold (--min-replay-ratio): none until the learner says
        self.rng = np.random.default_rng(seed)
        self.steps, self.episodes, self.versions = 0, [], {}
        self.nbytes = SequenceReplayBuffer.shared_nbytes(**replay_kwargs)
        self.cut = np.zeros(self.replay.num_streams, dtype=bool)  # the next step of the stream starts an episode
        with warnings.catch_warnings():  # Ray warns about its own use of a deprecated API inside
            warnings.simplefilter("ignore", DeprecationWarning)
            if ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed:
                self.cut[:] = True  # rebuilt after a lost node: its workers' episodes are cut here
        self.where = incarnation()

    @ray.method(concurrency_group="where")
    def node(self) -> tuple[str, str, int]:
        return (*self.where, self.nbytes)

    def add_block(self, block: list[tuple], episodes: list[tuple[float, int]], worker_id: int, version: int) -> bool:
        """Append a worker's steps; ``version``: the weights it acts with (for the parameter lag). The
        first step of a stream cut by ``load`` is written as an episode start (its old episode ended
        there, at the checkpoint, with a time-limit mark). Returns whether the shard wants more
        steps (it holds fewer than its quota), whether the learner allows more (``allow``), and the
        steps it holds (its count: see ``load``)."""
        self.versions[worker_id] = version
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
        """The steps it may hold before its env workers wait for the learner (float("inf"): no limit)."""
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
        """Inverse of ``state``; the streams are cut (the env workers start new episodes).

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


class WeightStore:
    """A Ray actor (asyncio) holding the newest published weights (version, [object reference]) and
    the steps each replay shard may hold before its env workers wait for the learner
    (--min-replay-ratio; the shards hold the same allowances and tell a worker past its own to
    wait: it waits here, ``allowance``). The learner raises them after each update; a learner that
    makes no update (a stall, a long wait on a checkpoint or an evaluation) raises none, so the
    workers stop within a push, whatever the learner is doing.

    As in r2d2_mp.py, the learner publishes when an env worker asks: ``newer`` with nothing newer
    marks the weights wanted and waits for the next publication; the learner holds one ``wanted``
    call, answered when a worker asks, and publishes after its next update. The learner also
    publishes when it catches up with the replay ratio, so that waiting workers resume on the newest
    weights."""

    def __init__(self, num_shards: int):
        self.version, self.ref = -1, None
        # steps each shard may hold; none until the learner publishes (Ray rebuilds a store lost with its
        # node empty: its workers wait until the learner has republished)
        self.allowed = [0.0] * num_shards
        self.changed, self.asked = asyncio.Event(), asyncio.Event()
        self.where = incarnation()

    @ray.method(concurrency_group="where")
    async def node(self) -> tuple[str, str]:
        return self.where

    def _changed(self) -> None:
        self.changed.set()  # wakes every waiting call; later ones wait on a new event
        self.changed = asyncio.Event()

    async def _wait_until(self, done, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not done() and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return

    async def publish(self, version: int, ref: list, allowed: list[float]) -> None:
        self.version, self.ref, self.allowed = version, ref, allowed
        self._changed()

    async def allow(self, allowed: list[float]) -> None:
        """The steps each shard may hold now (float("inf"): no limit)."""
        self.allowed = allowed
        self._changed()

    async def newer(self, version: int, wait_s: float) -> tuple[int, list | None]:
        """(version, [ref] if newer than ``version`` else None), once weights newer than ``version``
        are published (they are asked for) or ``wait_s`` seconds pass."""
        if self.version <= version:
            self.asked.set()
        await self._wait_until(lambda: self.version > version, wait_s)
        return self.version, (self.ref if self.version > version else None)

    async def allowance(self, shard: int, steps: int, version: int, wait_s: float) -> tuple[int, list | None, float]:
        """(version, [ref] if newer than ``version`` else None, the steps shard ``shard`` may hold),
        once it may hold more than ``steps`` or ``wait_s`` seconds pass. Newer weights are asked
        for, so that a worker resumes on the weights the learner has caught up with."""
        if self.version <= version:
            self.asked.set()
        await self._wait_until(lambda: self.allowed[shard] > steps, wait_s)
        return self.version, (self.ref if self.version > version else None), self.allowed[shard]

    async def wanted(self) -> bool:
        """Returns once an env worker has asked for weights newer than the published ones."""
        await self.asked.wait()
        self.asked.clear()
        return True


class StepBlock:
    """The env worker's replay: collects the steps EnvActor adds, for one push to the shard.
    Atari observations keep their newest frame only (the shard stores single frames)."""

    def __init__(self, frame_stack: int):
        self.frame_stack, self.steps, self.episodes = frame_stack, [], []

    def add(self, obs, action, reward, first, terminated, truncated, state, streams) -> None:
        if self.frame_stack > 1:
            obs = obs[:, -1:]  # SequenceReplayBuffer.add keeps obs[:, -1]
        # EnvActor passes arrays it does not keep (fancy-indexed copies, the env's fresh outputs)
        self.steps.append((obs, action, reward, first, terminated, truncated, state, streams))

    def take(self) -> tuple[list, list]:
        steps, episodes, self.steps, self.episodes = self.steps, self.episodes, [], []
        return steps, episodes


class EnvWorker:
    """A Ray actor stepping ``num_envs_per_actor`` envs with ε-greedy actions of a CPU copy of the
    network (EnvActor), pushing its steps to its replay shard in blocks (at most 2 in flight).
    Env j of worker i is ε rung i·E + j. A worker Ray restarted after a failure first cuts its
    streams in the shard (a time-limit mark), then starts new episodes."""

    def __init__(self, worker_id: int, args: Args, shard_name: str, store_name: str, observation_space, n_actions: int,
                 seed_offset: int):
        torch.set_num_threads(1)
        # by name, not by handle: a restarted worker finds them again (Ray keeps no handles for it)
        self.shard, self.store = ray.get_actor(shard_name), ray.get_actor(store_name)
        self.args, self.worker_id = args, worker_id
        E = args.num_envs_per_actor
        _, self.streams = shard_of(worker_id, args)
        with warnings.catch_warnings():  # Ray warns about its own use of a deprecated API inside
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        seed = args.seed + 1000 * (worker_id + 1) + seed_offset + (int(time.time()) % 100_000 if self.restarted else 0)
        if self.restarted:
            ray.get(self.shard.cut_streams.remote(self.streams))
        frame_stack = frame_stack_of(args.env_id)
        splits = args.env_splits if frame_stack > 1 else 1
        envs = make_vector_env(args.env_id, E, seed, num_splits=splits,
                               num_threads=args.env_threads or 1, thread_niceness=10 if splits > 1 else 0,
                               env_kwargs=args.env_kwargs)
        epsilons = epsilon_ladder(args.num_actors * E, args.epsilon_base, args.epsilon_alpha)[worker_id * E + np.arange(E)]
        self.net = make_network(args, observation_space, n_actions)
        self.block = StepBlock(frame_stack)
        self.version, self.quota_reached = -1, False
        while self.version < 0:  # the learner's first weights
            self.refresh(*ray.get(self.store.newer.remote(self.version, 1.0)))
        self.env_actor = EnvActor(envs, self.net, self.block, epsilons, np.random.default_rng(seed), seed,
                                  streams=self.streams)

    def node(self) -> tuple[str, bool]:
        return ray.util.get_node_ip_address(), self.restarted

    def refresh(self, version: int, ref: list | None) -> None:
        """Load the weights of a ``WeightStore`` reply, if newer."""
        if ref is not None:
            load_parameter_vector(self.net, ray.get(ref[0]))
            self.version = version

    def run(self) -> None:
        """Act until the run ends (Ray kills the actor then). Every --actor-update-interval actor
        steps the worker asks the store for newer weights (the learner publishes after its next
        update) and loads them as soon as the answer comes, acting on in the meantime. Once its
        shard holds the steps the learner allows (--min-replay-ratio) it waits for the learner,
        then acts on the newest weights."""
        pushes, steps_since_refresh, asking = [], 0, None
        shard = shard_of(self.worker_id, self.args)[0]
        while True:
            if self.quota_reached:  # the run's steps are taken: wait to be stopped
                time.sleep(0.05)
                continue
            for _, episodic_return, episodic_length in self.env_actor.step():
                self.block.episodes.append((episodic_return, episodic_length))
            steps_since_refresh += 1
            if len(self.block.steps) >= self.args.actor_push_interval:
                if len(pushes) >= 2:  # a bound on the pushes in flight
                    ray.wait(pushes, num_returns=1)
                if pushes:
                    answered, pushes = ray.wait(pushes, num_returns=len(pushes), timeout=0)
                    replies = ray.get(answered)
                    if not all(wants_more for wants_more, _, _ in replies):  # the shard holds its share of the run's steps
                        self.quota_reached = True
                        continue
                    if not all(allowed for _, allowed, _ in replies):  # the learner is below --min-replay-ratio
                        held, allowed = max(steps for _, _, steps in replies), 0.0
                        while allowed <= held:  # wait until it allows more, then act on its newest weights
                            version, ref, allowed = ray.get(self.store.allowance.remote(shard, held, self.version, 1.0))
                            self.refresh(version, ref)
                        asking, steps_since_refresh = None, 0
                pushes.append(self.shard.add_block.remote(*self.block.take(), self.worker_id, self.version))
            if asking is None and steps_since_refresh >= self.args.actor_update_interval:
                asking = self.store.newer.remote(self.version, 10.0).future()
            if asking is not None and asking.done():
                version_before = self.version
                self.refresh(*asking.result())
                asking = None
                if self.version > version_before:
                    steps_since_refresh = 0  # else (nothing within 10 s) it asks again


class Evaluator:
    """A Ray actor playing evaluation episodes on published weights (CPU)."""

    def __init__(self, args: Args, observation_space, n_actions: int):
        torch.set_num_threads(1)
        self.args, self.net = args, make_network(args, observation_space, n_actions)
        self.where = incarnation()

    @ray.method(concurrency_group="where")
    def node(self) -> tuple[str, str]:
        return self.where

    def evaluate(self, weights: list, step: int) -> tuple[int, np.ndarray]:
        load_parameter_vector(self.net, ray.get(weights[0]))
        returns, _ = evaluate(self.net, self.args.env_id, self.args.eval_episodes, self.args.seed + EVAL_SEED_OFFSET,
                              "cpu", self.args.eval_epsilon, env_kwargs=self.args.env_kwargs)
        return step, np.asarray(returns, dtype=np.float64)


# Ray rebuilds these roles wherever it can when they are lost (with their node) and replays the
# calls they had not answered; `node` answers beside a long call (an evaluation, a checkpoint's copy).
# They need no CPU, but ask for 1 MiB of memory: Ray places a request for no resource at all on a
# random node, whatever its scheduling strategy (--role-nodes would be ignored); with one it packs
# them on the driver's node unless told otherwise.
REBUILT = dict(num_cpus=0, memory=2**20, max_restarts=-1, max_task_retries=-1, concurrency_groups={"where": 1})
SILENT_AFTER_S = 5.0  # a role that has not answered where it is for this long is named as unreachable
SETTLE_S = 60.0  # at the end of a run, the longest wait for the roles to say where they are


class Cluster:
    """The Ray actors of a run: starts them (each one's node is printed), re-runs a restarted env
    worker, finds the roles Ray rebuilt after a lost node (``watch``), and reports a lost one.
    ``restarts`` counts the losses (env workers and the roles Ray rebuilt) against
    --max-actor-restarts."""

    def __init__(self, args: Args, run_name: str, observation_space, n_actions: int, state_size: int,
                 frame_stack: int, seed_offset: int):
        self.args = args
        E = args.num_envs_per_actor
        nodes = {node["NodeManagerAddress"]: node["NodeID"] for node in ray.nodes() if node["Alive"]}
        placed = role_nodes(args)
        for role, ip in placed.items():
            if ip not in nodes:
                raise SystemExit(f"r2d2_ray.py: error: --role-nodes: no live node {ip} in the cluster for {role} "
                                 f"(its nodes: {', '.join(sorted(nodes))})")

        def where(role: str) -> dict:  # soft: a role whose node is lost may be rebuilt elsewhere
            if role not in placed:
                return {}
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[placed[role]], soft=True)}

        store_name, shard_names = f"{run_name}/weights", [f"{run_name}/shard-{i}" for i in range(args.num_replay_shards)]
        self.store = ray.remote(**REBUILT)(WeightStore).options(name=store_name, **where("weight-store")).remote(
            args.num_replay_shards)
        # each shard's share of --total-timesteps, in the run's count (see ReplayShard)
        self.quotas = [-(-args.total_timesteps * workers_of_shard(i, args) // args.num_actors)
                       for i in range(args.num_replay_shards)]
        self.shards = [ray.remote(**REBUILT)(ReplayShard).options(name=shard_names[i], **where(f"replay-shard-{i}")).remote(
            replay_arguments(args, observation_space, state_size, frame_stack, workers_of_shard(i, args) * E),
            args.seed + i, self.quotas[i]) for i in range(args.num_replay_shards)]
        worker_class = ray.remote(num_cpus=1, max_restarts=args.max_actor_restarts)(EnvWorker)
        self.workers = [worker_class.options(**where(f"env-worker-{i}")).remote(
            i, args, shard_names[shard_of(i, args)[0]], store_name, observation_space, n_actions, seed_offset)
            for i in range(args.num_actors)]
        self.evaluator = ray.remote(**REBUILT)(Evaluator).options(**where("evaluator")).remote(
            args, observation_space, n_actions) if args.eval_episodes > 0 else None
        self.runs, self.pings = {}, {}  # object ref -> worker index: acting loops, pings of restarting workers
        self.restarts, self.supervised = 0, 0.0
        # the roles Ray rebuilds: where each is (node, incarnation), and the question out to it
        self.rebuilt = {"the weight store": self.store, **{f"replay shard {i}": s for i, s in enumerate(self.shards)},
                        **({"the evaluator": self.evaluator} if self.evaluator is not None else {})}
        self.where: dict[str, tuple[str, str]] = {}
        self.asking: dict[str, tuple] = {}  # role -> (ref, asked at, named as unreachable)
        self.watched = 0.0

    def describe(self) -> None:
        """Print the node of every role but the env workers (``start_workers`` prints theirs)."""
        for role, actor in self.rebuilt.items():
            answer = ray.get(actor.node.remote(), timeout=600)
            self.where[role] = answer[:2]
            memory = f": {size(answer[2])}" if role.startswith("replay shard") else ""
            print(f"{role.removeprefix('the ')} on node {answer[0]}{memory}", flush=True)

    def watch(self) -> list[tuple[str, str, str]]:
        """Every second, ask each role Ray rebuilds where it is. Returns (role, old node, new node)
        for each one that Ray has rebuilt since (its node was lost); names on stderr, once, a role
        that has not answered for SILENT_AFTER_S seconds (its node is probably gone: Ray rebuilds
        the role once it has declared the node dead). Raises StopRun if Ray gave a role up."""
        rebuilt = []
        for role, (ref, asked, named) in list(self.asking.items()):
            if ray.wait([ref], timeout=0)[0]:
                del self.asking[role]
                try:
                    node, instance = ray.get(ref)[:2]
                except ray.exceptions.RayError as e:
                    raise StopRun(f"{role} is lost for good: {str(e).strip().splitlines()[0][:200]}",
                                  checkpoint=True) from None
                if instance != self.where[role][1]:
                    rebuilt.append((role, self.where[role][0], node))
                    self.where[role] = (node, instance)
                elif named:
                    print(f"r2d2_ray.py: {role} (node {node}) answers again", file=sys.stderr, flush=True)
            elif not named and time.time() - asked > SILENT_AFTER_S:
                print(f"r2d2_ray.py: {role} (node {self.where[role][0]}) has not answered for {SILENT_AFTER_S:.0f} s: "
                      f"its node may be lost; Ray rebuilds it elsewhere once it declares the node dead",
                      file=sys.stderr, flush=True)
                self.asking[role] = (ref, asked, True)
        if time.time() - self.watched >= 1.0:
            self.watched = time.time()
            for role, actor in self.rebuilt.items():
                if role not in self.asking:
                    self.asking[role] = (actor.node.remote(), time.time(), False)
        return rebuilt

    def settle(self, stop: StopRequest) -> list[tuple[str, str, str]]:
        """The last ``watch`` of a run: waits (up to SETTLE_S seconds, stops seen) until every role Ray
        rebuilds has answered where it is, so that a role lost in the run's last seconds (its node is
        declared dead seconds after it goes) is reported and counted, not missed at the exit."""
        for role, actor in self.rebuilt.items():
            if role not in self.asking:
                self.asking[role] = (actor.node.remote(), time.time(), False)
        refs, deadline = [ref for ref, _, _ in self.asking.values()], time.time() + SETTLE_S
        while ray.wait(refs, num_returns=len(refs), timeout=1.0)[1]:
            stop.check()
            if time.time() > deadline:
                late = [role for role, (ref, _, _) in self.asking.items() if not ray.wait([ref], timeout=0)[0]]
                print(f"r2d2_ray.py: {', '.join(late)} had not answered where {'it is' if len(late) == 1 else 'they are'} "
                      f"{SETTLE_S:.0f} s after the run's last step; not waiting longer", file=sys.stderr, flush=True)
                break
        self.watched = time.time()  # no new question
        return self.watch()

    def count_loss(self, what: str, global_step: int, writer: SummaryWriter) -> None:
        """One more loss (an env worker, or a role on a lost node), against --max-actor-restarts:
        beyond it, StopRun (the run stops with a final checkpoint when checkpoints are on)."""
        if self.restarts >= self.args.max_actor_restarts:
            raise StopRun(f"{what} ({self.restarts} of --max-actor-restarts {self.args.max_actor_restarts} "
                          f"restarts used)", checkpoint=True)
        self.restarts += 1
        writer.add_text("actor_restarts", f"step {global_step}: {what}", global_step)

    def start_workers(self) -> None:
        """Start every worker's acting loop (after the first weights are published)."""
        nodes = ray.get([w.node.remote() for w in self.workers], timeout=600)  # they have built their envs
        for i, (node, _) in enumerate(nodes):
            print(f"env worker {i} on node {node}", flush=True)
        for i, worker in enumerate(self.workers):  # a worker answers no other call after this one
            self.runs[worker.run.remote()] = i

    def supervise(self, global_step: int, writer: SummaryWriter) -> None:
        """An env worker whose acting loop ended has died: Ray restarts it (up to
        --max-actor-restarts). Until the restarted worker answers a ping it gets no other call
        (a call Ray fails fast while the actor restarts is not a second death); then its loop is
        started again. Beyond --max-actor-restarts, or once Ray reports the worker dead for good,
        raises StopRun. Looks at most 10 times a second."""
        if time.time() - self.supervised < 0.1:
            return
        self.supervised = time.time()
        done, _ = ray.wait([*self.runs, *self.pings], num_returns=len(self.runs) + len(self.pings), timeout=0)
        for ref in done:
            if ref in self.pings:  # a worker Ray is restarting
                i = self.pings.pop(ref)
                try:
                    node, _ = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:  # still restarting: ping again
                    self.pings[self.workers[i].node.remote()] = i
                except ray.exceptions.RayError as e:
                    raise StopRun(f"env worker {i} could not be restarted: {str(e).strip().splitlines()[0][:200]}",
                                  checkpoint=True) from None
                else:
                    print(f"r2d2_ray.py: env worker {i} restarted on node {node}", file=sys.stderr, flush=True)
                    self.runs[self.workers[i].run.remote()] = i
                continue
            i = self.runs.pop(ref)
            try:
                ray.get(ref)
                reason = "its loop returned"
            except ray.exceptions.RayActorError as e:
                reason = str(e).strip().splitlines()[0][:200]
            except ray.exceptions.RayError as e:
                reason = str(e).strip().splitlines()[-1][:200]
            if self.restarts >= self.args.max_actor_restarts:
                raise StopRun(f"env worker {i} died ({self.restarts} of --max-actor-restarts "
                              f"{self.args.max_actor_restarts} restarts used): {reason}", checkpoint=True)
            self.restarts += 1
            print(f"r2d2_ray.py: env worker {i} died at step {global_step:,}; restart {self.restarts} of "
                  f"{self.args.max_actor_restarts}: {reason}", file=sys.stderr, flush=True)
            writer.add_text("actor_restarts", f"step {global_step}: env worker {i} died: {reason}", global_step)
            self.pings[self.workers[i].node.remote()] = i

    def kill(self) -> None:
        for actor in [*self.workers, *self.shards, self.store, *([self.evaluator] if self.evaluator else [])]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass


def to_writable(batch: SequenceBatch) -> SequenceBatch:
    """Arrays out of Ray's object store are read-only: copies torch can take."""
    return dataclasses.replace(batch, **{f.name: np.array(getattr(batch, f.name))
                                         for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None})


# LEARNER (the driver)
def learner(args: Args, sources: dict, run_name: str, checkpoint: dict | None, cluster: Cluster, observation_space,
            n_actions: int, frame_stack: int, stop: StopRequest) -> int:
    """Train on the replay shards the env workers fill; returns the exit code."""
    checkpoint_file = os.path.join("saved_checkpoints", run_name, CHECKPOINT_FILE)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    set_float32_precision(args.tf32)  # on CUDA: TF32 or IEEE float32 (--tf32)
    q_network, target_network, optimizer = make_learner(args, observation_space, n_actions, device)
    epsilons = epsilon_ladder(args.num_actors * args.num_envs_per_actor, args.epsilon_base, args.epsilon_alpha)
    progress = initial_progress(args)
    recent_returns: list[float] = []
    if checkpoint is not None:
        try:  # the replay is in the shards: each loads its own part
            load_learner_state(checkpoint, q_network, target_network, optimizer, None, progress, recent_returns, None,
                               args.learning_starts)
            ray.get([shard.load.remote(from_storable(state))
                     for shard, state in zip(cluster.shards, checkpoint["replay_shards"], strict=True)])
        except (KeyError, RuntimeError, ValueError, TypeError, ray.exceptions.RayTaskError) as e:
            e = getattr(e, "cause", None) or e  # a shard's own error, inside Ray's
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"r2d2_ray.py: error: checkpoint {args.resume!r} does not fit this run: {first_line[:160]}") \
                from None
        if checkpoint["replay_shards"][0]["replay"] is None:  # empty shards: learning starts again later
            progress.update(learn_from=progress["global_step"] + args.learning_starts, updates_base=progress["updates"])
        print(f"resuming {run_name} from step {progress['global_step']:,} ({progress['updates']:,} updates)")
        del checkpoint  # the replay copy can be large
    writer = open_writer(run_name, args, sources, progress["global_step"], epsilons)
    start_time = time.time() - progress["elapsed"]
    # steps each shard counted before Ray rebuilt it (lost with its node) and that it no longer counts
    step_offsets = [0] * len(cluster.shards)

    def write_checkpoint(final: bool = False) -> None:  # final: of a stopped run, where a failure only prints
        """The learner's state and every shard's (each shard answers after the priority updates
        sent before; the env workers go on acting meanwhile, up to the steps the learner allows)."""
        try:
            refs, since = [shard.state.remote(args.checkpoint_replay) for shard in cluster.shards], time.time()
            named_at = since
            while len(ray.wait(refs, num_returns=len(refs), timeout=1)[0]) < len(refs):  # never a blind wait
                late = [i for i, ref in enumerate(refs) if not ray.wait([ref], timeout=0)[0]]
                if time.time() - named_at >= 10:  # every 10 s
                    named_at = time.time()
                    print(f"r2d2_ray.py: the checkpoint has waited {time.time() - since:.0f} s for replay shard(s) "
                          + ", ".join(f"{i} (node {cluster.where[f'replay shard {i}'][0]})" for i in late),
                          file=sys.stderr, flush=True)
                if time.time() - since > 600:
                    raise RuntimeError(f"replay shard(s) {late} did not answer within 600 s")
            shards = ray.get(refs)
            for i, shard in enumerate(shards):  # a shard Ray rebuilt and answered from empty: refill it first
                role = f"replay shard {i}"
                if shard["where"][1] != cluster.where[role][1]:
                    old_node = cluster.where[role][0]
                    cluster.where[role] = shard["where"]
                    rebuilt(role, old_node, shard["where"][0])
                    return write_checkpoint(final)
            for shard, offset in zip(shards, step_offsets):
                shard["steps"] += offset  # what the run counted for it, restored as its count
            progress.update(global_step=sum(shard["steps"] for shard in shards), elapsed=time.time() - start_time)
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # saved, never written
            atomic_save({"format": CHECKPOINT_FORMAT, "run_name": run_name, "args": vars(args),
                         **learner_state(q_network, target_network, optimizer, None, progress, recent_returns, None,
                                         include_replay=False),
                         "replay_shards": to_storable(shards)}, checkpoint_file)
        except (OSError, RuntimeError, ray.exceptions.RayError) as error:
            if not final:
                raise
            return print(f"r2d2_ray.py: no final checkpoint: {error}", file=sys.stderr, flush=True)
        tqdm.write(f"step {progress['global_step']:,}: checkpoint written to {checkpoint_file}")
        sys.stdout.flush()
        if final:
            print(f"resume with --resume {os.path.dirname(checkpoint_file)}", file=sys.stderr, flush=True)

    def publish(updates: int) -> list:
        weights = [ray.put(parameters_to_vector(q_network.parameters()).detach().cpu().numpy())]
        send_allowance(updates, weights)
        return weights

    def send_allowance(updates: int | None = None, weights: list | None = None) -> None:
        """The allowances to the shards, which tell their workers to wait, and to the store, where
        they wait (with the weights of update ``updates``, if given: one call, so that a worker the
        allowance releases gets them)."""
        if weights is None:
            cluster.store.allow.remote(allowed)
        else:
            cluster.store.publish.remote(updates, weights, allowed)
        for shard, steps in zip(cluster.shards, allowed):
            shard.allow.remote(steps)

    shares = [workers_of_shard(i, args) / args.num_actors for i in range(args.num_replay_shards)]

    def allowance(valid: int) -> list[float]:
        """The steps each shard may hold before its env workers wait (--min-replay-ratio: the run may
        reach the step at which the observations trained so far are that ratio of those added),
        each shard its workers' share, in its own count (``step_offsets``). No limit without
        --min-replay-ratio or before the replay holds a whole sequence (nothing can be trained)."""
        if args.min_replay_ratio == 0 or valid == 0:
            return [float("inf")] * len(shares)
        trained = (updates - progress["updates_base"]) * args.batch_size * args.sequence_length
        total = progress["learn_from"] + trained / args.min_replay_ratio
        return [share * total - offset for share, offset in zip(shares, step_offsets)]

    def rebuilt(role: str, old_node: str, new_node: str) -> None:
        """A role Ray rebuilt after its node was lost: the weight store gets the learner's weights
        (and the rate limit) again; a shard its replay from the last checkpoint, or starts empty."""
        nonlocal allowed
        cluster.count_loss(f"{role} was lost with node {old_node}", global_step, writer)
        what = ""
        if role == "the weight store":
            publish(updates)
            what = f"from the learner's weights (update {updates:,})"
        elif role.startswith("replay shard"):
            i = int(role.rsplit(" ", 1)[1])
            counted = shard_stats[i]["steps"] + step_offsets[i]
            state = None
            if args.checkpoint_interval > 0 and args.checkpoint_replay and os.path.exists(checkpoint_file):
                saved = load_checkpoint(checkpoint_file)
                state = from_storable(saved["replay_shards"][i])
                ray.get(cluster.shards[i].load.remote(state), timeout=600)
                what = (f"from the checkpoint of step {saved['progress']['global_step']:,} (its steps since are "
                        f"lost, its streams cut there)")
                del saved
            else:
                what = "empty (no checkpoint with a replay to load)"
            step_offsets[i] = counted - (state["steps"] if state is not None else 0)
            ray.get(cluster.shards[i].set_quota.remote(cluster.quotas[i] - step_offsets[i]), timeout=600)
            shard_stats[i] = {**shard_stats[i], "steps": counted - step_offsets[i], "size": 0, "valid": 0,
                              "priority_total": 0.0, "episodes": []}
            allowed = allowance(sum(shard["valid"] for shard in shard_stats))  # in its new count; it allows nothing
            send_allowance()  # until told
        print(f"r2d2_ray.py: step {global_step:,}: {role} was lost with node {old_node}; rebuilt on node {new_node}"
              f"{' ' + what if what else ''} ({cluster.restarts} of --max-actor-restarts {args.max_actor_restarts} "
              f"restarts used)", file=sys.stderr, flush=True)

    def result_of(ref, what: str):
        """``ray.get(ref)``, but never blind: stops, env worker deaths and rebuilt roles are seen while
        it waits, and a wait of more than 10 s is named on stderr. The env workers wait meanwhile
        once their shards hold the steps the learner allows."""
        since, named = time.time(), False
        while not ray.wait([ref], timeout=1.0)[0]:
            stop.check()
            cluster.supervise(global_step, writer)
            for role, old_node, new_node in cluster.watch():
                rebuilt(role, old_node, new_node)
            if not named and time.time() - since > 10:
                print(f"r2d2_ray.py: step {global_step:,}: the learner has waited 10 s for {what}", file=sys.stderr,
                      flush=True)
                named = True
        return ray.get(ref)

    updates = progress["updates"]
    allowed = allowance(0)
    publish(updates)
    wanted = cluster.store.wanted.remote().future()  # a future: done() costs far less than ray.wait
    cluster.start_workers()
    stats_ref, shard_stats = None, ray.get([s.stats.remote() for s in cluster.shards], timeout=600)
    stats_asked, waiting_since, waited_named = 0.0, None, 0.0
    samples, shard_rng = [], np.random.default_rng(args.seed)
    evaluation = None
    last = {"time": time.time(), "step": progress["global_step"], "updates": progress["updates"],
            "added": sum(shard["added"] for shard in shard_stats)}
    global_step, stats, learner_behind = progress["global_step"], {}, False
    bar = tqdm(total=args.total_timesteps, initial=global_step, unit="step", dynamic_ncols=True,
               disable=not args.progress_bar or not sys.stderr.isatty())
    try:
        while global_step < args.total_timesteps:
            stop.check()
            cluster.supervise(global_step, writer)
            for role, old_node, new_node in cluster.watch():
                rebuilt(role, old_node, new_node)
                stats_ref = None  # asked of the lost shard: ask again
            if stats_ref is None and time.time() - stats_asked > 0.05:  # the shards' counts, 20 times a second
                stats_ref, stats_asked = [s.stats.remote() for s in cluster.shards], time.time()
            if stats_ref is not None and not ray.wait(stats_ref, num_returns=len(stats_ref), timeout=0)[1]:
                try:
                    new_stats = ray.get(stats_ref)
                except ray.exceptions.RayError:  # a shard lost meanwhile (watch finds it): the last counts stay
                    new_stats = [{**shard, "episodes": []} for shard in shard_stats]
                stats_ref = None
                for i, shard in enumerate(new_stats):
                    role = f"replay shard {i}"
                    if shard["where"][1] != cluster.where[role][1]:  # Ray rebuilt it and replayed this call there
                        old_node = cluster.where[role][0]
                        cluster.where[role] = shard["where"]
                        rebuilt(role, old_node, shard["where"][0])  # from the old one's counts in shard_stats
                    else:
                        shard_stats[i] = shard
                for shard in shard_stats:
                    for episodic_return, episodic_length in shard["episodes"]:
                        recent_returns = (recent_returns + [episodic_return])[-20:]
                        writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                        writer.add_scalar("charts/episodic_length", episodic_length, global_step)
            global_step = progress["global_step"] = sum(shard["steps"] + offset
                                                        for shard, offset in zip(shard_stats, step_offsets))
            bar.update(min(global_step, args.total_timesteps) - bar.n)  # the workers' last pushes overshoot
            valid = sum(shard["valid"] for shard in shard_stats)

            # ALGO LOGIC: train while the replay ratio allows (trained observations per observation added)
            learn_from = progress["learn_from"]
            trained = (updates - progress["updates_base"]) * args.batch_size * args.sequence_length
            behind = global_step >= learn_from and valid > 0 and trained < args.min_replay_ratio * (global_step - learn_from)
            previous, allowed = allowed, allowance(valid)
            if learner_behind and not behind:  # caught up: the waiting workers resume on the newest weights
                publish(updates)
            elif allowed != previous:
                send_allowance()
            learner_behind = behind
            if global_step >= learn_from and valid > 0 and trained <= args.replay_ratio * (global_step - learn_from):
                # a shard with probability ∝ its sum of priorities^α, then a batch prioritized within it:
                # each sequence is drawn with p_i^α / Σ_all p^α, as from one replay, and the importance
                # weights, normalized by the batch's largest, are those one replay would give
                totals = np.array([shard["priority_total"] for shard in shard_stats])
                while len(samples) < args.samples_in_flight:  # a bound on the sample requests out
                    shard = int(shard_rng.choice(len(totals), p=totals / totals.sum())) if totals.sum() > 0 else 0
                    samples.append((shard, cluster.shards[shard].sample.remote(args.batch_size)))
                shard, ref = samples[0]
                batch = None
                if ray.wait([ref], timeout=1.0)[0]:  # never blocked for long: stops, losses and faults are seen
                    samples.pop(0)
                    waiting_since = None
                    try:
                        batch = ray.get(ref)
                    except ray.exceptions.RayError:  # lost with its shard (watch rebuilds it): drawn again
                        pass
                else:
                    waiting_since = waiting_since or time.time()
                    if time.time() - waiting_since > 10 and time.time() - waited_named > 30:
                        waited_named = time.time()
                        print(f"r2d2_ray.py: step {global_step:,}: the learner has waited "
                              f"{time.time() - waiting_since:.0f} s for a batch from replay shard {shard} "
                              f"(node {cluster.where[f'replay shard {shard}'][0]})", file=sys.stderr, flush=True)
                if batch is not None:
                    batch = to_writable(batch)
                    priorities, stats = update(q_network, target_network, optimizer,
                                               batch_to_torch(batch, device, frame_stack), args, updates + 1, stop)
                    cluster.shards[shard].update_priorities.remote(batch.indices, batch.sequence_ids, priorities)
                    updates = progress["updates"] = updates + 1
                    if wanted.done():  # an env worker asked for newer weights
                        publish(updates)
                        wanted = cluster.store.wanted.remote().future()
            else:
                time.sleep(0.005)

            if evaluation is not None and ray.wait([evaluation], timeout=0)[0]:
                step, returns = ray.get(evaluation)
                log_evaluation(writer, returns, step, time.time() - start_time)
                tqdm.write(f"step {step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f}")
                sys.stdout.flush()
                evaluation = None
            if cluster.evaluator is not None and evaluation is None and progress["next_eval"] is not None \
                    and global_step >= progress["next_eval"]:
                while progress["next_eval"] <= global_step:
                    progress["next_eval"] += args.eval_interval
                evaluation = cluster.evaluator.evaluate.remote(publish(updates), global_step)
                progress["evaluated_at"] = updates

            if global_step >= progress["next_log"]:
                replay = types.SimpleNamespace(size=sum(s["size"] for s in shard_stats),
                                               num_sequences_added=sum(s["added"] for s in shard_stats),
                                               max_priority=max(s["max_priority"] for s in shard_stats))
                sps, updates_per_second = log_scalars(writer, global_step, updates, replay, stats,
                                                      float(epsilons.mean()), last, args)
                versions = [v for shard in shard_stats for v in shard["versions"].values()]
                if versions:
                    writer.add_scalar("charts/parameter_lag", updates - float(np.mean(versions)), global_step)
                writer.add_scalar("charts/actor_restarts", cluster.restarts, global_step)
                mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "– (no episode ended yet)"
                tqdm.write(f"step {global_step:,}: SPS {sps:.0f}, updates {updates:,} ({updates_per_second:.1f}/s), "
                           f"return {mean_return}, replay {replay.size:,}")
                sys.stdout.flush()
                bar.set_postfix(SPS=f"{sps:.0f}", ret=mean_return.split()[0], upd=updates)
                while progress["next_log"] <= global_step:
                    progress["next_log"] += args.log_interval

            if args.checkpoint_interval > 0 and global_step >= progress["next_checkpoint"]:
                while progress["next_checkpoint"] <= global_step:
                    progress["next_checkpoint"] += args.checkpoint_interval
                write_checkpoint()

        for role, old_node, new_node in cluster.settle(stop):  # a loss in the last seconds is reported too
            rebuilt(role, old_node, new_node)
        if evaluation is not None:
            step, returns = result_of(evaluation, "the last evaluation")
            log_evaluation(writer, returns, step, time.time() - start_time)
            tqdm.write(f"step {step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f}")
            sys.stdout.flush()
        writer.add_scalar("charts/learner_updates", updates, global_step)
        if args.save_model:
            save_and_evaluate_model(run_name, q_network, args, observation_space, n_actions, writer, global_step,
                                    time.time() - start_time, device)
        elif cluster.evaluator is not None and progress["evaluated_at"] != updates:
            step, returns = result_of(cluster.evaluator.evaluate.remote(publish(updates), global_step),
                                      "the final evaluation")
            log_evaluation(writer, returns, step, time.time() - start_time)
            tqdm.write(f"step {step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f}")
            sys.stdout.flush()
        return 0
    except StopRun as e:
        print(f"r2d2_ray.py: stopping at step {global_step:,}: {e}", file=sys.stderr, flush=True)
        if e.checkpoint and args.checkpoint_interval > 0:
            write_checkpoint(final=True)
        return e.exit_code
    except ray.exceptions.RayError as e:  # a lost shard, store or evaluator
        print(f"r2d2_ray.py: stopping at step {global_step:,}: a Ray actor was lost: "
              f"{str(e).strip().splitlines()[0][:200]}", file=sys.stderr, flush=True)
        return 1
    finally:
        bar.close()
        writer.close()


def start_ray(args: Args, object_store_memory: int, num_cpus: int) -> str | None:
    """Join --ray-address, or start a local Ray on loopback (127.0.0.2: Ray replaces 127.0.0.1 by
    the machine's address) with its files in a temporary folder, ``num_cpus`` CPUs (at least one per
    env worker) and an object store of ``object_store_memory`` bytes in /dev/shm. Returns that folder (None when joining). Raises
    SystemExit with one line if Ray cannot be reached."""
    try:
        if args.ray_address:
            if args.ray_address != "auto":  # Ray itself retries an unreachable address for minutes
                host, _, port = args.ray_address.rpartition(":")  # its form was checked by check_args
                try:
                    socket.create_connection((host, int(port)), timeout=5).close()
                except OSError as e:
                    raise ConnectionError(f"nothing answers at {args.ray_address} ({e.strerror or e})") from None
            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=True,
                     logging_level="ERROR")
            return None
        temp_dir = tempfile.mkdtemp(prefix="r2d2_ray_", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
        # workers at niceness 0, as r2d2_mp.py's processes (Ray's default, 15, puts the acting thread
        # below the learner, the shards and ale-py's threads on a machine they all share)
        # Ray's own processes join this process group and block SIGINT (Ctrl-C) but not SIGTERM
        # or SIGHUP: a SIGTERM to the group (kill -- -PGID, a batch scheduler) or a closed
        # terminal's SIGHUP kills its agents and, ~10 s later, the raylet with every shard, before
        # the final checkpoint can read them. They inherit this signal mask, so they also block
        # SIGTERM and SIGHUP; ray.shutdown kills them anyway.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
        try:
            ray.init(_node_ip_address="127.0.0.2", include_dashboard=False, _temp_dir=temp_dir,
                     num_cpus=max(args.num_actors, num_cpus), logging_level="ERROR",
                     object_store_memory=object_store_memory, _plasma_directory=args.ray_plasma_directory,
                     _system_config={"worker_niceness": 0},
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(  # this clone's r2d2_algo
                         filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return temp_dir
    except Exception as e:  # ConnectionError, ValueError, RuntimeError from ray.init
        raise SystemExit(f"r2d2_ray.py: error: cannot start or join Ray"
                         f"{' (--ray-address ' + args.ray_address + ')' if args.ray_address else ''}: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None


def main(args: Args, argv: list[str] | None = None) -> int:
    """Check the arguments, start or join Ray, start the roles, run the learner, and stop
    everything however the run ends; returns the exit code."""
    try:
        # defaults, then the preset, the command line and the checkpoint; prints what the preset set
        args, checkpoint, sources = resolve_args(args, argv, os.path.basename(__file__))
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id, env_kwargs=args.env_kwargs)
        frame_stack = frame_stack_of(args.env_id)
        if args.num_envs_per_actor == 0:
            args = dataclasses.replace(args, num_envs_per_actor=64 if frame_stack > 1 else 8)
        if frame_stack > 1 and args.num_envs_per_actor % args.env_splits:
            raise ValueError(f"--env-splits ({args.env_splits}) must divide --num-envs-per-actor "
                             f"({args.num_envs_per_actor})")
        if args.num_replay_shards > args.num_actors:
            raise ValueError(f"--num-replay-shards ({args.num_replay_shards}) must be <= --num-actors "
                             f"({args.num_actors})")
        network = make_network(args, observation_space, n_actions)
        replay_bytes = sum(  # each shard's replay arguments, checked before Ray starts
            SequenceReplayBuffer.shared_nbytes(**replay_arguments(args, observation_space, network.state_size, frame_stack,
                                                                  workers_of_shard(i, args) * args.num_envs_per_actor))
            for i in range(args.num_replay_shards))
        # the embedded object store lives in /dev/shm (or --ray-plasma-directory), which is also memory
        in_flight = object_store_bytes(args, observation_space, network.state_size, frame_stack,
                                       parameter_count(network))
        store_size, limits = max(2 * in_flight, 256 * 2**20), read_limits()
        # the CPUs the local env workers leave, at most torch's own count (cores, or OMP_NUM_THREADS)
        torch_threads = args.learner_threads or min(
            torch.get_num_threads(), max(1, limits.cpus - args.num_actors) if not args.ray_address else limits.cpus)
        if not args.ray_address:  # a cluster's nodes are its own: only the embedded Ray is checked here
            roles = args.num_actors + args.num_replay_shards + 2
            others = {"Ray's object store": store_size,
                      f"{args.samples_in_flight + 1} learner batches": (args.samples_in_flight + 1) * batch_bytes(
                          args.batch_size, window_length(args.burn_in_length, args.sequence_length, args.n_step),
                          observation_space.shape, observation_space.dtype),
                      "networks and Adam": network_bytes(args.hidden_size, args.torso_size, args.head_hidden_size,
                                                         args.rnn_type),
                      f"{roles} processes (env workers, shards, evaluator, weight store) × "
                      f"{PROCESS_BYTES // 2**20} MiB": roles * PROCESS_BYTES}
            fit = max(0, int(0.9 * args.buffer_size * (limits.memory_bytes - sum(others.values())) / replay_bytes))
            check_memory({"replay shards": replay_bytes, **others}, limits,
                         f"lower --buffer-size (about {fit:,} fit), --batch-size or --num-actors")
            if args.ray_plasma_directory is None:
                check_shared_memory(store_size, f"Ray's object store (twice the {size(in_flight)} the run keeps "
                                    f"in it, at least 256 MiB)", "or put the store on disk with "
                                    "--ray-plasma-directory /tmp (slower)", limits)
            elif not os.path.isdir(args.ray_plasma_directory) or not os.access(args.ray_plasma_directory, os.W_OK):
                raise ValueError(f"--ray-plasma-directory {args.ray_plasma_directory!r} is not a writable folder")
    except ValueError as e:
        raise SystemExit(f"r2d2_ray.py: error: {e}") from None
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    temp_dir, reaper, cluster, stop = None, None, None, None
    try:
        temp_dir = start_ray(args, store_size, limits.cpus)
        if temp_dir is not None:  # removes Ray's processes and folder if this process dies first (SIGKILL)
            reaper = subprocess.Popen([sys.executable, processes.__file__, temp_dir,
                                       *processes.descendants(os.getpid())], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        stop = StopRequest()  # after ray.init, whose own SIGTERM handler aborts the process
        learner_device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        print(f"run {run_name}: {parameter_count(network):,} parameters, {args.num_actors} env workers × "
              f"{args.num_envs_per_actor} envs, {args.num_replay_shards} replay shard(s) of "
              f"{args.buffer_size // args.num_replay_shards:,} observations, Ray "
              f"{'at ' + args.ray_address if args.ray_address else 'local (127.0.0.2)'}; the run keeps at most "
              f"{in_flight / 2**20:,.1f} MiB in Ray's object store"
              f"{'' if args.ray_address else ' (of %.0f MiB in %s)' % (store_size / 2**20, args.ray_plasma_directory or '/dev/shm')}"
              f"; learner on {learner_device.type} ({precision_summary(learner_device, args.amp, args.tf32)}); "
              f"{limits.cpus_phrase()}: "
              f"{'env workers = CPUs - 1, ' if args.num_actors == max(1, limits.cpus - 1) else ''}learner "
              f"{torch_threads} torch thread{'s' if torch_threads != 1 else ''}", flush=True)
        torch.set_num_threads(torch_threads)  # torch counts cores, not a cgroup CPU quota
        cluster = Cluster(args, run_name, observation_space, n_actions, network.state_size, frame_stack,
                          checkpoint["progress"]["global_step"] if checkpoint is not None else 0)
        cluster.describe()
        stop.check()
        return learner(args, sources, run_name, checkpoint, cluster, observation_space, n_actions, frame_stack, stop)
    except StopRun as e:
        print(f"r2d2_ray.py: stopping: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if cluster is not None:
            cluster.kill()
        if ray.is_initialized():
            ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if reaper is not None:
            reaper.communicate(b"done", timeout=10)
        if stop is not None:
            stop.restore()


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
