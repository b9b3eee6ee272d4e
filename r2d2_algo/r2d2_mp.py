"""R2D2 on one machine: actor processes feed one learner through shared memory.

    python r2d2_algo/r2d2_mp.py --env-id PongNoFrameskip-v4

Processes and the shared memory between them (all created by the learner, see create_shared_memory):

    actor 0 ─┐  envs + CPU copy of the network; writes steps straight into the replay's
    actor 1 ─┼─► shared arrays (obs, action, reward, flags, stored state, write counts);
      ...    │   every --actor-update-interval actor steps asks for newer weights and loads them
    actor N ─┘
    evaluator    CPU copy of the published weights; plays evaluation episodes when asked
                 learner (main process, GPU when available)
                   prefetch thread: syncs the replay index with the actors' write counts,
                                    samples prioritized windows, applies priority updates
                   main thread:     burn-in, n-step double-Q loss, Adam, target copies,
                                    publishes weights (with a version) when an actor asks,
                                    restarts dead actors, logs

The loss and its maths are r2d2.py's (``r2d2_loss``); replay and network are storage.py's and
model.py's. Defaults are the paper's Atari values (R2D2_SPEC.md, Table 2) except the replay
capacity, scaled to a workstation. A run that stops for any reason (end, Ctrl-C, SIGTERM, an
exception in the learner, an actor that died once more than --max-actor-restarts allows) stops
its processes within seconds and unlinks its shared memory; a dead actor is reported by name
with its traceback.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the heavy imports below load: nothing to clean, leave quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import dataclasses
import os
import queue
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.multiprocessing as mp
import tyro
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter

from r2d2_algo.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    atomic_save,
    from_storable,
    learner_state,
    load_learner_state,
    restore_rng_states,
    resume_run,
    rng_states,
    to_storable,
)
from r2d2_algo.envs import check_env_id, default_env_threads, epsilon_ladder, frame_stack_of, make_vector_env
from r2d2_algo.evaluate import (
    EVAL_EPSILON,
    EVAL_SEED_OFFSET,
    evaluate,
)
from r2d2_algo.model import RNNQNetwork, parameter_count
from r2d2_algo.r2d2 import EnvActor, batch_to_torch, r2d2_loss, save_and_evaluate_model
from r2d2_algo.r2d2 import check_args as r2d2_check_args
from r2d2_algo.r2d2 import log_evaluation as write_evaluation
from r2d2_algo.shared import SharedArrays, available_memory_bytes
from r2d2_algo.storage import SequenceReplayBuffer


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
    checkpoint_interval: int = 0
    """env steps between checkpoints to `saved_checkpoints/{run_name}/` (0: none; else Ctrl-C/SIGTERM write one too)"""
    checkpoint_replay: bool = True
    """checkpoints include the replay and its priorities (else a resumed run refills it)"""
    resume: str | None = None
    """checkpoint file or `saved_checkpoints/{run_name}` folder to continue (its arguments are used)"""

    # Environment and actors
    env_id: str = "PongNoFrameskip-v4"
    """gymnasium id with a Box observation and Discrete actions; `module:EnvId` imports module first"""
    total_timesteps: int = 10_000_000
    """total environment steps (summed over all actors' envs)"""
    num_actors: int = max(1, (os.cpu_count() or 2) - 1)
    """actor processes (default: the cores left after the learner)"""
    num_envs_per_actor: int = 0
    """environments per actor, acted on with batched forward passes (one per env split). 0: 64 (= 2 × 32:
    the forward pass is bound by reading the weights, so larger batches cost little more per call), or
    fewer when there are so many actors that each env's replay stream would keep under 8 windows"""
    env_splits: int = 2
    """Atari: each actor's envs step in this many batches, one stepping in ale-py's C++ threads while
    the network acts on another (double buffering); other envs always use 1"""
    env_threads: int = 0
    """Atari: C++ threads per actor stepping its envs (ale-py AtariVectorEnv); 0: the cores shared among the actors"""
    actor_update_interval: int = 400
    """actor steps (batched forward passes, one per env split) between an actor's weight refreshes
    (paper: 400 steps of an actor's single env)"""
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
    """environment steps between greedy evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (0: no evaluation)"""
    eval_epsilon: float = EVAL_EPSILON
    """ε of evaluation episodes (evaluate.py's default)"""
    log_interval: float = 10.0
    """seconds between scalar logs"""


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class StopRun(Exception):
    """Raised in the learner to stop the run cleanly (SIGTERM, a dead actor)."""


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
    window_length = args.burn_in_length + args.sequence_length + args.n_step
    fit = args.buffer_size // (args.num_actors * MIN_WINDOWS_PER_STREAM * window_length)
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
    weights:  the learner's parameters as one float32 vector, and weights_version (its update count);
              weights_wanted: an actor asks for newer weights (the learner publishes only then)
    counters: actor_steps (env steps per actor), actor_weights_version (version each actor acts with)
    checkpoints: pause (the learner asks the actors to wait), actor_paused (each actor waits)
    rate limit: learner_behind (the learner is below --min-replay-ratio: the actors wait)
    """
    replay = SequenceReplayBuffer(**replay_kwargs, index=True, allocate=arrays.allocate)
    arrays.allocate("weights", (num_params,), np.float32)
    arrays.allocate("weights_version", (1,), np.int64)
    arrays.allocate("actor_steps", (num_actors,), np.int64)
    arrays.allocate("actor_weights_version", (num_actors,), np.int64)
    arrays.allocate("weights_wanted", (num_actors,), np.int64)
    arrays.allocate("pause", (1,), np.int64)  # set by the learner while it writes a checkpoint
    arrays.allocate("actor_paused", (num_actors,), np.int64)  # each actor's acknowledgement
    arrays.allocate("learner_behind", (1,), np.int64)
    return replay


def publish(network: torch.nn.Module, weights: np.ndarray, version: np.ndarray, lock, updates: int) -> None:
    """Learner side: copy the parameters into the shared float32 vector ``weights`` (P,) and set
    ``version`` (1,) int64 to ``updates``, both under ``lock`` (R2D2 Sec. 2.3: actors act with
    the learner's recent weights)."""
    with lock:
        weights[:] = parameters_to_vector(network.parameters()).detach().cpu().numpy()
        version[0] = updates


def load_published_weights(network: torch.nn.Module, weights: np.ndarray, version: np.ndarray, lock) -> int:
    """Actor side of ``publish``: load the shared weights into ``network``; returns their version."""
    with lock:
        vector_to_parameters(torch.from_numpy(weights.copy()), network.parameters())
        return int(version[0])


def make_network(args: Args, observation_space, n_actions: int) -> RNNQNetwork:
    return RNNQNetwork(observation_space, n_actions, args.rnn_type, args.hidden_size, args.torso_size,
                       args.head_hidden_size)


# ACTOR PROCESS
def actor_process(actor_id: int, args: Args, layout: dict, replay_kwargs: dict, weights_lock, stop_event,
                  episode_queue, error_queue, observation_space, n_actions: int, parent_pid: int,
                  seed_offset: int = 0) -> None:
    """Step ``num_envs_per_actor`` envs with ε-greedy actions of a CPU copy of the network and
    write every step to the shared replay. Env j of this actor is stream / ε rung
    actor_id · num_envs_per_actor + j. Every ``actor_update_interval`` actor steps it asks for
    newer weights and loads them as soon as the learner has published them. While the learner's
    ``pause`` flag is set (a checkpoint is being written), or once all actors together have
    taken ``total_timesteps`` steps, the actor waits between steps. ``seed_offset`` (the resumed
    step count, or the step of a restart) gives new episodes."""
    for signum in STOP_SIGNALS:  # the learner handles Ctrl-C / SIGTERM (blocked until here, see main)
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)
    arrays = SharedArrays.attach(layout)
    envs = None
    try:
        E = args.num_envs_per_actor
        streams = actor_id * E + np.arange(E)
        epsilons = epsilon_ladder(args.num_actors * E, args.epsilon_base, args.epsilon_alpha)[streams]
        net = make_network(args, observation_space, n_actions)
        replay = SequenceReplayBuffer(**replay_kwargs, index=False, allocate=arrays.get)
        weights, version = arrays["weights"], arrays["weights_version"]
        seed = args.seed + 1000 * (actor_id + 1) + seed_offset
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        atari = frame_stack_of(args.env_id) > 1
        splits = args.env_splits if atari else 1
        # with splits, the env threads run ahead in the background: the policy thread comes first
        threads = args.env_threads or default_env_threads(args.num_actors)
        envs = make_vector_env(args.env_id, E, seed, num_splits=splits, num_threads=threads,
                               thread_niceness=10 if splits > 1 else 0)

        acting_version = arrays["actor_weights_version"][actor_id : actor_id + 1]
        wanted = arrays["weights_wanted"][actor_id : actor_id + 1]
        acting_version[0] = load_published_weights(net, weights, version, weights_lock)
        actor = EnvActor(envs, net, replay, epsilons, rng, seed, streams=streams)
        steps_since_refresh = 0  # actor steps (batched forward passes)
        steps_before = int(arrays["actor_steps"][actor_id])  # a resumed run continues the count
        pause, paused, learner_behind = arrays["pause"], arrays["actor_paused"], arrays["learner_behind"]
        all_steps = arrays["actor_steps"][: args.num_actors]

        def must_wait() -> bool:  # a checkpoint, a learner below --min-replay-ratio, or the run's steps are done
            return bool(pause[0] or learner_behind[0] or all_steps.sum() >= args.total_timesteps)

        while not stop_event.is_set():
            if os.getppid() != parent_pid:
                return  # the learner is gone: nobody will read what we write
            if must_wait():
                paused[actor_id] = 1
                while must_wait() and not stop_event.is_set() and os.getppid() == parent_pid:
                    time.sleep(0.002)
                paused[actor_id] = 0
                continue
            for _, episodic_return, episodic_length in actor.step():
                episode_queue.put((actor_id, episodic_return, episodic_length))
            arrays["actor_steps"][actor_id] = steps_before + actor.env_steps
            steps_since_refresh += 1
            if steps_since_refresh >= args.actor_update_interval:
                wanted[0] = 1  # the learner publishes its next update for us
                if version[0] > acting_version[0]:
                    acting_version[0] = load_published_weights(net, weights, version, weights_lock)
                    wanted[0], steps_since_refresh = 0, 0
    except Exception:
        error_queue.put((f"actor-{actor_id}", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if envs is not None:
            envs.close()
        arrays.close()


# EVALUATOR PROCESS
def evaluator_process(args: Args, layout: dict, weights_lock, requests, results, error_queue, observation_space,
                      n_actions: int, parent_pid: int) -> None:
    """For each request (the env step to log it at), play ``eval_episodes`` episodes with
    ε = ``eval_epsilon`` on a CPU copy of the latest published weights and put
    (step, weights version, returns (episodes,) float64) on ``results``. It runs beside the
    learner at a lower CPU priority (nice 10), so learning never waits for an evaluation; a
    ``None`` request, or a learner that is gone, ends it."""
    for signum in STOP_SIGNALS:  # the learner handles Ctrl-C / SIGTERM (blocked until here, see main)
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)
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
                                  args.eval_epsilon)
            results.put((global_step, weights_version, returns))
    except Exception:
        error_queue.put(("evaluator", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        arrays.close()


# LEARNER: prefetch thread
class Prefetcher(threading.Thread):
    """Owns the replay's sampling index: syncs it with the actors' write counts, samples the
    next batches ahead of the learner (queue of ``depth``), applies priority updates."""

    def __init__(self, replay: SequenceReplayBuffer, batch_size: int, rng: np.random.Generator, depth: int = 2):
        super().__init__(name="prefetch", daemon=True)
        self.replay, self.batch_size, self.rng = replay, batch_size, rng
        self.batches: queue.Queue = queue.Queue(maxsize=depth)
        self.priority_updates: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held while the index is used; the learner takes it to checkpoint
        self.error: BaseException | None = None

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
                while not self.stop.is_set():
                    try:
                        self.batches.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        with self.lock:
                            self.apply_priority_updates()
        except BaseException as e:  # handed to the learner, which stops the run
            self.error = e


def check_args(args: Args) -> None:
    """r2d2.py's checks with this script's integer fields; one-line ValueError."""
    r2d2_check_args(args, positive=("total_timesteps", "num_actors", "env_splits",
                                    "actor_update_interval", "hidden_size", "torso_size", "head_hidden_size", "buffer_size",
                                    "sequence_length", "batch_size", "n_step", "target_network_update_period"))
    if args.log_interval <= 0:
        raise ValueError(f"--log-interval must be > 0, got {args.log_interval}")
    for name in ("num_envs_per_actor", "env_threads", "max_actor_restarts"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.min_replay_ratio <= args.replay_ratio:
        raise ValueError(f"--min-replay-ratio must be in [0, --replay-ratio={args.replay_ratio}], "
                         f"got {args.min_replay_ratio}")


# arguments a resumed run may change on its command line; every other one comes from the checkpoint
RESUMABLE_ARGS = ("total_timesteps", "checkpoint_interval", "checkpoint_replay", "save_model", "cuda", "eval_interval",
                  "eval_episodes", "eval_epsilon", "log_interval", "actor_update_interval", "env_threads",
                  "max_actor_restarts")


def main(args: Args, argv: list[str] | None = None) -> int:
    try:
        args, checkpoint = resume_run(args, sys.argv[1:] if argv is None else argv, RESUMABLE_ARGS)
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id)
        frame_stack = frame_stack_of(args.env_id)
        envs_per_actor_given = args.num_envs_per_actor > 0
        args = dataclasses.replace(args, num_envs_per_actor=resolve_envs_per_actor(args, frame_stack))
        if frame_stack > 1 and args.num_envs_per_actor % args.env_splits:
            raise ValueError(f"--env-splits ({args.env_splits}) must divide --num-envs-per-actor "
                             f"({args.num_envs_per_actor})")
    except ValueError as e:
        raise SystemExit(f"r2d2_mp.py: error: {e}") from None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.num_actors))
    q_network = make_network(args, observation_space, n_actions).to(device)
    target_network = make_network(args, observation_space, n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    num_params = parameters_to_vector(q_network.parameters()).numel()

    replay_kwargs = replay_arguments(args, observation_space, q_network.state_size, frame_stack)
    try:
        replay_bytes = SequenceReplayBuffer.shared_nbytes(**replay_kwargs)
    except ValueError as e:
        raise SystemExit(f"r2d2_mp.py: error: {e}") from None
    free = available_memory_bytes()
    if replay_bytes > 0.9 * free:
        raise SystemExit(f"r2d2_mp.py: error: a replay of {args.buffer_size:,} observations needs "
                         f"{replay_bytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB of memory is free; "
                         f"lower --buffer-size")

    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    checkpoint_file = os.path.join("saved_checkpoints", run_name, CHECKPOINT_FILE)
    # the loop's counters (checkpointed)
    progress = {"global_step": 0, "updates": 0, "elapsed": 0.0, "evaluated_at": -1,
                "next_eval": args.eval_interval if args.eval_interval > 0 else None,
                "next_checkpoint": args.checkpoint_interval, "learn_from": args.learning_starts, "updates_base": 0}
    ctx = mp.get_context("spawn")
    arrays = SharedArrays()
    stop_event = ctx.Event()
    weights_lock = ctx.Lock()
    # one episode queue per actor: an actor killed while it writes to its queue can leave the
    # queue's write lock held, which would silence every other actor sharing it
    episode_queues, error_queue = [ctx.Queue() for _ in range(args.num_actors)], ctx.Queue()
    eval_requests, eval_results = ctx.Queue(), ctx.Queue()
    actors: list = []
    evaluator = None
    prefetcher = None
    writer = None

    # Ctrl-C and SIGTERM only record the request; the main loop stops at its next check. An
    # exception raised asynchronously inside library code (tensorboard's writer, a queue) can
    # leave it blocked forever in the clean-up.
    stop_request: list[str] = []

    def request_stop(signum, frame):
        stop_request.append("interrupted (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM")

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def check_stop() -> None:
        """Raise StopRun on a stop request (Ctrl-C, SIGTERM)."""
        if stop_request:
            raise StopRun(stop_request[0])

    # A CPU update on Atari takes tens of seconds (a few big ops), so the stop check also runs
    # at every module call and every parameter gradient: a stop waits for one op, not one update.
    # Raised before optimizer.step, it leaves the weights as the last finished update left them.
    for network in (q_network, target_network):
        for module in network.modules():
            module.register_forward_pre_hook(lambda *_: check_stop())
    for parameter in q_network.parameters():
        parameter.register_hook(lambda grad: check_stop())

    def start_process(target, name: str, *process_args):
        # Ctrl-C in a terminal, or a SIGTERM to the group, reaches every process, and only the
        # learner must act on it (it pauses the actors for a last checkpoint, then stops them).
        # Children start with SIGINT and SIGTERM blocked (the mask is inherited through exec,
        # before Python even loads) and ignore them from their first line. Blocked, not ignored,
        # here too: a stop that arrives during the spawn (about a second) waits for the learner
        # instead of being lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process = ctx.Process(target=target, name=name, daemon=True, args=process_args)
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return process

    def start_actor(actor_id: int, seed_offset: int):
        return start_process(actor_process, f"actor-{actor_id}", actor_id, args, arrays.layout, replay_kwargs,
                             weights_lock, stop_event, episode_queues[actor_id], error_queue, observation_space,
                             n_actions, os.getpid(), seed_offset)

    reported_errors: list[tuple[str, str]] = []  # (process name, traceback) from error_queue

    def traceback_of(process) -> str:
        """The traceback a dead process reported, or its exit code if it reported none (a signal)."""
        deadline = time.time() + 2.0
        while True:
            for i, (name, trace) in enumerate(reported_errors):
                if name == process.name:
                    return reported_errors.pop(i)[1]
            try:
                reported_errors.append(error_queue.get(timeout=max(0.0, deadline - time.time())))
            except queue.Empty:
                return f"exit code {process.exitcode} (no traceback: killed by a signal?)"

    supervision = {"checked_at": 0.0, "restarts": 0}

    def supervise(global_step: int) -> None:
        """Restart an actor that died (its env streams are cut where it stopped), up to
        --max-actor-restarts per run; one death more, or a dead evaluator, stops the run."""
        if time.monotonic() - supervision["checked_at"] < 0.2:
            return
        supervision["checked_at"] = time.monotonic()
        for actor_id, p in enumerate(actors):
            if p.exitcode is None:
                continue
            trace = traceback_of(p)
            if supervision["restarts"] >= args.max_actor_restarts:
                raise StopRun(f"{p.name} died ({supervision['restarts']} of --max-actor-restarts "
                              f"{args.max_actor_restarts} restarts used):\n{trace}")
            supervision["restarts"] += 1
            print(f"r2d2_mp.py: {p.name} died at step {global_step:,}; restart {supervision['restarts']} of "
                  f"{args.max_actor_restarts}:\n{trace}", file=sys.stderr, flush=True)
            # a copy of the weights takes milliseconds: a lock still held after 2 s was the dead
            # actor's (any process may release a multiprocessing lock)
            if weights_lock.acquire(timeout=2.0):
                weights_lock.release()
            else:
                weights_lock.release()
                print(f"r2d2_mp.py: {p.name} died holding the weights lock; released", file=sys.stderr, flush=True)
            streams = actor_id * args.num_envs_per_actor + np.arange(args.num_envs_per_actor)
            with prefetcher.lock:  # no n-step return or window state runs across the cut
                replay.truncate_streams(streams)
            episode_queues[actor_id].cancel_join_thread()  # the dead actor may have left it locked
            episode_queues[actor_id] = ctx.Queue()
            arrays["actor_paused"][actor_id] = 0
            arrays["weights_wanted"][actor_id] = 0
            actors[actor_id] = start_actor(actor_id, global_step + supervision["restarts"])
            writer.add_text("actor_restarts", f"step {global_step}: {p.name} died\n\n    "
                            + trace.replace("\n", "\n    "), global_step)
        if evaluator is not None and evaluator.exitcode is not None:
            raise StopRun(f"the evaluator died:\n{traceback_of(evaluator)}")

    exit_code = 0
    try:
        replay = create_shared_memory(arrays, replay_kwargs, num_params, args.num_actors)
        weights, version = arrays["weights"], arrays["weights_version"]
        weights_wanted = arrays["weights_wanted"][: args.num_actors]
        published = {"version": -1}

        def publish_weights(updates: int, force: bool = False) -> None:
            """Publish newer weights when an actor has asked for them (or ``force``): no more often
            than the actors can use them, and no GPU synchronisation after every update."""
            if updates != published["version"] and (force or weights_wanted.any()):
                publish(q_network, weights, version, weights_lock, updates)
                published["version"] = updates

        learner_rng = np.random.default_rng(args.seed)  # the prefetch thread's sampling
        if checkpoint is not None:
            try:
                load_learner_state(checkpoint, q_network, target_network, optimizer)
                progress.update(checkpoint["progress"])
                arrays["actor_steps"][:] = checkpoint["actor_steps"].numpy()
                if checkpoint["replay"] is not None:
                    replay.load_state_dict(from_storable(checkpoint["replay"]))
                    replay.truncate_streams()  # the actors' envs start new episodes
                else:  # an empty replay: learning starts again after learning_starts new steps
                    progress.update(learn_from=progress["global_step"] + args.learning_starts,
                                    updates_base=progress["updates"])
                restore_rng_states(checkpoint["rng"], learner_rng)
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise SystemExit(f"r2d2_mp.py: error: checkpoint {args.resume!r} does not fit this run: "
                                 f"{first_line[:160]}") from None
            print(f"resuming {run_name} from step {progress['global_step']:,} ({progress['updates']:,} updates)",
                  flush=True)
            del checkpoint
        publish_weights(progress["updates"], force=True)
        envs_note = "" if envs_per_actor_given else " (default)"
        print(f"run {run_name}: {parameter_count(q_network):,} parameters, learner on {device}, "
              f"{args.num_actors} actors × {args.num_envs_per_actor} envs{envs_note}, replay {args.buffer_size:,} "
              f"observations = {replay_bytes / 2**30:.2f} GiB in shared memory, {replay.capacity_per_stream:,} per "
              f"env stream", flush=True)
        for actor_id in range(args.num_actors):
            actors.append(start_actor(actor_id, progress["global_step"]))
        if args.eval_episodes > 0:
            evaluator = start_process(evaluator_process, "evaluator", args, arrays.layout, weights_lock, eval_requests,
                                      eval_results, error_queue, observation_space, n_actions, os.getpid())

        # a resumed run continues its tensorboard folder; events logged after the checkpoint are purged
        writer = SummaryWriter(f"runs/{run_name}", purge_step=progress["global_step"] + 1 if progress["global_step"]
                               else None)
        if progress["global_step"] == 0:
            writer.add_text("hyperparameters",
                            "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        prefetcher = Prefetcher(replay, args.batch_size, learner_rng)
        prefetcher.start()

        actor_steps = arrays["actor_steps"][: args.num_actors]
        start_time = time.time() - progress["elapsed"]
        last_log_time = time.time()
        last = {"steps": actor_steps.copy(), "updates": progress["updates"], "added": 0}
        updates, sample_wait, dropped_windows, recent_returns = progress["updates"], 0.0, 0, deque(maxlen=20)
        trained_per_update = args.batch_size * args.sequence_length
        global_step = progress["global_step"]
        stats = {}
        evaluation = {}  # the evaluation in progress: global_step, updates and wall-clock when asked

        def request_evaluation(global_step: int, updates: int) -> None:
            """The evaluator plays episodes with the weights of this update, beside the learner."""
            publish_weights(updates, force=True)
            eval_requests.put(global_step)
            evaluation.update(global_step=global_step, updates=updates, wall_clock=time.time() - start_time)
            progress["evaluated_at"] = updates

        def collect_evaluation(updates: int, timeout: float = 0.0) -> None:
            try:
                global_step, weights_version, returns = eval_results.get(timeout=timeout) if timeout \
                    else eval_results.get_nowait()
            except queue.Empty:
                return
            write_evaluation(writer, returns, global_step, evaluation["wall_clock"])
            print(f"step {global_step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f} (weights of update "
                  f"{weights_version:,}, {evaluation['wall_clock']:.0f}s; the learner did "
                  f"{updates - evaluation['updates']:,} updates while it ran)", flush=True)
            evaluation.clear()

        def wait_for_evaluation(updates: int) -> None:
            while evaluation:
                check_stop()
                supervise(global_step)
                collect_evaluation(updates, timeout=0.1)

        def write_checkpoint(final: bool = False) -> None:
            """Pause the actors between steps and the prefetch thread, then save the run."""
            arrays["pause"][0] = 1
            try:
                deadline = time.time() + 120
                while not arrays["actor_paused"][: args.num_actors].all():
                    if final and any(p.exitcode is not None for p in actors) or time.time() > deadline:
                        raise StopRun("an actor died or did not pause for the checkpoint")
                    if not final:
                        supervise(int(actor_steps.sum()))  # a restarted actor pauses too
                    time.sleep(0.005)
                with prefetcher.lock:
                    prefetcher.apply_priority_updates()
                    progress.update(global_step=int(actor_steps.sum()), updates=updates,
                                    elapsed=time.time() - start_time)
                    atomic_save({
                        "format": CHECKPOINT_FORMAT, "run_name": run_name, "args": vars(args),
                        "progress": dict(progress), "actor_steps": torch.from_numpy(actor_steps.copy()),
                        **learner_state(q_network, target_network, optimizer),
                        "rng": rng_states(prefetcher.rng),
                        "replay": to_storable(replay.state_dict()) if args.checkpoint_replay else None,
                    }, checkpoint_file)
            finally:
                arrays["pause"][0] = 0
            print(f"step {progress['global_step']:,}: checkpoint written to {checkpoint_file}", flush=True)

        while global_step < args.total_timesteps:
            check_stop()
            supervise(global_step)
            if prefetcher.error is not None:
                raise prefetcher.error
            for episode_queue in episode_queues:
                while True:
                    try:
                        actor_id, episodic_return, episodic_length = episode_queue.get_nowait()
                    except queue.Empty:
                        break
                    recent_returns.append(episodic_return)
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", episodic_length, global_step)

            global_step = int(actor_steps.sum())
            # ALGO LOGIC: train while the replay ratio allows, else let the actors catch up
            learn_from = progress["learn_from"]
            trained = (updates - progress["updates_base"]) * trained_per_update  # since learning (re)started
            # the rate limit: the actors wait while the learner is below --min-replay-ratio (it can
            # train then: it is below --replay-ratio and the replay holds sequences)
            arrays["learner_behind"][0] = int(args.min_replay_ratio > 0 and global_step >= learn_from
                                              and trained < args.min_replay_ratio * (global_step - learn_from)
                                              and replay.num_valid_sequences > 0)
            if global_step >= learn_from and trained <= args.replay_ratio * (global_step - learn_from):
                t0 = time.time()
                while True:
                    try:
                        batch = prefetcher.batches.get(timeout=0.1)
                        break
                    except queue.Empty:  # keep answering a stop request while waiting
                        check_stop()
                        supervise(global_step)
                        if prefetcher.error is not None:
                            raise prefetcher.error from None
                sample_wait += time.time() - t0
                dropped_windows += int((batch.sequence_ids < 0).sum())
                loss, priorities, stats = r2d2_loss(
                    q_network, target_network, batch_to_torch(batch, device, frame_stack), args.burn_in_length,
                    args.sequence_length, args.gamma, args.n_step, args.value_rescaling_epsilon, args.priority_eta,
                )
                optimizer.zero_grad()
                loss.backward()
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm))
                optimizer.step()
                prefetcher.priority_updates.put((batch.indices, batch.sequence_ids, priorities))
                updates += 1
                if updates % args.target_network_update_period == 0:
                    target_network.load_state_dict(q_network.state_dict())
            else:
                time.sleep(0.005)
            publish_weights(updates)
            collect_evaluation(updates)

            now = time.time()
            if now - last_log_time >= args.log_interval:
                dt = now - last_log_time
                steps = actor_steps.copy()
                global_step = int(steps.sum())
                added = replay.num_sequences_added
                writer.add_scalar("charts/SPS", (steps - last["steps"]).sum() / dt, global_step)
                for actor_id in range(args.num_actors):
                    writer.add_scalar(f"actors/SPS_actor_{actor_id}", (steps[actor_id] - last["steps"][actor_id]) / dt,
                                      global_step)
                writer.add_scalar("charts/updates_per_second", (updates - last["updates"]) / dt, global_step)
                writer.add_scalar("charts/learner_updates", updates, global_step)
                writer.add_scalar("charts/actor_restarts", supervision["restarts"], global_step)
                writer.add_scalar("replay/size", replay.size, global_step)
                writer.add_scalar("replay/sequences_added_per_second", (added - last["added"]) / dt, global_step)
                writer.add_scalar("replay/sequences_sampled_per_second",
                                  (updates - last["updates"]) * args.batch_size / dt, global_step)
                writer.add_scalar("replay/replay_ratio", updates * trained_per_update / max(global_step, 1),
                                  global_step)
                writer.add_scalar("replay/max_priority", replay.max_priority, global_step)
                writer.add_scalar("replay/dropped_windows", dropped_windows, global_step)
                lag = updates - arrays["actor_weights_version"][: args.num_actors]
                writer.add_scalar("charts/parameter_lag", float(lag.mean()), global_step)
                writer.add_scalar("charts/sample_wait_seconds", sample_wait, global_step)
                if stats:
                    writer.add_scalar("losses/td_loss", stats["td_loss"], global_step)
                    writer.add_scalar("losses/q_values", stats["q_values"], global_step)
                    writer.add_scalar("losses/grad_norm", stats["grad_norm"], global_step)
                mean_return = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step:,}: SPS {(steps - last['steps']).sum() / dt:.0f}, updates {updates:,} "
                      f"({(updates - last['updates']) / dt:.1f}/s), return {mean_return:.1f}, "
                      f"replay {replay.size:,}, lag {lag.mean():.0f}, sample wait {sample_wait:.1f}s", flush=True)
                last.update(steps=steps, updates=updates, added=added)
                last_log_time, sample_wait, dropped_windows = now, 0.0, 0

            next_eval = progress["next_eval"]
            if evaluator is not None and next_eval is not None and global_step >= next_eval and not evaluation:
                request_evaluation(global_step, updates)  # one at a time: a due one waits for the last
                while progress["next_eval"] <= global_step:
                    progress["next_eval"] += args.eval_interval

            if args.checkpoint_interval > 0 and global_step >= progress["next_checkpoint"]:
                while progress["next_checkpoint"] <= global_step:
                    progress["next_checkpoint"] += args.checkpoint_interval
                write_checkpoint()

        wait_for_evaluation(updates)
        writer.add_scalar("charts/learner_updates", updates, global_step)  # the final count, always
        if args.save_model:  # the final evaluation is that of the saved model, as evaluate.py does it
            save_and_evaluate_model(run_name, q_network, args, observation_space, n_actions, writer, global_step,
                                    start_time, device)
        elif evaluator is not None and progress["evaluated_at"] != updates:  # final weights not evaluated yet
            request_evaluation(global_step, updates)
            wait_for_evaluation(updates)
    except StopRun as e:
        print(f"r2d2_mp.py: stopping: {e}", file=sys.stderr, flush=True)
        interrupted = str(e).startswith("interrupted") or str(e) == "SIGTERM"
        exit_code = (130 if str(e).startswith("interrupted") else 143) if interrupted else 1
        if interrupted and args.checkpoint_interval > 0 and writer is not None:
            try:
                write_checkpoint(final=True)
                print(f"resume with --resume {os.path.dirname(checkpoint_file)}", file=sys.stderr, flush=True)
            except (StopRun, OSError, RuntimeError) as checkpoint_error:
                print(f"r2d2_mp.py: no final checkpoint: {checkpoint_error}", file=sys.stderr, flush=True)
    finally:
        stop_event.set()
        if prefetcher is not None:
            prefetcher.stop.set()
            prefetcher.join(timeout=5)
        children = actors + ([evaluator] if evaluator is not None else [])
        eval_requests.put(None)  # the evaluator ends now, or after the evaluation in progress (killed after 5 s)
        deadline = time.time() + 5
        for p in children:
            p.join(timeout=max(0.0, deadline - time.time()))
        for p in children:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for q in (*episode_queues, error_queue, eval_requests, eval_results):
            q.cancel_join_thread()
            q.close()
        if writer is not None:
            writer.close()
        arrays.close()
        arrays.unlink()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return exit_code


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main(tyro.cli(Args)))
    except KeyboardInterrupt:  # before any process or shared memory exists
        print("r2d2_mp.py: interrupted", file=sys.stderr)
        sys.exit(130)
