"""MiniGrid's memory task and two MinAtar games: greedy evaluation return against environment
steps, one panel per env, the LSTM against the feed-forward ablation.

    python write_and_test/plot_memory_pixels.py            # minigrid_memory.yaml + minatar.yaml
    python write_and_test/plot_memory_pixels.py --configs minigrid_memory_s11 minatar_long \
        --out write_and_test/figures/memory_pixels_long.png

Prints the README's table (per run: best, final and mean of the last three evaluations, steps,
wall-clock, SPS) and writes the figure. MinAtar panels also show the MinAtar paper's DQN
(Young & Tian 2019: mean of 30 runs, moving average of 100 training episodes at
ε = 0.1, full action set) at a few frame counts, read off the figure in the MinAtar repository
(its `img/learning_curves.gif`) by locating the DQN curve's pixels: about ±0.3 (Breakout) and
±2 (SpaceInvaders). A MinAtar frame is one environment step (no frame skip).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
import tyro  # noqa: E402

from r2d2_algo.analysis import load_run_table, load_sweep  # noqa: E402

# MinAtar paper's DQN: (frames, return) read off its learning curves (see the docstring)
MINATAR_PAPER_DQN = {
    "Breakout": [(100_000, 4.4), (250_000, 6.8), (500_000, 8.3), (1_000_000, 9.2), (2_000_000, 9.6)],
    "SpaceInvaders": [(100_000, 16.7), (250_000, 21.4), (500_000, 28.0), (1_000_000, 32.7), (2_000_000, 41.4)],
}


@dataclass
class Args:
    configs: tuple[str, ...] = ("minigrid_memory", "minatar")
    """experiment_configs/ names whose runs to plot"""
    runs_dir: str = "runs"
    """the runs/ folder the scheduler wrote"""
    out: str = "write_and_test/figures/memory_pixels.png"
    """PNG to write"""


def main(args: Args) -> None:
    df = load_sweep(load_run_table(args.runs_dir, configs=list(args.configs)), ["eval/episodic_return"])
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
        game = env_id.rpartition("/")[2].partition("-")[0]
        env_steps = df.loc[df["env_id"] == env_id, "step"].max()
        if game in MINATAR_PAPER_DQN and env_steps > 300_000:  # the first runs (250k) stay without them
            frames, value = zip(*[p for p in MINATAR_PAPER_DQN[game] if p[0] <= env_steps])
            ax.plot(frames, value, "k--o", markersize=3, linewidth=1, label="MinAtar paper DQN (training)")
        ax.set_title(env_id.rpartition(":")[2], fontsize=10)
        ax.set_xlabel("environment steps")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("greedy evaluation return (ε = 0.001)")
    for ax in axes[0]:
        ax.legend(loc="upper left", fontsize=8)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
