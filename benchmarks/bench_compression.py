"""Compressed replay observations (issue #28), all measured in one run on this machine.

    python benchmarks/bench_compression.py [--steps 3000] [--seconds 8]

1. codecs: bytes per 84 × 84 frame, compress and decompress µs per frame, of lz4 and zstd
   (levels 1 and 3) over chunks of K = 8, 16, 20, 32 consecutive frames, on frames of
   PongNoFrameskip-v4, BreakoutNoFrameskip-v4, SeaquestNoFrameskip-v4 and MsPacmanNoFrameskip-v4
   (r2d2_algo.envs.make_env, random actions kept for 4 steps on average, from the first reset on);
2. bytes per stored step, all arrays: a paper-configured replay (burn-in 40, sequence 80, n-step
   5, overlap 40, the LSTM's 1,024-float stored state, 4-frame stacks) filled with each game's
   frames, uncompressed and compressed (--codec, --bytes-per-frame): the compressed bytes in use
   per frame plus every other array per step (allocated: shared_nbytes ÷ capacity), and its
   checkpoint (``state_dict``) bytes;
3. the paper's replay, 4 M observations: shared memory declared (``shared_nbytes``) for
   r2d2_mp.py's streams on 16 cores (15 actors × 64 envs) and for the paper's 256 actors;
4. actors: --actor-processes processes, each r2d2_mp.EnvActor stepping 64 Pong envs (2 env splits,
   its CPU network acting) that writes, in alternating --slice-second slices, to a replay of its
   own compressed and to one uncompressed: SPS of each, per wall second and per CPU second of the
   process (its env threads included), their ratios, and the µs per step spent in ``replay.add``;
5. sampling: batches/s at the paper batch (64 windows of 40 + 80 + 5 steps, 3 history frames)
   from the compressed and the uncompressed replay of part 2 (the same writes), with 1 and 2
   threads (the index under a lock, the reads outside it, as a multi-threaded prefetcher would),
   alternating between them in slices; batches per wall second and per CPU second of the
   sampling threads, and the threads a 10-updates/s learner needs on 16 cores predicted from the
   CPU seconds per batch.

Comparisons alternate compressed and uncompressed in short slices inside one process because
the machine may be shared: whatever else runs slows both alike. Per-CPU-second rates are the
per-core figures; per-wall-second ones also count the time the threads waited for a core.
Prints tables and writes JSON (--out).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this clone's r2d2_algo, installed or not

from r2d2_algo.frame_codec import FrameCodec, frames_per_chunk_for  # noqa: E402
from r2d2_algo.storage import SequenceReplayBuffer  # noqa: E402

GAMES = ("PongNoFrameskip-v4", "BreakoutNoFrameskip-v4", "SeaquestNoFrameskip-v4", "MsPacmanNoFrameskip-v4")
PAPER = dict(burn_in_length=40, sequence_length=80, n_step=5, overlap=40, priority_exponent=0.9,
             importance_sampling_exponent=0.6, frame_stack=4)
STATE_SIZE = 1024  # RNNQNetwork's LSTM state at hidden size 512: h and c
BATCH = 64


@dataclass
class Args:
    games: tuple[str, ...] = GAMES
    """games whose frames are measured"""
    steps: int = 3000
    """env steps collected per game"""
    codec: str = "zstd"
    """the replay's codec for parts 2–5"""
    bytes_per_frame: int = 768
    """the replay's compressed bytes-per-frame budget for parts 2–5"""
    streams: int = 16
    """env streams of the replays of parts 2 and 5"""
    steps_per_stream: int = 4160
    """capacity per stream of the replays of parts 2 and 5 (steps; 4,160: the paper's 4 M over r2d2_mp.py's 960
    streams on 16 cores)"""
    seconds: float = 8.0
    """time each actor and sampling measurement spends on each of compressed and uncompressed"""
    slice_seconds: float = 0.25
    """length of one slice of the alternation between compressed and uncompressed"""
    actor_envs: int = 64
    """envs per actor process"""
    actor_processes: tuple[int, ...] = (1, 2)
    """actor process counts to measure"""
    sample_threads: tuple[int, ...] = (1, 2)
    """sampling thread counts to measure"""
    sample_games: tuple[str, ...] = ("PongNoFrameskip-v4", "MsPacmanNoFrameskip-v4")
    """games whose frames fill the sampling replays"""
    out: str = "benchmarks/results/bench_compression.json"
    """where to write the JSON results"""


