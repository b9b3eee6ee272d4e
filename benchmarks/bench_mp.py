"""Throughput of the multi-process R2D2 on this machine, all measured in one run.

    python benchmarks/bench_mp.py [--env-id PongNoFrameskip-v4] [--seconds 20]

1. raw env SPS: P processes each stepping E envs (r2d2_algo.envs.make_vector_env: ale-py's
   AtariVectorEnv for Atari, gymnasium SyncVectorEnv otherwise) with random actions, summed;
2. actor SPS: the same processes running the actors' own code (r2d2.EnvActor: batched forward
   pass of a CPU copy of the network, ε-greedy, every step written to a replay), learner idle,
   with --env-splits batches (double buffering) and with 1;
3. batched policy forward rate: observations/s of the CPU network alone at batch E and at the
   batch of one env split (E / splits), one thread per process, P processes; ratios use the faster;
4. system SPS while learning: r2d2_mp.py with the same actors and a learner, read from its log;
5. replay insert (steps/s) and sample (64-sequence Atari batches/s, with stack rebuilding);
6. scaling tables: SPS vs actors at a fixed total number of envs ("fixed batch size") and vs
   actors at fixed envs per actor ("fixed envs per worker").

Every rate is also given per CPU-second (the CPU time of the process and all its threads).
Ratios (actor SPS ÷ min(raw env SPS, forward rate), system ÷ actor) are measured in the same
run on the same cores; the main measurements are repeated in interleaved rounds (--repeats) and
the actor ratio is the median of the rounds' ratios. Prints tables and writes JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import tyro

from r2d2_algo.devices import set_float32_precision
from r2d2_algo.envs import check_env_id, default_env_threads, frame_stack_of, make_vector_env
from r2d2_algo.limits import usable_cpus
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.r2d2_mp import Args as R2D2Args
from r2d2_algo.r2d2_mp import (MAX_ENVS_PER_ACTOR, EnvActor, InferenceClient, Prefetcher, batch_to_torch,
                               create_inference_memory, create_shared_memory, inference_server, make_learner, publish,
                               replay_arguments, update)
from r2d2_algo.shared import SharedArrays
from r2d2_algo.stopping import StopRequest
from r2d2_algo.storage import SequenceReplayBuffer, stack_frames

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    env_id: str = "PongNoFrameskip-v4"
    """environment to measure"""
    seconds: float = 10.0
    """measuring time per cell (after warm-up)"""
    repeats: int = 3
    """rounds of the main measurements (raw, forward, actor, actor with 1 split), interleaved so a
    slow spell of the machine hits every kind; medians are reported, ratios are taken per round"""
    processes: int = field(default_factory=lambda: max(1, usable_cpus()[0] - 1))
    """actor processes for the main measurements (default: usable CPUs − 1, as r2d2_mp.py)"""
    envs_per_process: int = MAX_ENVS_PER_ACTOR
    """envs per actor process for the main measurements (r2d2_mp.py's default)"""
    env_splits: int = 2
    """Atari: the actors' env batches (r2d2_mp.py --env-splits); 1 = env and network take turns"""
    env_threads: int = 0
    """Atari: ale-py C++ threads per process (r2d2_mp.py --env-threads; 0: its default, cores ÷ processes)"""
    scaling_processes: list[int] = field(default_factory=lambda: [1, 2])
    """actor counts of the scaling tables"""
    scaling_total_envs: int = 128
    """total envs of the fixed-batch-size table"""
    scaling_envs_per_process: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    """envs per process of the envs-per-actor table (at --processes processes)"""
    learner: bool = True
    """measure the learner's updates/s at the paper's batch, with the sampling pipeline and on a pre-loaded batch"""
    learner_updates: int = 3
    """updates timed in each learner measurement (after one warm-up update)"""
    system: bool = True
    """also measure the whole system while learning (runs r2d2_mp.py)"""
    out: str = "benchmarks/results/bench_mp.json"
    """where to write the JSON results"""


def _worker(kind: str, env_id: str, num_envs: int, num_splits: int, env_threads: int, num_processes: int,
            seconds: float, seed: int, result_queue, central: tuple | None = None) -> None:
    """kind: raw (random actions), forward (the network alone), actor (r2d2_mp.EnvActor; with
    ``central`` = (layout, requests semaphore, response semaphore, stop event), its forward passes
    run in the central inference process)."""
    torch.set_num_threads(1)
    observation_space, n_actions = check_env_id(env_id)
    splits = num_splits if kind == "actor" else 1
    envs = make_vector_env(env_id, num_envs, seed, num_splits=splits, num_threads=env_threads or
                           default_env_threads(num_processes),
                           thread_niceness=10 if splits > 1 else 0)  # as r2d2_mp.py's actors
    net = RNNQNetwork(observation_space, n_actions)
    replay = SequenceReplayBuffer(num_envs, num_envs * 2000, observation_space.shape, observation_space.dtype,
                                  net.state_size, 40, 80, 5, 40, frame_stack=frame_stack_of(env_id))
    rng = np.random.default_rng(seed)
    arrays = None
    if kind == "actor":  # the actors' code itself (r2d2_mp.EnvActor), ε = 0.01
        client = None
        if central is not None:
            layout, requests, response_ready, stop_event = central
            arrays = SharedArrays.attach(layout)
            client = InferenceClient(arrays, seed, num_envs, requests, response_ready, stop_event, os.getppid())
        actor = EnvActor(envs, net, replay, np.full(num_envs, 0.01), rng, seed, inference=client)
    else:
        obs, _ = envs.reset(seed=seed)
        state = net.initial_state(num_envs)
        prev_action = torch.full((1, num_envs), -1)
        prev_reward = torch.zeros(1, num_envs)
        first = torch.zeros(1, num_envs, dtype=torch.bool)
    steps, t0, cpu0, deadline = 0, None, None, None
    warmup = 2.0
    start = time.time()
    while True:
        now = time.time()
        if t0 is None and now - start > warmup:
            t0, cpu0, steps = now, time.process_time(), 0
            deadline = t0 + seconds
        if deadline is not None and now >= deadline:
            break
        if kind == "forward":
            with torch.no_grad():
                net(torch.as_tensor(obs).unsqueeze(0), prev_action, prev_reward, first, state)
            steps += num_envs
        elif kind == "actor":
            actor.step()
            steps += num_envs // splits
        else:
            envs.step(rng.integers(0, n_actions, num_envs))
            steps += num_envs
    # process_time counts every thread of the process (ale-py's C++ threads included)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    result_queue.put((steps / wall, steps / cpu, steps, cpu, t0, t0 + wall))
    envs.close()
    if arrays is not None:
        del actor, client
        arrays.close()


def parallel_rate(kind: str, env_id: str, processes: int, envs_per_process: int, seconds: float,
                  num_splits: int = 1, env_threads: int = 0, central: bool = False,
                  inference_device: str = "cpu") -> dict:
    """Summed steps/s (observations/s for 'forward') of `processes` workers, and steps per CPU-second.
    ``central``: actors served by one central inference process (r2d2_mp.inference_server on
    ``inference_device``, paper-size network); its CPU time over the measured window counts too."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = arrays = None
    channels = [None] * processes
    if central:
        observation_space, n_actions = check_env_id(env_id)
        frame_stack = frame_stack_of(env_id)
        args = R2D2Args(env_id=env_id, num_actors=processes, num_envs_per_actor=envs_per_process,
                        env_splits=num_splits, buffer_size=processes * envs_per_process * 2000, inference="central")
        net = RNNQNetwork(observation_space, n_actions)
        arrays = SharedArrays()
        create_shared_memory(arrays, replay_arguments(args, observation_space, net.state_size, frame_stack),
                             sum(p.numel() for p in net.parameters()), processes)
        create_inference_memory(arrays, processes, envs_per_process // num_splits, observation_space, net.state_size)
        lock, stop_event, errors = ctx.Lock(), ctx.Event(), ctx.Queue()
        requests, responses = ctx.Semaphore(0), [ctx.Semaphore(0) for _ in range(processes)]
        publish(net, arrays["weights"], arrays["weights_version"], lock, 0)
        server = ctx.Process(target=inference_server, args=(args, arrays.layout, lock, requests, responses, stop_event,
                                                             errors, observation_space, n_actions, os.getpid(),
                                                             inference_device))
        server.start()
        channels = [(arrays.layout, requests, responses[i], stop_event) for i in range(processes)]
    workers = [ctx.Process(target=_worker, args=(kind, env_id, envs_per_process, num_splits, env_threads, processes,
                                                   seconds, i, q, channels[i])) for i in range(processes)]
    for w in workers:
        w.start()
    server_cpu = []  # (time, CPU seconds) of the inference process, sampled until the workers report
    try:
        return _collect(kind, workers, processes, q, seconds, server, server_cpu)
    finally:
        if server is not None:
            stop_event.set()
            server.join(timeout=10)
            if server.is_alive():
                server.kill()
            arrays.close()
            arrays.unlink()


def _process_cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system  # all threads


def _collect(kind, workers, processes, q, seconds, server, server_cpu) -> dict:
    rates, deadline = [], time.time() + seconds + 300
    while len(rates) < processes:
        if server is not None:
            server_cpu.append((time.time(), _process_cpu_seconds(server.pid)))
        try:
            rates.append(q.get(timeout=0.5))
        except queue.Empty:
            if time.time() > deadline or any(w.exitcode not in (None, 0) for w in workers):
                for w in workers:
                    w.kill()
                raise SystemExit(f"bench_mp.py: error: a {kind} worker died or hung (exit codes "
                                 f"{[w.exitcode for w in workers]})") from None
    if server is not None:
        server_cpu.append((time.time(), _process_cpu_seconds(server.pid)))
    for w in workers:
        w.join()
    if server is None:
        return {"per_second": float(sum(r[0] for r in rates)),
                "per_cpu_second": float(np.mean([r[1] for r in rates]))}
    # central: every step over the CPU time of the actors and of the inference process in the window
    t0, t1 = min(r[4] for r in rates), max(r[5] for r in rates)
    times, cpus = np.array([t for t, _ in server_cpu]), np.array([c for _, c in server_cpu])
    inference_cpu = float(np.interp(t1, times, cpus) - np.interp(t0, times, cpus))
    return {"per_second": float(sum(r[0] for r in rates)),
            "per_cpu_second": float(sum(r[2] for r in rates) / (sum(r[3] for r in rates) + inference_cpu)),
            "inference_cpu_share": inference_cpu / (sum(r[3] for r in rates) + inference_cpu)}


def system_sps(env_id: str, processes: int, envs_per_process: int, seconds: float, env_splits: int,
               inference: str = "local", extra: tuple[str, ...] = (), on_line=None) -> dict:
    """Run r2d2_mp.py for `seconds` past learning start and parse its last SPS log lines.
    ``extra``: more flags (later ones override the ones here); ``on_line(pid)`` runs after each
    line of its output (gpu_check.py samples the GPU memory of its processes there)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "r2d2_algo" / "r2d2_mp.py"), "--env-id", env_id, "--num-actors",
               str(processes), "--num-envs-per-actor", str(envs_per_process), "--env-splits", str(env_splits),
               "--inference", inference,
               "--total-timesteps", "100000000",
               "--learning-starts", "2000", "--buffer-size", "100000", "--log-interval", "5000", "--eval-episodes", "0",
               *extra]
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, start = [], time.time()
        learning_since = None
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(proc.pid)
            m = re.search(r"SPS (\d+), updates ([\d,]+) \(([\d.]+)/s\)", line)
            if m and int(m.group(2).replace(",", "")) > 0 and learning_since is None:
                learning_since = time.time()
            if learning_since is not None and time.time() - learning_since > seconds:
                break
            if time.time() - start > seconds + 600:
                break
        t_stop = time.time()
        proc.send_signal(2)  # Ctrl-C; keep draining its output so it can never block on a full pipe
        try:
            rest, _ = proc.communicate(timeout=180)
            lines.extend(rest.splitlines(keepends=True))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        exit_seconds = time.time() - t_stop
    stats = [re.search(r"SPS (\d+), updates ([\d,]+) \(([\d.]+)/s\)", l) for l in lines]
    stats = [m for m in stats if m and int(m.group(2).replace(",", "")) > 0][1:]  # skip the first learning line
    if not stats:
        return {"sps": float("nan"), "updates_per_second": float("nan"), "exit_seconds_after_ctrl_c": exit_seconds,
                "returncode": proc.returncode, "log_tail": "".join(lines[-20:])}
    return {"sps": float(np.mean([int(m.group(1)) for m in stats])),
            "updates_per_second": float(np.mean([float(m.group(3)) for m in stats])),
            "exit_seconds_after_ctrl_c": exit_seconds, "returncode": proc.returncode, "log_tail": "".join(lines[-20:])}


