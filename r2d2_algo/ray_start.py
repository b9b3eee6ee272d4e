"""Starting Ray for r2d2_ray.py: the run's Ray, and each Ray actor's own start.

- ``check_ray_args``: the form of --ray-address and --ray-plasma-directory.
- ``ray_session``: joins ``--ray-address``, or starts an embedded Ray on loopback (127.0.0.2: Ray
  replaces 127.0.0.1 by the machine's address) with its files in a temporary folder, and on exit
  shuts it down and removes the folder, however the run ends. While it runs, processes.py's
  reaper (a process in a session of its own) does the same if the driver is SIGKILLed.
- ``object_store_bytes``: the most a run keeps in Ray's object store at once; ``check_resources``
  gives the embedded store twice that (at least 256 MiB) and checks, before Ray starts, that the
  run fits the machine's memory and /dev/shm.
- ``incarnation`` and ``restarted``: what a Ray actor knows of its own start. The incarnation
  (node IP, process and start time) is new each time Ray (re)creates the Ray actor, so the
  supervisor tells a role Ray rebuilt after a lost node from the old one; ``restarted`` says
  whether Ray re-created this one after it died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import ray

from r2d2_algo import processes
from r2d2_algo.checks import network_bytes
from r2d2_algo.limits import (
    PROCESS_BYTES,
    Limits,
    batch_bytes,
    check_memory,
    check_shared_memory,
    read_limits,
    size,
)
from r2d2_algo.model import RNNQNetwork, parameter_count
from r2d2_algo.storage import SequenceReplayBuffer, window_length

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_ray_args(args) -> None:
    """ValueError (one line) for a --ray-address that is not HOST:PORT or auto, or a
    --ray-plasma-directory with it."""
    if args.ray_address and args.ray_plasma_directory:
        raise ValueError("--ray-plasma-directory is for the embedded Ray; a cluster's nodes set theirs "
                         "(ray start --plasma-directory)")
    if args.ray_address and args.ray_address != "auto":
        host, _, port = args.ray_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--ray-address: expected HOST:PORT or auto, got {args.ray_address!r}")


@contextlib.contextmanager
def ray_session(args, object_store_memory: int, num_cpus: int):
    """Ray for the run, within the block: joins ``args.ray_address``, or starts a local Ray on
    loopback with ``num_cpus`` CPUs (at least one per actor: ``args.num_actors``) and an object
    store of ``object_store_memory`` bytes in /dev/shm (or ``args.ray_plasma_directory``); Ray's
    workers import this clone's r2d2_algo. On exit: Ray shut down, the embedded Ray's folder
    removed, its reaper told so.

    Raises:
        SystemExit: one line, if Ray cannot be started or reached (the block does not run).
    """
    temp_dir, reaper = None, None
    try:
        temp_dir = start_ray(args, object_store_memory, num_cpus)
        if temp_dir is not None:  # removes Ray's processes and folder if this process dies first (SIGKILL)
            reaper = subprocess.Popen([sys.executable, processes.__file__, temp_dir,
                                       *processes.descendants(os.getpid())], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if reaper is not None:
            reaper.communicate(b"done", timeout=10)


def start_ray(args, object_store_memory: int, num_cpus: int) -> str | None:
    """``ray.init`` for ``ray_session``. Returns the embedded Ray's folder (None when joining)."""
    try:
        if args.ray_address:
            if args.ray_address != "auto":  # Ray itself retries an unreachable address for minutes
                host, _, port = args.ray_address.rpartition(":")  # its form was checked by check_ray_args
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


def object_store_bytes(args, observation_space, state_size: int, frame_stack: int, num_parameters: int) -> int:
    """Most bytes the run keeps in Ray's object store at once: 2 pushes in flight per actor
    (--actor-push-interval actor steps of its envs), --samples-in-flight batches, and 2 published
    param versions (float32). Observations count one frame (the shards store single frames)."""
    frame_bytes = int(np.prod(observation_space.shape)) // frame_stack * np.dtype(observation_space.dtype).itemsize
    step_bytes = frame_bytes + 4 * state_size + 16  # observation, stored state, action, reward, flags
    pushes = 2 * args.num_actors * args.actor_push_interval * args.num_envs_per_actor * step_bytes
    window = window_length(args.burn_in_length, args.sequence_length, args.n_step) + frame_stack - 1
    samples = args.samples_in_flight * args.batch_size * (window * (frame_bytes + 16) + 4 * state_size + 16)
    return pushes + samples + 2 * 4 * num_parameters


def check_resources(args, observation_space, network: RNNQNetwork, frame_stack: int,
                    replay_kwargs: list[dict]) -> tuple[int, int, Limits]:
    """(the bytes the run keeps in Ray's object store, the embedded store's size: twice that, at
    least 256 MiB, the machine's limits). ``replay_kwargs``: each shard's SequenceReplayBuffer
    arguments (ray_replay.shard_arguments).

    Raises:
        ValueError: one line, if the run does not fit the memory or /dev/shm of the embedded Ray, or
            --ray-plasma-directory is not a writable folder (a cluster's nodes are their own).
    """
    replay_bytes = sum(SequenceReplayBuffer.shared_nbytes(**kwargs) for kwargs in replay_kwargs)
    in_flight = object_store_bytes(args, observation_space, network.state_size, frame_stack, parameter_count(network))
    store_size, limits = max(2 * in_flight, 256 * 2**20), read_limits()
    if args.ray_address:
        return in_flight, store_size, limits
    window = window_length(args.burn_in_length, args.sequence_length, args.n_step)
    roles = args.num_actors + args.num_replay_shards + 2
    others = {"Ray's object store": store_size,
              f"{args.samples_in_flight + 1} learner batches": (args.samples_in_flight + 1) * batch_bytes(
                  args.batch_size, window, observation_space.shape, observation_space.dtype),
              "networks and Adam": network_bytes(args.hidden_size, args.torso_size, args.head_hidden_size,
                                                 args.rnn_type),
              f"{roles} processes (actors, shards, evaluator, param store) × {PROCESS_BYTES // 2**20} MiB":
                  roles * PROCESS_BYTES}
    fit = max(0, int(0.9 * args.buffer_size * (limits.memory_bytes - sum(others.values())) / replay_bytes))
    check_memory({"replay shards": replay_bytes, **others}, limits,
                 f"lower --buffer-size (about {fit:,} fit), --batch-size or --num-actors")
    if args.ray_plasma_directory is None:
        check_shared_memory(store_size, f"Ray's object store (twice the {size(in_flight)} the run keeps "
                            f"in it, at least 256 MiB)", "or put the store on disk with "
                            "--ray-plasma-directory /tmp (slower)", limits)
    elif not os.path.isdir(args.ray_plasma_directory) or not os.access(args.ray_plasma_directory, os.W_OK):
        raise ValueError(f"--ray-plasma-directory {args.ray_plasma_directory!r} is not a writable folder")
    return in_flight, store_size, limits


def incarnation() -> tuple[str, str]:
    """(node IP, incarnation) of the calling Ray actor; the incarnation is new each time Ray
    (re)creates the Ray actor."""
    return ray.util.get_node_ip_address(), f"{os.getpid()}-{time.time_ns()}"


def restarted() -> bool:
    """Whether Ray re-created the calling Ray actor (after it died, or with its lost node)."""
    with warnings.catch_warnings():  # Ray warns about its own use of a deprecated API inside
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