# ---------------------------------------------------------------------- frames
def collect_frames(env_id: str, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(steps, 84, 84) uint8 newest frames of the observations of one env with random actions
    (a new one with probability 1/4 each step), and (steps,) bool episode starts."""
    from r2d2_algo.envs import make_env

    env = make_env(env_id, seed=seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames, first, action, start = [], [], 0, True
    for _ in range(steps):
        frames.append(obs[-1])
        first.append(start)
        if rng.random() < 0.25:
            action = int(rng.integers(env.action_space.n))
        obs, _, terminated, truncated, _ = env.step(action)
        start = terminated or truncated
        if start:
            obs, _ = env.reset()
    env.close()
    return np.stack(frames), np.array(first)


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def codec_table(frames: np.ndarray) -> list[dict]:
    """Part 1 for one game's frames."""
    rows = []
    for name in ("lz4", "zstd:1", "zstd:3"):
        try:
            codec = FrameCodec(name)
        except ImportError:  # lz4 is optional
            continue
        for K in (8, 16, 20, 32):
            chunks = [np.ascontiguousarray(frames[i : i + K]) for i in range(0, len(frames) - K + 1, K)]
            count = len(chunks) * K
            compress_s, blobs = best_of(lambda: [codec.compress(c) for c in chunks])
            decompress_s, out = best_of(lambda: [codec.decompress(b, c.nbytes) for b, c in zip(blobs, chunks)])
            assert all(o == c.tobytes() for o, c in zip(out, chunks))  # lossless
            rows.append(dict(codec=name, frames_per_chunk=K, bytes_per_frame=sum(map(len, blobs)) / count,
                             compress_us_per_frame=1e6 * compress_s / count,
                             decompress_us_per_frame=1e6 * decompress_s / count))
    return rows


# ---------------------------------------------------------------------- replays
def replay_kwargs(args: Args, num_streams: int, capacity: int, compressed: bool, margin: int = 20) -> dict:
    kwargs = dict(num_streams=num_streams, capacity=capacity, obs_shape=(4, 84, 84), obs_dtype=np.uint8,
                  state_size=STATE_SIZE, overwrite_margin=margin, **PAPER)
    if compressed:
        kwargs.update(obs_compression=args.codec, compressed_bytes_per_frame=args.bytes_per_frame)
    return kwargs


def fill(replays: list[SequenceReplayBuffer], frames: np.ndarray, first: np.ndarray, steps: int, seed: int = 0):
    """Write ``steps`` steps to every stream of each replay: stream e plays the game's frames from
    its own offset (episode starts as collected), with random actions, rewards and states."""
    rng = np.random.default_rng(seed)
    E = replays[0].num_streams
    offsets = (np.arange(E) * len(frames)) // E
    for i in range(steps):
        at = (offsets + i) % len(frames)
        obs = np.broadcast_to(frames[at][:, None], (E, 4, *frames.shape[1:]))  # only the newest frame is stored
        action, reward = rng.integers(0, 18, E), rng.normal(size=E).astype(np.float32)
        state = rng.normal(size=(E, STATE_SIZE)).astype(np.float32)
        for rb in replays:
            rb.add(obs, action, reward, first[at], np.zeros(E, bool), np.zeros(E, bool), state)


def state_nbytes(state: dict) -> int:
    return sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))


