"""R2D2 on one machine: actor processes feed one learner through shared memory.

    python r2d2_algo/r2d2_mp.py --env-id PongNoFrameskip-v4

Processes and the shared memory between them (all created by the learner, see create_shared_memory):

    actor 0 ─┐  envs + CPU copy of the network; writes steps straight into the replay's
    actor 1 ─┼─► shared arrays (obs, action, reward, flags, stored state, write counts)
      ...    │   and reads the weights the learner publishes (every --actor-update-interval)
    actor N ─┘
                 learner (main process, GPU when available)
                   prefetch thread: syncs the replay index with the actors' write counts,
                                    samples prioritized windows, applies priority updates
                   main thread:     burn-in, n-step double-Q loss, Adam, target copies,
                                    publishes weights with a version number, logs

The loss and its maths are r2d2.py's (``r2d2_loss``); replay and network are storage.py's and
model.py's. Defaults are the paper's Atari values (R2D2_SPEC.md, Table 2) except the replay
capacity, scaled to a workstation. A run that stops for any reason (end, Ctrl-C, SIGTERM, an
exception in the learner, an actor that dies) stops its actors within seconds and unlinks
its shared memory; a dead actor is reported by name with its traceback and the run stops.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the heavy imports below load: nothing to clean, leave quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

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
    num_envs_per_actor: int = 64
    """environments per actor, acted on with batched forward passes (one per env split; 64 = 2 × 32:
    the forward pass is bound by reading the weights, so larger batches cost little more per call)"""
    env_splits: int = 2
    """Atari: each actor's envs step in this many batches, one stepping in ale-py's C++ threads while
    the network acts on another (double buffering); other envs always use 1"""
    env_threads: int = 0
    """Atari: C++ threads per actor stepping its envs (ale-py AtariVectorEnv); 0: the cores shared among the actors"""
    actor_update_interval: int = 400
    """environment steps (per env) between an actor's weight refreshes (paper: 400)"""
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
    replay_ratio: float = 1.0
    """most trained observations sampled per observation added (B·m per update ÷ env steps); the learner waits above it"""
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
def replay_arguments(args: Args, observation_space, state_size: int, frame_stack: int) -> dict:
    """Constructor arguments of the shared replay, the same in the learner and every actor."""
    return dict(
        num_streams=args.num_actors * args.num_envs_per_actor, capacity=args.buffer_size,
        obs_shape=observation_space.shape, obs_dtype=observation_space.dtype, state_size=state_size,
        burn_in_length=args.burn_in_length, sequence_length=args.sequence_length, n_step=args.n_step,
        overlap=args.overlap, priority_exponent=args.priority_exponent,
        importance_sampling_exponent=args.importance_sampling_exponent, frame_stack=frame_stack,
        # a window leaves the sampling index this many steps before it can be overwritten, so
        # the prefetch thread does not copy a window an actor is writing (storage.py re-checks)
        overwrite_margin=2 * args.sequence_length,
    )


