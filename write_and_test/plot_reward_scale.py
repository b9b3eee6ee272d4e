"""The reward-scale study (experiment_configs/reward_scale.yaml): greedy return as a fraction of
the task's maximum, one panel per reward scale, LSTM against the feed-forward ablation.

    python write_and_test/plot_reward_scale.py [--runs-dir runs] [--out write_and_test/figures/reward_scale.png]

Prints the table of the README (per run: first evaluation ≥ 80 % of the maximum, evaluations
≥ 80 %, best, final and mean of the last five evaluations, wall-clock) and writes the figure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from r2d2_algo.analysis import load_run_table, load_sweep  # noqa: E402

MAX_RETURN = {"CartPoleNoVelocity-RewardScale0.01-v1": 5.0, "CartPoleNoVelocity-v1": 500.0,
              "CartPoleNoVelocity-RewardScale100-v1": 50_000.0}


@dataclass
class Args:
    runs_dir: str = "runs"
    """the runs/ folder the scheduler wrote"""
    out: str = "write_and_test/figures/reward_scale.png"
    """PNG to write"""


def main(args: Args) -> None:
    df = load_sweep(load_run_table(args.runs_dir, configs=["reward_scale"]), ["eval/episodic_return"])
    df["fraction"] = df["value"] / df["env_id"].map(MAX_RETURN)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    print("| reward scale | core | seed | first eval ≥ 80 % (steps) | evals ≥ 80 % (of 30) | best | final | "
          "mean of last 5 | wall-clock (min) |\n|---|---|---|---|---|---|---|---|---|")
    for ax, (env_id, max_return) in zip(axes, MAX_RETURN.items()):
        for color, core in (("C0", "lstm"), ("C1", "none")):
            runs = df[(df["env_id"] == env_id) & (df["rnn_type"] == core)]
            for seed, run in runs.sort_values("step").groupby("seed"):
                ax.plot(run["step"], run["fraction"], color=color, alpha=0.35, linewidth=1)
                fraction, steps = run["fraction"].to_numpy(), run["step"].to_numpy()
                first = f"{steps[fraction >= 0.8][0]:,}" if (fraction >= 0.8).any() else "never"
                print(f"| × {max_return / 500:g} | {core} | {seed} | {first} | {(fraction >= 0.8).sum()} | "
                      f"{fraction.max():.0%} | {fraction[-1]:.0%} | {fraction[-5:].mean():.0%} | "
                      f"{run['wall_time'].max() / 60:.1f} |")
            mean = runs.groupby("step")["fraction"].mean()
            ax.plot(mean.index, mean.values, color=color, linewidth=2.2,
                    label={"lstm": "LSTM", "none": "feed-forward"}[core])
        ax.axhline(0.8, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(f"rewards × {max_return / 500:g} (return at most {max_return:g})", fontsize=10)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("greedy return ÷ maximum")
    axes[0].legend(loc="lower right")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