def replay_throughput(env_id: str, seconds: float) -> dict:
    """Insert steps/s and 64-sequence batch samples/s (incl. stacking) of an Atari-sized replay."""
    observation_space, _ = check_env_id(env_id)
    frame_stack = frame_stack_of(env_id)
    E = 16
    replay = SequenceReplayBuffer(E, 200_000, observation_space.shape, observation_space.dtype, 1024, 40, 80, 5, 40,
                                  frame_stack=frame_stack)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 255, (E, *observation_space.shape), dtype=np.uint8) if observation_space.dtype == np.uint8 \
        else rng.random((E, *observation_space.shape), dtype=np.float32)
    state = np.zeros((E, 1024), np.float32)
    args = (obs, np.zeros(E, np.int64), np.zeros(E, np.float32), np.zeros(E, bool), np.zeros(E, bool),
            np.zeros(E, bool), state)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds or replay.write_count.min() < replay.capacity_per_stream:
        replay.add(*args)
        n += E
    insert = n / (time.time() - t0)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        batch = replay.sample(64, rng)
        if frame_stack > 1:
            stack_frames(torch.as_tensor(batch.obs), torch.as_tensor(batch.frame_first), frame_stack)
        n += 1
    return {"insert_steps_per_second": insert, "sample_batches_per_second": n / (time.time() - t0),
            "bytes_per_step": SequenceReplayBuffer.shared_nbytes(
                num_streams=E, capacity=200_000, obs_shape=observation_space.shape,
                obs_dtype=observation_space.dtype, state_size=1024, burn_in_length=40, sequence_length=80,
                n_step=5, overlap=40, frame_stack=frame_stack) / 200_000}


