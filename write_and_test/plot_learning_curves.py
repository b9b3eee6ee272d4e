"""Plot eval/episodic_return against environment steps for groups of tensorboard runs.

    python write_and_test/plot_learning_curves.py --groups "LSTM=runs/CartPoleNoVelocity-v1__lstm*" \
        "none=runs/CartPoleNoVelocity-v1__none*" --out write_and_test/figures/masked_cartpole.png

Each group is LABEL=GLOB; a group's runs (seeds) are drawn thin, their mean thick.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

from r2d2_algo.analysis import load_scalars  # noqa: E402


@dataclass
class Args:
    groups: list[str]
    """LABEL=GLOB pairs, one curve group per label"""
    out: str = "write_and_test/figures/learning_curves.png"
    """PNG to write"""
    tag: str = "eval/episodic_return"
    """scalar to plot"""
    title: str = ""
    """figure title"""
    hline: float | None = None
    """draw a dashed horizontal line at this value (e.g. a success threshold)"""


def main(args: Args) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, group in enumerate(args.groups):
        label, _, pattern = group.partition("=")
        run_dirs = sorted(glob.glob(pattern))
        if not run_dirs:
            raise SystemExit(f"plot_learning_curves.py: error: no run folder matches {pattern!r}")
        df = load_scalars(run_dirs, [args.tag])
        color = f"C{i}"
        for _, run in df.groupby("run"):
            ax.plot(run["step"], run["value"], color=color, alpha=0.3, linewidth=1)
        mean = df.groupby("step")["value"].mean()
        ax.plot(mean.index, mean.values, color=color, linewidth=2.5, label=f"{label} (mean of {len(run_dirs)})")
    if args.hline is not None:
        ax.axhline(args.hline, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(args.tag)
    ax.set_title(args.title)
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
