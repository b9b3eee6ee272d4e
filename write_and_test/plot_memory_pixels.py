"""MiniGrid's memory task and two MinAtar games (experiment_configs/minigrid_memory.yaml and
minatar.yaml): greedy evaluation return against environment steps, one panel per env, the LSTM
against the feed-forward ablation.

    python write_and_test/plot_memory_pixels.py [--runs-dir runs] [--out write_and_test/figures/memory_pixels.png]

Prints the README's table (per run: best, final and mean of the last three evaluations, steps,
wall-clock, SPS) and writes the figure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

from r2d2_algo.analysis import load_run_table, load_sweep  # noqa: E402

CONFIGS = ["minigrid_memory", "minatar"]


@dataclass
class Args:
    runs_dir: str = "runs"
    """the runs/ folder the scheduler wrote"""
    out: str = "write_and_test/figures/memory_pixels.png"
    """PNG to write"""


def main(args: Args) -> None:
    df = load_sweep(load_run_table(args.runs_dir, configs=CONFIGS), ["eval/episodic_return"])
    env_ids = sorted(df["env_id"].unique())
    fig, axes = plt.subplots(1, len(env_ids), figsize=(4.4 * len(env_ids), 3.6), squeeze=False)
    print("| env | core | seed | best eval | final eval | mean of last 3 | steps | wall-clock (min) | SPS |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for ax, env_id in zip(axes[0], env_ids):
        for color, core in (("C0", "lstm"), ("C1", "none")):
            runs = df[(df["env_id"] == env_id) & (df["rnn_type"] == core)]
            for seed, run in runs.sort_values("step").groupby("seed"):
                ax.plot(run["step"], run["value"], color=color, alpha=0.35, linewidth=1)
                value, steps, wall = run["value"].to_numpy(), run["step"].to_numpy(), run["wall_time"].max()
                print(f"| {env_id.rpartition(':')[2]} | {core} | {seed} | {value.max():.2f} | {value[-1]:.2f} | "
                      f"{value[-3:].mean():.2f} | {steps[-1]:,} | {wall / 60:.1f} | {steps[-1] / wall:.0f} |")
            if len(runs):
                mean = runs.groupby("step")["value"].mean()
                ax.plot(mean.index, mean.values, color=color, linewidth=2.2,
                        label={"lstm": "LSTM", "none": "feed-forward"}[core])
        ax.set_title(env_id.rpartition(":")[2], fontsize=10)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("greedy evaluation return (ε = 0.001)")
    axes[0][0].legend(loc="upper left")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
