"""Plot one run folder's curves: returns, TD loss, SPS and parameter lag against environment steps
and against wall-clock time, in one PNG (`r2d2_algo.analysis.plot_run`).

    python write_and_test/plot_run.py runs/CartPole-v1__r2d2__1__1796689352
    python write_and_test/plot_run.py runs/* --out-dir write_and_test/figures

Works on a run of any script (r2d2.py, r2d2_mp.py, r2d2_ray.py), finished or still going; a curve
the run did not log (r2d2.py has no parameter lag to speak of, a run with --eval-interval 0 no
evaluations) is a panel that says so. Each run's figure goes to {run folder}/curves.png unless
--out or --out-dir says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

from r2d2_algo.analysis import plot_run  # noqa: E402


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[list[str]]
    """tensorboard run folders (runs/{run_name}), one figure each"""
    out: str | None = None
    """PNG to write (one run folder only; default: {run folder}/curves.png)"""
    out_dir: str | None = None
    """folder for the PNGs, named {run_name}.png (default: each run's own folder, curves.png)"""


def main(args: Args) -> None:
    if args.out is not None and (len(args.run_dirs) > 1 or args.out_dir is not None):
        raise SystemExit("plot_run.py: error: --out names one PNG: give one run folder and no --out-dir")
    for run_dir in args.run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        out = args.out or (os.path.join(args.out_dir, f"{name}.png") if args.out_dir else
                           os.path.join(run_dir, "curves.png"))
        try:
            fig = plot_run(run_dir, out)
        except FileNotFoundError as e:  # not a run folder (no event file), or no such folder
            raise SystemExit(f"plot_run.py: error: {e}") from None
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
