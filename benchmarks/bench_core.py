"""Speed of the resetting recurrent cores against a plain fused torch RNN of the same size.

Unrolls (T=120, B=64) — an R2D2 Atari window of 40 burn-in + 80 trained steps — with
input 512 + 18 + 1 (torso features, one-hot previous action, previous reward) and hidden
512, as in the paper's Table 2. Resets are drawn i.i.d. per (t, b) with probability
1 / mean episode length. Prints a table and writes JSON.

    python benchmarks/bench_core.py [--device cuda] [--out benchmarks/results/bench_core.json]
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass

import torch
import tyro

from r2d2_algo.model import ResettingGRU, ResettingLSTM


@dataclass
class Args:
    T: int = 120
    """unroll length (burn-in + sequence length)"""
    B: int = 64
    """batch size in sequences"""
    hidden_size: int = 512
    """core width"""
    input_size: int = 512 + 18 + 1
    """core input width"""
    repeats: int = 5
    """timed repetitions per cell (after one warm-up)"""
    device: str = "cpu"
    """torch device"""
    backward: bool = True
    """also time forward + backward"""
    out: str = "benchmarks/results/bench_core.json"
    """where to write the JSON results"""


def timeit(fn, repeats: int, device: str) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main(args: Args) -> None:
    torch.manual_seed(0)
    rows = []
    for core_cls, plain_cls in ((ResettingLSTM, torch.nn.LSTM), (ResettingGRU, torch.nn.GRU)):
        core = core_cls(args.input_size, args.hidden_size).to(args.device)
        plain = plain_cls(args.input_size, args.hidden_size).to(args.device)
        x = torch.randn(args.T, args.B, args.input_size, device=args.device, requires_grad=args.backward)
        state = torch.zeros(args.B, core.state_size, device=args.device)
        for episode_length in (None, 2000, 500, 100, 20):
            p = 0.0 if episode_length is None else 1.0 / episode_length
            reset = torch.rand(args.T, args.B, device=args.device) < p
            k = int(reset[1:].any(dim=1).sum())
            row = {"core": core_cls.__name__, "mean_episode_length": episode_length, "resets": int(reset.sum()),
                   "reset_steps": k}
            with torch.no_grad():
                plain_s = timeit(lambda: plain(x), args.repeats, args.device)
                row["plain_fwd_ms"] = 1e3 * plain_s
                for strategy in ("auto", "chunked", "packed"):
                    s = timeit(lambda: core(x, state, reset, strategy=strategy), args.repeats, args.device)
                    row[f"{strategy}_fwd_ratio"] = s / plain_s
            if args.backward:
                plain_s = timeit(lambda: plain(x)[0].sum().backward(), args.repeats, args.device)
                s = timeit(lambda: core(x, state, reset)[0].sum().backward(), args.repeats, args.device)
                row["plain_fwd_bwd_ms"] = 1e3 * plain_s
                row["auto_fwd_bwd_ratio"] = s / plain_s
            rows.append(row)
            print(row, flush=True)

    header = ["core", "ep. length", "reset steps", "plain fwd ms", "auto ×", "chunked ×", "packed ×",
              "plain fwd+bwd ms", "auto fwd+bwd ×"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['core']} | {r['mean_episode_length'] or 'no resets'} | {r['reset_steps']} | "
              f"{r['plain_fwd_ms']:.0f} | {r['auto_fwd_ratio']:.2f} | {r['chunked_fwd_ratio']:.2f} | "
              f"{r['packed_fwd_ratio']:.2f} | {r.get('plain_fwd_bwd_ms', float('nan')):.0f} | "
              f"{r.get('auto_fwd_bwd_ratio', float('nan')):.2f} |")
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
               "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "machine": machine, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