def create_shared_memory(arrays: SharedArrays, replay_kwargs: dict, num_params: int, num_actors: int):
    """Every segment of a run (learner side). Returns the learner's indexed replay.

    replay:   obs, action, reward, first, terminated, truncated (per env stream and step),
              stored_state, start_prev_action, start_prev_reward (per sequence), write_count
    weights:  the learner's parameters as one float32 vector, and weights_version (its update count)
    counters: actor_steps (env steps per actor), actor_weights_version (version each actor acts with)
    checkpoints: pause (the learner asks the actors to wait), actor_paused (each actor waits)
    rate limit: learner_behind (the learner is below --min-replay-ratio: the actors wait)
    """
    replay = SequenceReplayBuffer(**replay_kwargs, index=True, allocate=arrays.allocate)
    arrays.allocate("weights", (num_params,), np.float32)
    arrays.allocate("weights_version", (1,), np.int64)
    arrays.allocate("actor_steps", (num_actors,), np.int64)
    arrays.allocate("actor_weights_version", (num_actors,), np.int64)
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
    actor_id · num_envs_per_actor + j. While the learner's ``pause`` flag is set (a checkpoint
    is being written), or once all actors together have taken ``total_timesteps`` steps, the
    actor waits between steps. ``seed_offset`` (the resumed step count)
    gives a resumed run new episodes."""
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

        def refresh_weights() -> None:
            arrays["actor_weights_version"][actor_id] = load_published_weights(net, weights, version, weights_lock)

        refresh_weights()
        actor = EnvActor(envs, net, replay, epsilons, rng, seed, streams=streams)
        refreshed_at = 0  # env steps per env at the last refresh
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
            if actor.env_steps // E - refreshed_at >= args.actor_update_interval:
                refreshed_at = actor.env_steps // E
                if version[0] != arrays["actor_weights_version"][actor_id]:
                    refresh_weights()
    except Exception:
        error_queue.put((f"actor-{actor_id}", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if envs is not None:
            envs.close()
        arrays.close()


# LEARNER: prefetch thread
class Prefetcher(threading.Thread):
    """Owns the replay's sampling index: syncs it with the actors' write counts, samples the
    next batches ahead of the learner (queue of ``depth``), applies priority updates."""

    def __init__(self, replay: SequenceReplayBuffer, batch_size: int, seed: int, depth: int = 2):
        super().__init__(name="prefetch", daemon=True)
        self.replay, self.batch_size = replay, batch_size
        self.rng = np.random.default_rng(seed)
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
    r2d2_check_args(args, positive=("total_timesteps", "num_actors", "num_envs_per_actor", "env_splits",
                                    "actor_update_interval", "hidden_size", "torso_size", "head_hidden_size", "buffer_size",
                                    "sequence_length", "batch_size", "n_step", "target_network_update_period"))
    if args.log_interval <= 0:
        raise ValueError(f"--log-interval must be > 0, got {args.log_interval}")
    if args.env_threads < 0:
        raise ValueError(f"--env-threads must be >= 0, got {args.env_threads}")
    if not 0.0 <= args.min_replay_ratio <= args.replay_ratio:
        raise ValueError(f"--min-replay-ratio must be in [0, --replay-ratio={args.replay_ratio}], "
                         f"got {args.min_replay_ratio}")


# arguments a resumed run may change on its command line; every other one comes from the checkpoint
RESUMABLE_ARGS = ("total_timesteps", "checkpoint_interval", "checkpoint_replay", "save_model", "cuda", "eval_interval",
                  "eval_episodes", "eval_epsilon", "log_interval", "actor_update_interval", "env_threads")


def main(args: Args, argv: list[str] | None = None) -> int:
    try:
        args, checkpoint = resume_run(args, sys.argv[1:] if argv is None else argv, RESUMABLE_ARGS)
        check_args(args)
        observation_space, n_actions = check_env_id(args.env_id)
        frame_stack = frame_stack_of(args.env_id)
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
    episode_queue, error_queue = ctx.Queue(), ctx.Queue()
    actors: list = []
    prefetcher = None
    writer = None

    # Ctrl-C and SIGTERM only record the request; the main loop stops at its next check. An
    # exception raised asynchronously inside library code (tensorboard's writer, a queue) can
    # leave it blocked forever in the clean-up.
    stop_request: list[str] = []

    def request_stop(signum, frame):
        stop_request.append("interrupted (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM")

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    actors_checked_at = [0.0]

    def check_stop() -> None:
        """Raise StopRun on a stop request or a dead actor (reported with its traceback)."""
        if stop_request:
            raise StopRun(stop_request[0])
        if time.monotonic() - actors_checked_at[0] < 0.2:
            return
        actors_checked_at[0] = time.monotonic()
        for p in actors:
            if p.exitcode is not None:
                try:
                    name, trace = error_queue.get(timeout=2.0)
                except queue.Empty:
                    name, trace = p.name, f"exit code {p.exitcode} (no traceback: killed by a signal?)"
                raise StopRun(f"{name} died:\n{trace}")

    # A CPU update on Atari takes tens of seconds (a few big ops), so the stop check also runs
    # at every module call and every parameter gradient: a stop waits for one op, not one update.
    # Raised before optimizer.step, it leaves the weights as the last finished update left them.
    for network in (q_network, target_network):
        for module in network.modules():
            module.register_forward_pre_hook(lambda *_: check_stop())
    for parameter in q_network.parameters():
        parameter.register_hook(lambda grad: check_stop())
    exit_code = 0
    try:
        replay = create_shared_memory(arrays, replay_kwargs, num_params, args.num_actors)
        weights, version = arrays["weights"], arrays["weights_version"]

        def publish_weights(updates: int) -> None:
            publish(q_network, weights, version, weights_lock, updates)

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
        publish_weights(progress["updates"])
        print(f"run {run_name}: {parameter_count(q_network):,} parameters, learner on {device}, "
              f"{args.num_actors} actors × {args.num_envs_per_actor} envs, replay {args.buffer_size:,} observations "
              f"= {replay_bytes / 2**30:.2f} GiB in shared memory", flush=True)
        # Ctrl-C in a terminal, or a SIGTERM to the group, reaches every process, and only the
        # learner must act on it (it pauses the actors for a last checkpoint, then stops them). The
        # actors start with SIGINT and SIGTERM blocked (the mask is inherited through exec, before
        # Python even loads) and ignore them from their first line. Blocked, not ignored, here too:
        # a stop that arrives while the actors start (about a second) waits for the learner
        # instead of being lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for actor_id in range(args.num_actors):
                p = ctx.Process(target=actor_process, name=f"actor-{actor_id}", daemon=True,
                                args=(actor_id, args, arrays.layout, replay_kwargs, weights_lock, stop_event,
                                      episode_queue, error_queue, observation_space, n_actions, os.getpid(),
                                      progress["global_step"]))
                p.start()
                actors.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

        # a resumed run continues its tensorboard folder; events logged after the checkpoint are purged
        writer = SummaryWriter(f"runs/{run_name}", purge_step=progress["global_step"] + 1 if progress["global_step"]
                               else None)
        if progress["global_step"] == 0:
            writer.add_text("hyperparameters",
                            "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        prefetcher = Prefetcher(replay, args.batch_size, args.seed)
        prefetcher.rng = learner_rng
        prefetcher.start()

        actor_steps = arrays["actor_steps"][: args.num_actors]
        start_time = time.time() - progress["elapsed"]
        last_log_time = time.time()
        last = {"steps": actor_steps.copy(), "updates": progress["updates"], "added": 0}
        updates, sample_wait, recent_returns = progress["updates"], 0.0, deque(maxlen=20)
        trained_per_update = args.batch_size * args.sequence_length
        global_step = progress["global_step"]
        stats = {}

        def write_checkpoint() -> None:
            """Pause the actors between steps and the prefetch thread, then save the run."""
            arrays["pause"][0] = 1
            try:
                deadline = time.time() + 120
                while not arrays["actor_paused"][: args.num_actors].all():
                    if any(p.exitcode is not None for p in actors) or time.time() > deadline:
                        raise StopRun("an actor died or did not pause for the checkpoint")
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
            check_stop()  # a stop request or a dead actor stops the run
            if prefetcher.error is not None:
                raise prefetcher.error
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
                        if prefetcher.error is not None:
                            raise prefetcher.error from None
                sample_wait += time.time() - t0
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
                publish_weights(updates)
            else:
                time.sleep(0.005)

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
                writer.add_scalar("replay/size", replay.size, global_step)
                writer.add_scalar("replay/sequences_added_per_second", (added - last["added"]) / dt, global_step)
                writer.add_scalar("replay/sequences_sampled_per_second",
                                  (updates - last["updates"]) * args.batch_size / dt, global_step)
                writer.add_scalar("replay/replay_ratio", updates * trained_per_update / max(global_step, 1),
                                  global_step)
                writer.add_scalar("replay/max_priority", replay.max_priority, global_step)
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
                last_log_time, sample_wait = now, 0.0

            next_eval = progress["next_eval"]
            if next_eval is not None and global_step >= next_eval and args.eval_episodes > 0:
                log_evaluation(writer, q_network, args, device, global_step, start_time)
                progress["evaluated_at"] = updates
                while progress["next_eval"] <= global_step:
                    progress["next_eval"] += args.eval_interval

            if args.checkpoint_interval > 0 and global_step >= progress["next_checkpoint"]:
                while progress["next_checkpoint"] <= global_step:
                    progress["next_checkpoint"] += args.checkpoint_interval
                write_checkpoint()

        writer.add_scalar("charts/learner_updates", updates, global_step)  # the final count, always
        if args.save_model:  # the final evaluation is that of the saved model, as evaluate.py does it
            save_and_evaluate_model(run_name, q_network, args, observation_space, n_actions, writer, global_step,
                                    start_time, device)
        elif args.eval_episodes > 0 and progress["evaluated_at"] != updates:  # final weights not evaluated yet
            log_evaluation(writer, q_network, args, device, global_step, start_time)
    except StopRun as e:
        print(f"r2d2_mp.py: stopping: {e}", file=sys.stderr, flush=True)
        interrupted = str(e).startswith("interrupted") or str(e) == "SIGTERM"
        exit_code = (130 if str(e).startswith("interrupted") else 143) if interrupted else 1
        if interrupted and args.checkpoint_interval > 0 and writer is not None:
            try:
                write_checkpoint()
                print(f"resume with --resume {os.path.dirname(checkpoint_file)}", file=sys.stderr, flush=True)
            except (StopRun, OSError, RuntimeError) as checkpoint_error:
                print(f"r2d2_mp.py: no final checkpoint: {checkpoint_error}", file=sys.stderr, flush=True)
    finally:
        stop_event.set()
        if prefetcher is not None:
            prefetcher.stop.set()
            prefetcher.join(timeout=5)
        deadline = time.time() + 5
        for p in actors:
            p.join(timeout=max(0.0, deadline - time.time()))
        for p in actors:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for q in (episode_queue, error_queue):
            q.cancel_join_thread()
            q.close()
        if writer is not None:
            writer.close()
        arrays.close()
        arrays.unlink()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return exit_code


@torch.no_grad()
def log_evaluation(writer, q_network, args: Args, device, global_step: int, start_time: float) -> None:
    """Evaluation episodes with the learner's current weights, logged as eval/episodic_return."""
    returns, _ = evaluate(q_network, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device,
                          args.eval_epsilon)
    write_evaluation(writer, returns, global_step, time.time() - start_time)
    print(f"step {global_step:,}: eval return {returns.mean():.1f} ± {returns.std():.1f} "
          f"({time.time() - start_time:.0f}s)", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main(tyro.cli(Args)))
    except KeyboardInterrupt:  # before any process or shared memory exists
        print("r2d2_mp.py: interrupted", file=sys.stderr)
        sys.exit(130)