def learner_rates(env_id: str, updates: int, device: str | None = None, amp: bool = False,
                  overrides: dict | None = None, capacity: int = 100_000, pipeline: bool = True) -> dict:
    """The learner's updates/s at the paper's batch (64 windows × (40 + 80 + 5) steps, paper-size
    network; ``overrides``: other r2d2_mp.py arguments, e.g. batch_size) on ``device`` (default:
    CUDA if present), in float32 or under ``amp``: once on one pre-loaded batch (the update alone),
    once (``pipeline``) fed by r2d2_mp's Prefetcher from a replay of random frames (sampling, frame
    stacks rebuilt on the device, priority updates). One warm-up update each, then ``updates``
    timed. On CUDA also the peak memory the learner allocated."""
    observation_space, n_actions = check_env_id(env_id)
    frame_stack = frame_stack_of(env_id)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = R2D2Args(env_id=env_id, amp=amp, **(overrides or {}))
    set_float32_precision(args.tf32)  # as r2d2_mp.py's learner
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    q_network, target_network, optimizer = make_learner(args, observation_space, n_actions, device)
    E = 16
    replay = SequenceReplayBuffer(E, capacity, observation_space.shape, observation_space.dtype, q_network.state_size,
                                  args.burn_in_length, args.sequence_length, args.n_step, args.overlap,
                                  frame_stack=frame_stack)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (E, *observation_space.shape), dtype=np.uint8) if replay.obs.dtype == np.uint8 \
        else rng.random((E, *observation_space.shape), dtype=np.float32)
    for t in range(capacity // E):
        replay.add(np.roll(frame, t, axis=-1), rng.integers(0, n_actions, E), rng.normal(size=E).astype(np.float32),
                   np.zeros(E, bool), np.zeros(E, bool), np.zeros(E, bool), np.zeros((E, q_network.state_size), np.float32))
    stop = StopRequest()
    try:
        batch = batch_to_torch(replay.sample(args.batch_size, rng), device, frame_stack)
        rates = {}
        for i in range(updates + 1):
            if i == 1:
                t0 = time.time()
            update(q_network, target_network, optimizer, batch, args, i + 1, stop)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates["preloaded"] = updates / (time.time() - t0)
        if not pipeline:
            return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "batch_size": args.batch_size, "preloaded_updates_per_second": rates["preloaded"],
                    "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
                    if device.type == "cuda" else None}
        prefetcher = Prefetcher(replay, args.batch_size, rng, pin=device.type == "cuda")
        prefetcher.start()
        try:
            for i in range(updates + 1):
                if i == 1:
                    t0 = time.time()
                sampled = prefetcher.next_batch(stop)
                priorities, _ = update(q_network, target_network, optimizer,
                                       batch_to_torch(sampled, device, frame_stack), args, i + 1, stop)
                prefetcher.priority_updates.put((sampled.indices, sampled.sequence_ids, priorities))
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates["pipeline"] = updates / (time.time() - t0)
        finally:
            prefetcher.stop.set()
            prefetcher.join(timeout=5)
    finally:
        stop.restore()
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": f"{args.batch_size} × ({args.burn_in_length} + {args.sequence_length} + {args.n_step})",
            "batch_size": args.batch_size, "amp": amp,
            "preloaded_updates_per_second": rates["preloaded"], "pipeline_updates_per_second": rates["pipeline"],
            "pipeline_over_preloaded": rates["pipeline"] / rates["preloaded"],
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def fastest_forward(rates: dict, unit: str) -> float:
    """The forward reference of the ratios: the faster of the two batch sizes measured (the
    actor's envs, and the envs of one split), so the ratio is never flattered by a slow batch."""
    return max(rates["forward"][unit], rates.get("forward_split", rates["forward"])[unit])