def step_bytes(args: Args, frames: np.ndarray, first: np.ndarray):
    """Part 2 for one game: the replays filled past a wrap-around of the step ring. Returns the
    row and both replays (for part 5)."""
    C = args.steps_per_stream
    plain = SequenceReplayBuffer(**replay_kwargs(args, args.streams, args.streams * C, False))
    packed = SequenceReplayBuffer(**replay_kwargs(args, args.streams, args.streams * C, True))
    fill([plain, packed], frames, first, C + C // 2)
    capacity = plain.capacity_per_stream * plain.num_streams
    plain_bytes = SequenceReplayBuffer.shared_nbytes(**replay_kwargs(args, args.streams, args.streams * C, False))
    packed_bytes = SequenceReplayBuffer.shared_nbytes(**replay_kwargs(args, args.streams, args.streams * C, True))
    frames_store = packed.frames
    obs_used = frames_store.stored_bytes_per_frame(packed.write_count + packed.history_length)
    other = (packed_bytes - sum(getattr(frames_store, n).nbytes for n in ("staging", "arena"))) / capacity
    for seed in range(3):  # the compressed replay samples what the uncompressed one does
        a, b = plain.sample(8, np.random.default_rng(seed)), packed.sample(8, np.random.default_rng(seed))
        assert np.array_equal(a.obs, b.obs) and np.array_equal(a.sequence_ids, b.sequence_ids)
    staging = frames_store.staging.nbytes / capacity
    return plain, packed, dict(obs_bytes_per_frame=obs_used, other_bytes_per_step=other, staging_bytes_per_step=staging,
                used_bytes_per_step=obs_used + other + staging, allocated_bytes_per_step=packed_bytes / capacity,
                uncompressed_bytes_per_step=plain_bytes / capacity,
                sampleable_fraction=packed.sampleable_fraction(),
                uncompressed_sampleable_fraction=plain.sampleable_fraction(),
                checkpoint_bytes=state_nbytes(packed.state_dict()),
                uncompressed_checkpoint_bytes=state_nbytes(plain.state_dict()))


def paper_replay(args: Args) -> dict:
    """Part 3: shared memory of the paper's 4 M-observation replay, declared, without allocating."""
    out = {}
    for label, streams in (("r2d2_mp_16_cores_960_streams", 15 * 64), ("paper_256_actors", 256)):
        plain = SequenceReplayBuffer.shared_nbytes(**replay_kwargs(args, streams, 4_000_000, False))
        packed = SequenceReplayBuffer.shared_nbytes(**replay_kwargs(args, streams, 4_000_000, True))
        out[label] = dict(streams=streams, uncompressed_bytes=plain, compressed_bytes=packed,
                          compressed_bytes_per_step=packed / 4_000_000)
    return out


# ---------------------------------------------------------------------- actors
def _actor_worker(args_dict: dict, processes: int, seed: int, result_queue):
    """r2d2_mp.EnvActor on ``actor_envs`` Pong envs (2 splits), CPU network, one torch thread,
    writing to two paper-configured replays of its own (500 steps per stream, pages touched
    before timing), compressed and uncompressed, in alternating slices."""
    import torch

    from r2d2_algo.envs import check_env_id, default_env_threads, make_vector_env
    from r2d2_algo.model import RNNQNetwork
    from r2d2_algo.r2d2_mp import EnvActor

    args = Args(**args_dict)
    torch.set_num_threads(1)
    env_id, E = "PongNoFrameskip-v4", args.actor_envs
    observation_space, n_actions = check_env_id(env_id, quiet=True)
    envs = make_vector_env(env_id, E, seed, num_splits=2, num_threads=default_env_threads(processes),
                           thread_niceness=10)  # as r2d2_mp.py's actors
    net = RNNQNetwork(observation_space, n_actions)
    replays, add_seconds = {}, {}
    for compressed in (False, True):
        replay = SequenceReplayBuffer(**replay_kwargs(args, E, E * 500, compressed), index=False)
        for array in replay.shared.values():  # steady state: no first-touch page faults while timed
            array.fill(0)

        def timed_add(*a, _add=replay.add, _compressed=compressed, **k):
            t0 = time.perf_counter()
            _add(*a, **k)
            add_seconds[_compressed] += time.perf_counter() - t0

        replay.add = timed_add
        replays[compressed], add_seconds[compressed] = replay, 0.0
    actor = EnvActor(envs, net, replays[False], np.full(E, 0.01), np.random.default_rng(seed), seed)
    totals = {c: dict(steps=0, wall=0.0, cpu=0.0) for c in (False, True)}
    warmup_end = time.time() + 2.0
    while time.time() < warmup_end:
        actor.step()
    add_seconds.update({False: 0.0, True: 0.0})
    slices = 2 * max(1, round(args.seconds / args.slice_seconds))
    for i in range(slices):
        compressed = bool(i % 2) != bool(seed % 2)  # processes start on opposite sides
        actor.replay = replays[compressed]
        steps0, t0, cpu0 = actor.env_steps, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < args.slice_seconds:
            actor.step()
        total = totals[compressed]
        total["steps"] += actor.env_steps - steps0
        total["wall"] += time.perf_counter() - t0
        total["cpu"] += time.process_time() - cpu0  # the process: its env threads included
    result_queue.put({c: dict(**totals[c], add_seconds=add_seconds[c]) for c in (False, True)})
    envs.close()


def actor_rates(args: Args, processes: int) -> dict:
    """Part 4 for ``processes`` actor processes running at once."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    workers = [ctx.Process(target=_actor_worker, args=(asdict(args), processes, 1000 + i, q))
               for i in range(processes)]
    for w in workers:
        w.start()
    results = [q.get(timeout=2 * args.seconds + 300) for _ in workers]
    for w in workers:
        w.join()
    out = {}
    for compressed in (False, True):
        rs = [r[compressed] for r in results]
        steps = sum(r["steps"] for r in rs)
        out["compressed" if compressed else "uncompressed"] = dict(
            sps=sum(r["steps"] / r["wall"] for r in rs), sps_per_cpu_second=steps / sum(r["cpu"] for r in rs),
            add_us_per_step=1e6 * sum(r["add_seconds"] for r in rs) / max(steps, 1), steps=steps)
    c, u = out["compressed"], out["uncompressed"]
    out["sps_ratio"] = c["sps"] / u["sps"]
    out["sps_per_cpu_second_ratio"] = c["sps_per_cpu_second"] / u["sps_per_cpu_second"]
    # what the add's extra time alone would cost a process stepping at the uncompressed rate
    step_us = 1e6 * processes / u["sps"]
    out["sps_ratio_from_add_time"] = step_us / (step_us + c["add_us_per_step"] - u["add_us_per_step"])
    return out


# ---------------------------------------------------------------------- sampling
def sampling_rates(replays: dict, threads: int, args: Args, seed: int) -> dict:
    """Batches/s of ``threads`` threads that each draw under one lock and read outside it, from
    replays[False] (uncompressed) and replays[True] (compressed) in alternating slices."""
    lock = threading.Lock()
    totals = {c: dict(batches=0, wall=0.0, cpu=0.0) for c in (False, True)}
    rngs = [np.random.default_rng(seed + i) for i in range(threads)]
    for replay in replays.values():
        replay.sample(BATCH, np.random.default_rng(seed))  # warm-up

    def work(i, replay, deadline, counts, cpu):
        t0 = time.thread_time()
        while time.perf_counter() < deadline:
            with lock:
                draw = replay.draw(BATCH, rngs[i])
            replay.read(draw)
            counts[i] += 1
        cpu[i] = time.thread_time() - t0

    slices = 2 * max(1, round(args.seconds / args.slice_seconds))
    for k in range(slices):
        compressed = bool(k % 2)
        counts, cpu = [0] * threads, [0.0] * threads
        t0 = time.perf_counter()
        workers = [threading.Thread(target=work, args=(i, replays[compressed], t0 + args.slice_seconds, counts, cpu))
                   for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        total = totals[compressed]
        total["batches"] += sum(counts)
        total["wall"] += time.perf_counter() - t0
        total["cpu"] += sum(cpu)
    out = {}
    for compressed in (False, True):
        t = totals[compressed]
        cpu_per_batch = t["cpu"] / max(t["batches"], 1)
        out["compressed" if compressed else "uncompressed"] = dict(
            batches_per_second=t["batches"] / t["wall"], batches_per_cpu_second=1 / cpu_per_batch,
            cpu_seconds_per_batch=cpu_per_batch, batches=t["batches"],
            threads_for_10_updates_per_second=math.ceil(10 * cpu_per_batch))  # one batch per update
    c, u = out["compressed"], out["uncompressed"]
    out["ratio"] = c["batches_per_second"] / u["batches_per_second"]
    out["per_cpu_second_ratio"] = c["batches_per_cpu_second"] / u["batches_per_cpu_second"]
    return out


# ---------------------------------------------------------------------- report
def main(args: Args) -> None:
    started = time.time()
    results = dict(args=asdict(args), machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                   cpu_model=_cpu_model()))
    print(f"{os.cpu_count()} CPUs ({_cpu_model()}); codec {args.codec}, budget {args.bytes_per_frame} bytes per frame, "
          f"chunks of {frames_per_chunk_for(PAPER['sequence_length'] - PAPER['overlap'])} frames (period 40)",
          flush=True)
    frames = {}
    for game in args.games:
        frames[game] = collect_frames(game, args.steps)

    # 1. codecs
    results["codecs"] = {}
    print("\n1. codecs on chunks of K frames: bytes per frame | compress µs per frame | decompress µs per frame")
    for game in args.games:
        rows = codec_table(frames[game][0][args.steps // 10 :])  # past the first start screens
        results["codecs"][game] = rows
        print(f"  {game}")
        for name in ("lz4", "zstd:1", "zstd:3"):
            cells = "  ".join(f"K={r['frames_per_chunk']:2d} {r['bytes_per_frame']:5.0f} B {r['compress_us_per_frame']:4.1f} "
                              f"{r['decompress_us_per_frame']:4.1f}" for r in rows if r["codec"] == name)
            print(f"    {name:7s} {cells}", flush=True)

    # 2. bytes per stored step
    results["step_bytes"], sample_replays = {}, {}
    print(f"\n2. bytes per stored step, all arrays ({args.streams} streams × {args.steps_per_stream} steps, paper "
          f"sequences, stored state {STATE_SIZE} floats)")
    print(f"  {'game':24s} {'obs B/frame':>11s} {'other B/step':>12s} {'staging':>8s} {'used':>6s} {'allocated':>9s} "
          f"{'uncompressed':>12s} {'checkpoint MB':>14s} {'uncompr. MB':>11s}")
    for game in args.games:
        plain, packed, r = step_bytes(args, *frames[game])
        results["step_bytes"][game] = r
        if game in args.sample_games:
            sample_replays[game] = {False: plain, True: packed}
        del plain, packed
        print(f"  {game:24s} {r['obs_bytes_per_frame']:11.0f} {r['other_bytes_per_step']:12.0f} "
              f"{r['staging_bytes_per_step']:8.0f} {r['used_bytes_per_step']:6.0f} {r['allocated_bytes_per_step']:9.0f} "
              f"{r['uncompressed_bytes_per_step']:12.0f} {r['checkpoint_bytes'] / 1e6:14.1f} "
              f"{r['uncompressed_checkpoint_bytes'] / 1e6:11.1f}", flush=True)

    # 3. the paper's replay
    results["paper_replay"] = paper_replay(args)
    print("\n3. the paper's replay, 4 M observations, declared shared memory")
    for label, r in results["paper_replay"].items():
        print(f"  {label:30s} uncompressed {r['uncompressed_bytes'] / 1e9:5.1f} GB, compressed "
              f"{r['compressed_bytes'] / 1e9:5.2f} GB ({r['compressed_bytes_per_step']:.0f} B per step)", flush=True)

    # 5. sampling (before the actors: it needs part 2's replays, freed after it)
    results["sampling"] = {}
    lines = [f"\n5. sampling: batches at the paper batch ({BATCH} × (40 + 80 + 5) steps + 3 history frames), "
             f"uncompressed → compressed, alternating {args.slice_seconds} s slices, {args.seconds:.0f} s each"]
    print(lines[0], flush=True)
    for game in args.sample_games:
        results["sampling"][game] = {}
        for threads in args.sample_threads:
            r = results["sampling"][game][str(threads)] = sampling_rates(sample_replays[game], threads, args, 7)
            u, c = r["uncompressed"], r["compressed"]
            lines.append(f"  {game:24s} {threads} thread{'s' if threads > 1 else ' '}: per wall second "
                         f"{u['batches_per_second']:5.1f} → {c['batches_per_second']:5.1f} (ratio {r['ratio']:.2f}); "
                         f"per CPU second {u['batches_per_cpu_second']:5.1f} → {c['batches_per_cpu_second']:5.1f} (ratio "
                         f"{r['per_cpu_second_ratio']:.2f}); threads for 10 updates/s "
                         f"{u['threads_for_10_updates_per_second']} → {c['threads_for_10_updates_per_second']}")
            print(lines[-1], flush=True)
        del sample_replays[game]

    # 4. actors
    results["actors"] = {}
    print(f"\n4. actors: r2d2_mp.EnvActor, {args.actor_envs} Pong envs per process, writing uncompressed → compressed "
          f"in alternating {args.slice_seconds} s slices, {args.seconds:.0f} s each")
    for processes in args.actor_processes:
        r = results["actors"][str(processes)] = actor_rates(args, processes)
        u, c = r["uncompressed"], r["compressed"]
        print(f"  {processes} process{'es' if processes > 1 else ''}: SPS {u['sps']:.0f} → {c['sps']:.0f} (ratio "
              f"{r['sps_ratio']:.3f}); per CPU second {u['sps_per_cpu_second']:.0f} → {c['sps_per_cpu_second']:.0f} "
              f"(ratio {r['sps_per_cpu_second_ratio']:.3f}); replay.add {u['add_us_per_step']:.1f} → "
              f"{c['add_us_per_step']:.1f} µs per step (ratio implied by it {r['sps_ratio_from_add_time']:.3f})",
              flush=True)
    print("\n".join(lines))

    results["seconds"] = time.time() - started
    out = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {out} ({results['seconds']:.0f} s)")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main(tyro.cli(Args))
