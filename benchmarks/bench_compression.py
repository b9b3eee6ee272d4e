"""Compressed replay observations (issue #28), all measured in one run on this machine.

    python benchmarks/bench_compression.py [--steps 3000] [--seconds 6] [--repeats 2]

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
   its CPU network acting) and writing a replay of its own, compressed and not, in interleaved
   rounds: SPS, the ratio, and the µs per step spent in ``replay.add``;
5. sampling: batches/s at the paper batch (64 windows of 40 + 80 + 5 steps, 3 history frames),
   compressed and not, from the same writes, with 1 and 2 threads (the index under a lock, the
   reads outside it, as a multi-threaded prefetcher would), in interleaved rounds; CPU seconds
   per batch, and the threads a 10-updates/s learner needs on 16 cores predicted from them.

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
    seconds: float = 6.0
    """length of each actor and sampling measurement"""
    repeats: int = 2
    """interleaved rounds of the actor and sampling measurements (ratios: median over rounds)"""
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
        codec = FrameCodec(name)
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


def step_bytes(args: Args, frames: np.ndarray, first: np.ndarray) -> dict:
    """Part 2 for one game: the replays filled past a wrap-around of the step ring."""
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
    return dict(obs_bytes_per_frame=obs_used, other_bytes_per_step=other, staging_bytes_per_step=staging,
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
def _actor_worker(compressed: bool, args_dict: dict, processes: int, seconds: float, seed: int, result_queue):
    """r2d2_mp.EnvActor on ``actor_envs`` Pong envs (2 splits), CPU network, one torch thread; its
    own paper-configured replay (500 steps per stream, pages touched before timing)."""
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
    replay = SequenceReplayBuffer(**replay_kwargs(args, E, E * 500, compressed), index=False)
    for array in replay.shared.values():  # steady state: no first-touch page faults while timed
        array.fill(0)
    add_seconds = [0.0]
    add = replay.add

    def timed_add(*a, **k):
        t0 = time.perf_counter()
        add(*a, **k)
        add_seconds[0] += time.perf_counter() - t0

    replay.add = timed_add
    actor = EnvActor(envs, net, replay, np.full(E, 0.01), np.random.default_rng(seed), seed)
    start, t0 = time.time(), None
    while True:
        now = time.time()
        if t0 is None and now - start > 2.0:  # warm-up
            t0, steps0, add0, cpu0 = now, actor.env_steps, add_seconds[0], time.process_time()
        if t0 is not None and now - t0 >= seconds:
            break
        actor.step()
    steps = actor.env_steps - steps0
    result_queue.put(dict(sps=steps / (now - t0), add_us_per_step=1e6 * (add_seconds[0] - add0) / max(steps, 1),
                          cpu_seconds=time.process_time() - cpu0, steps=steps))
    envs.close()


def actor_round(args: Args, processes: int, compressed: bool, seed: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    workers = [ctx.Process(target=_actor_worker, args=(compressed, asdict(args), processes, args.seconds,
                                                         seed + i, q)) for i in range(processes)]
    for w in workers:
        w.start()
    results = [q.get(timeout=args.seconds + 300) for _ in workers]
    for w in workers:
        w.join()
    return dict(sps=sum(r["sps"] for r in results), add_us_per_step=float(np.mean([r["add_us_per_step"]
                                                                                   for r in results])),
                sps_per_cpu_second=sum(r["steps"] for r in results) / sum(r["cpu_seconds"] for r in results))


# ---------------------------------------------------------------------- sampling
def sampling_rate(replay: SequenceReplayBuffer, threads: int, seconds: float, seed: int) -> dict:
    """Batches/s of ``threads`` threads that each draw under one lock and read outside it."""
    lock = threading.Lock()
    counts, cpu = [0] * threads, [0.0] * threads
    replay.sample(BATCH, np.random.default_rng(seed))  # warm-up
    deadline = time.perf_counter() + seconds

    def work(i):
        rng, t0 = np.random.default_rng(seed + i), time.thread_time()
        while time.perf_counter() < deadline:
            with lock:
                draw = replay.draw(BATCH, rng)
            replay.read(draw)
            counts[i] += 1
        cpu[i] = time.thread_time() - t0

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    return dict(batches_per_second=sum(counts) / wall, cpu_seconds_per_batch=sum(cpu) / max(sum(counts), 1))


# ---------------------------------------------------------------------- report
def _median(values):
    return float(np.median(values))


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
    results["step_bytes"] = {}
    print(f"\n2. bytes per stored step, all arrays ({args.streams} streams × {args.steps_per_stream} steps, paper "
          f"sequences, stored state {STATE_SIZE} floats)")
    print(f"  {'game':24s} {'obs B/frame':>11s} {'other B/step':>12s} {'staging':>8s} {'used':>6s} {'allocated':>9s} "
          f"{'uncompressed':>12s} {'checkpoint MB':>14s} {'uncompr. MB':>11s}")
    for game in args.games:
        r = results["step_bytes"][game] = step_bytes(args, *frames[game])
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

    # 4. actors
    results["actors"] = {}
    print(f"\n4. actors: r2d2_mp.EnvActor, {args.actor_envs} Pong envs each, replay written compressed or not "
          f"({args.repeats} interleaved rounds of {args.seconds:.0f} s)")
    for processes in args.actor_processes:
        rounds = []
        for repeat in range(args.repeats):
            row = {}
            for compressed in ((False, True) if repeat % 2 == 0 else (True, False)):
                row["compressed" if compressed else "uncompressed"] = actor_round(args, processes, compressed,
                                                                                  100 * repeat)
            row["sps_ratio"] = row["compressed"]["sps"] / row["uncompressed"]["sps"]
            rounds.append(row)
        summary = dict(rounds=rounds, sps_ratio=_median([r["sps_ratio"] for r in rounds]),
                       sps_uncompressed=_median([r["uncompressed"]["sps"] for r in rounds]),
                       sps_compressed=_median([r["compressed"]["sps"] for r in rounds]),
                       add_us_per_step_uncompressed=_median([r["uncompressed"]["add_us_per_step"] for r in rounds]),
                       add_us_per_step_compressed=_median([r["compressed"]["add_us_per_step"] for r in rounds]))
        results["actors"][str(processes)] = summary
        print(f"  {processes} process{'es' if processes > 1 else ''}: SPS {summary['sps_uncompressed']:.0f} → "
              f"{summary['sps_compressed']:.0f} compressed (ratio {summary['sps_ratio']:.3f}, rounds "
              f"{', '.join('%.3f' % r['sps_ratio'] for r in rounds)}); replay.add {summary['add_us_per_step_uncompressed']:.1f} → "
              f"{summary['add_us_per_step_compressed']:.1f} µs per step", flush=True)

    # 5. sampling
    results["sampling"] = {}
    print(f"\n5. sampling: batches/s at the paper batch ({BATCH} × (40 + 80 + 5) steps + 3 history frames), "
          f"{args.repeats} interleaved rounds of {args.seconds:.0f} s")
    for game in args.sample_games:
        C = args.steps_per_stream
        plain = SequenceReplayBuffer(**replay_kwargs(args, args.streams, args.streams * C, False))
        packed = SequenceReplayBuffer(**replay_kwargs(args, args.streams, args.streams * C, True))
        fill([plain, packed], *frames[game], C + C // 2)
        per_game = {}
        for threads in args.sample_threads:
            rounds = []
            for repeat in range(args.repeats):
                row = {}
                for compressed in ((False, True) if repeat % 2 == 0 else (True, False)):
                    row["compressed" if compressed else "uncompressed"] = sampling_rate(
                        packed if compressed else plain, threads, args.seconds, 1000 * repeat)
                row["ratio"] = row["compressed"]["batches_per_second"] / row["uncompressed"]["batches_per_second"]
                rounds.append(row)
            summary = dict(rounds=rounds, ratio=_median([r["ratio"] for r in rounds]),
                           **{f"{kind}_{key}": _median([r[kind][key] for r in rounds])
                              for kind in ("uncompressed", "compressed")
                              for key in ("batches_per_second", "cpu_seconds_per_batch")})
            for kind in ("uncompressed", "compressed"):  # a 10-updates/s learner, one batch per update
                summary[f"{kind}_threads_for_10_updates_per_second"] = math.ceil(
                    10 * summary[f"{kind}_cpu_seconds_per_batch"])
            per_game[str(threads)] = summary
            print(f"  {game:24s} {threads} thread{'s' if threads > 1 else ' '}: {summary['uncompressed_batches_per_second']:5.1f} → "
                  f"{summary['compressed_batches_per_second']:5.1f} batches/s compressed (ratio {summary['ratio']:.2f}); "
                  f"CPU s per batch {summary['uncompressed_cpu_seconds_per_batch']:.3f} → "
                  f"{summary['compressed_cpu_seconds_per_batch']:.3f}: threads for 10 updates/s "
                  f"{summary['uncompressed_threads_for_10_updates_per_second']} → "
                  f"{summary['compressed_threads_for_10_updates_per_second']}", flush=True)
        results["sampling"][game] = per_game
        del plain, packed

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