def main(args: Args) -> None:
    P, E, T, S = args.processes, args.envs_per_process, args.seconds, args.env_splits
    S_atari = S if frame_stack_of(args.env_id) > 1 else 1
    results = {"args": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                 "cpu_model": _cpu_model(), "torch": torch.__version__}}
    print(f"measuring {args.env_id} with {P} process(es) × {E} envs, {T:.0f} s per cell ...", flush=True)
    rounds, round_ratios = [], []  # each round's actor ÷ min(raw env, forward), from that round's rates
    for i in range(args.repeats):
        rounds.append({
            "raw": parallel_rate("raw", args.env_id, P, E, T, env_threads=args.env_threads),
            "forward": parallel_rate("forward", args.env_id, P, E, T),
            # the batch each of the actor's forward passes has with its envs split
            **({"forward_split": parallel_rate("forward", args.env_id, P, E // S_atari, T)} if S_atari > 1 else {}),
            "actor": parallel_rate("actor", args.env_id, P, E, T, S_atari, args.env_threads),
            "actor_one_split": parallel_rate("actor", args.env_id, P, E, T, 1, args.env_threads),
            "actor_central": parallel_rate("actor", args.env_id, P, E, T, S_atari, args.env_threads, central=True),
        })
        w = {k: v["per_second"] for k, v in rounds[-1].items()}
        round_ratios.append(w["actor"] / min(w["raw"], fastest_forward(rounds[-1], "per_second")))
        print(f"round {i + 1}/{args.repeats}: raw {w['raw']:.0f}, forward {w['forward']:.0f} "
              f"(batch {E // S_atari}: {w.get('forward_split', w['forward']):.0f}), actor {w['actor']:.0f}, "
              f"actor 1 split {w['actor_one_split']:.0f}, actor with central inference {w['actor_central']:.0f} "
              f"steps/s; actor ÷ min(raw, forward) {round_ratios[-1]:.2f}; central ÷ local per CPU-second "
              f"{rounds[-1]['actor_central']['per_cpu_second'] / rounds[-1]['actor']['per_cpu_second']:.2f}", flush=True)
    main_rates = {k: {unit: float(np.median([r[k][unit] for r in rounds])) for unit in ("per_second", "per_cpu_second")}
                  for k in rounds[0]}
    results["rounds"], results["main"] = rounds, main_rates
    central_over_local = [r["actor_central"]["per_cpu_second"] / r["actor"]["per_cpu_second"] for r in rounds]
    if args.system:
        results["system"] = system_sps(args.env_id, P, E, T, S)
        results["system_central"] = system_sps(args.env_id, P, E, T, S, inference="central")
    if args.learner:
        results["learner"] = learner_rates(args.env_id, args.learner_updates)
    results["replay"] = replay_throughput(args.env_id, T / 2)
    wall = {k: v["per_second"] for k, v in main_rates.items()}
    cpu = {k: v["per_cpu_second"] for k, v in main_rates.items()}
    fwd_cpu = fastest_forward(main_rates, "per_cpu_second")
    results["ratios"] = {"actor_over_min_raw_forward": float(np.median(round_ratios)),
                         "actor_over_min_raw_forward_rounds": round_ratios,
                         "actor_over_min_raw_forward_per_cpu_second": cpu["actor"] / min(cpu["raw"], fwd_cpu),
                         "serial_bound_per_cpu_second": 1 / (1 / cpu["raw"] + 1 / fwd_cpu) / min(cpu["raw"], fwd_cpu),
                         "central_over_local_per_cpu_second": float(np.median(central_over_local)),
                         "central_over_local_per_cpu_second_rounds": central_over_local}
    print(f"\n| measurement ({P} proc × {E} envs, median of {args.repeats} rounds) | steps/s | steps per CPU-second |"
          f"\n|---|---|---|")
    print(f"| raw env, random actions | {wall['raw']:.0f} | {cpu['raw']:.0f} |")
    print(f"| batched policy forward, batch {E} (obs/s) | {wall['forward']:.0f} | {cpu['forward']:.0f} |")
    if "forward_split" in wall:
        print(f"| batched policy forward, batch {E // S_atari} (obs/s) | {wall['forward_split']:.0f} | "
              f"{cpu['forward_split']:.0f} |")
    print(f"| actors, {S_atari} env split(s), policy + replay writes, learner idle | {wall['actor']:.0f} | "
          f"{cpu['actor']:.0f} |")
    print(f"| actors, 1 env split (env and network take turns) | {wall['actor_one_split']:.0f} | "
          f"{cpu['actor_one_split']:.0f} |")
    print(f"| actors, {S_atari} env split(s), central inference process on the CPU (its CPU time counted) | "
          f"{wall['actor_central']:.0f} | {cpu['actor_central']:.0f} |")
    r = results["ratios"]
    spread = f"{min(r['actor_over_min_raw_forward_rounds']):.2f}–{max(r['actor_over_min_raw_forward_rounds']):.2f}"
    print(f"| actor ÷ min(raw env, forward), median of the rounds' ratios ({spread}) | "
          f"{r['actor_over_min_raw_forward']:.2f} | "
          f"{r['actor_over_min_raw_forward_per_cpu_second']:.2f} |")
    print(f"| bound for one CPU doing both, 1/(1/raw + 1/forward) ÷ min | | {r['serial_bound_per_cpu_second']:.2f} |")
    print(f"| central ÷ local inference, per CPU-second (median of the rounds' ratios) | | "
          f"{r['central_over_local_per_cpu_second']:.2f} |")
    if args.system:
        for name, actor_kind in (("system", "actor"), ("system_central", "actor_central")):
            s = results[name]
            label = "local" if name == "system" else "central"
            print(f"| whole system while learning, {label} inference | {s['sps']:.0f} "
                  f"({s['updates_per_second']:.2f} updates/s) | |")
            print(f"| system ÷ actors, {label} inference | {s['sps'] / wall[actor_kind]:.2f} | |")
            print(f"| (system run, {label} inference, exited {s['exit_seconds_after_ctrl_c']:.1f} s after Ctrl-C) | | |")
    if args.learner:
        r = results["learner"]
        print(f"\n| learner, batch {r['batch']} (device {r['device']}) | updates/s |\n|---|---|\n"
              f"| update alone, on a pre-loaded batch | {r['preloaded_updates_per_second']:.3f} |\n"
              f"| with the sampling pipeline (prefetch thread, replay of random frames) | "
              f"{r['pipeline_updates_per_second']:.3f} |\n| pipeline ÷ pre-loaded | {r['pipeline_over_preloaded']:.2f} |")
    r = results["replay"]
    print(f"\n| replay | value |\n|---|---|\n| insert (steps/s) | {r['insert_steps_per_second']:.0f} |\n"
          f"| sample 64 × 125-step windows + stacking (batches/s) | {r['sample_batches_per_second']:.1f} |\n"
          f"| bytes per stored step | {r['bytes_per_step']:.0f} |")

    fixed_batch, fixed_envs = [], []
    for p in args.scaling_processes:
        envs = max(S_atari, args.scaling_total_envs // p // S_atari * S_atari)
        fixed_batch.append({"processes": p, "envs_per_process": envs,
                            "actor_sps": parallel_rate("actor", args.env_id, p, envs, T, S_atari,
                                                       args.env_threads)["per_second"]})
        fixed_envs.append({"processes": p, "envs_per_process": E,
                           "actor_sps": parallel_rate("actor", args.env_id, p, E, T, S_atari,
                                                      args.env_threads)["per_second"]})
    envs_per_process = [
        {"processes": P, "envs_per_process": e,
         "actor_sps": parallel_rate("actor", args.env_id, P, e, T, S_atari, args.env_threads)["per_second"]}
        for e in args.scaling_envs_per_process if e % S_atari == 0]
    results["scaling_fixed_total_envs"], results["scaling_fixed_envs_per_process"] = fixed_batch, fixed_envs
    results["scaling_envs_per_process"] = envs_per_process
    for title, rows in (("fixed total envs (batch size)", fixed_batch), ("fixed envs per process", fixed_envs),
                        (f"{P} process(es), envs per process", envs_per_process)):
        print(f"\n| {title}: processes | envs/process | actor SPS |\n|---|---|---|")
        for row in rows:
            print(f"| {row['processes']} | {row['envs_per_process']} | {row['actor_sps']:.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main(tyro.cli(Args))
