"""Load tensorboard runs into pandas for plots and tables; aggregate seeds.

    runs = load_run_table("runs", configs=["cartpole_study"])     # one row per done run + its config values
    df = load_sweep(runs, ["eval/episodic_return", "charts/SPS"])  # long scalars, config values attached
    curves = summarize(df, by=["sequence_length"], tag="eval/episodic_return")   # mean and band over seeds
    plot_summary(curves, by=["sequence_length"])
    run_summary_table(df, by=["sequence_length"])                 # final / best return, SPS per config
    plot_run("runs/CartPole-v1__r2d2__1__...", out="curves.png")  # one run: every curve vs steps and time

`plot_run` draws one run folder of any script (r2d2.py, r2d2_mp.py, r2d2_ray.py) whatever tags it
logged; `write_and_test/plot_run.py` is its command line.

Runs started by `scheduler.py` carry their config values in the scheduler's records
(runs/_scheduler/); every run folder also holds the script's arguments as `args.json`
(`runs_from_folders`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r2d2_algo.experiments import read_records

BANDS = ("ci95", "sem", "std", "range")


def load_scalars(run_dirs: list[str | Path], tags: list[str] | None = None) -> pd.DataFrame:
    """Scalars of tensorboard run folders as a long DataFrame.

    Args:
        run_dirs: folders written by SummaryWriter (e.g. runs/CartPole-v1__r2d2__1__...).
        tags: scalar tags to keep (default: all).
    Returns:
        DataFrame with columns run (folder name), tag, step, value, wall_time (seconds since the
        run's first event).
    Raises:
        FileNotFoundError: a folder holds no event file.
    """
    frames = []
    for run_dir in map(Path, run_dirs):
        if not any(run_dir.glob("events.out.tfevents.*")):
            raise FileNotFoundError(f"no tensorboard event file in {run_dir}")
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tags is None or tag in tags:
                events = acc.Scalars(tag)
                frames.append(pd.DataFrame({"run": run_dir.name, "tag": tag, "step": [e.step for e in events],
                                            "value": [e.value for e in events],
                                            "wall_time": [e.wall_time for e in events]}))
    if not frames:
        return pd.DataFrame(columns=["run", "tag", "step", "value", "wall_time"])
    df = pd.concat(frames, ignore_index=True)
    df["wall_time"] -= df.groupby("run")["wall_time"].transform("min")
    return df


def load_hparams(run_dir: str | Path) -> dict:
    """The arguments of a run: the ``args.json`` the training scripts write in its folder; {} if none."""
    path = Path(run_dir) / "args.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_run_table(runs_dir: str | Path = "runs", configs: list[str] | None = None,
                   states: tuple[str, ...] | None = ("done",)) -> pd.DataFrame:
    """One row per run recorded by scheduler.py, with its config values as columns.

    Args:
        runs_dir: the runs/ folder (the records are in runs/_scheduler/).
        configs: config names (file stems) to keep (default: all).
        states: record states to keep (default: done runs only, so an interrupted or failed
            attempt is never counted; None: all).
    Returns:
        DataFrame with columns run (folder name, the key of `load_scalars`), run_dir, run_id,
        config, exp_name, state, exit_code, attempts, log, then one column per config value
        (seed, and every args / grid key; a key a config does not set is NaN there). Rows whose
        run folder is missing have run = run_dir = None.
    """
    rows = []
    for record in read_records(runs_dir, configs):
        if states is not None and record["state"] not in states:
            continue
        run_dir = record.get("run_dir")
        if run_dir is not None:  # recorded relative to the scheduler's working directory
            run_dir = str(Path(runs_dir) / Path(run_dir).name)
        rows.append({"run": Path(run_dir).name if run_dir else None, "run_dir": run_dir, "run_id": record["run_id"],
                     "config": record["config_name"], "exp_name": record["exp_name"], "state": record["state"],
                     "exit_code": record["exit_code"], "attempts": record["attempts"], "log": record["log"],
                     **record["values"]})
    return pd.DataFrame(rows, columns=None if rows else ["run", "run_dir", "run_id", "config", "seed"])


def runs_from_folders(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per tensorboard folder (any run, scheduled or not), its logged arguments as columns.

    Returns DataFrame with columns run (folder name), run_dir, then the hyperparameters."""
    return pd.DataFrame([{"run": Path(d).name, "run_dir": str(d), **load_hparams(d)} for d in run_dirs])


def load_sweep(runs: pd.DataFrame, tags: list[str] | None = None) -> pd.DataFrame:
    """Scalars of the runs of a run table (`load_run_table` or `runs_from_folders`), each row
    carrying its run's columns (config values), so any of them can group curves.

    Returns the columns of `load_scalars` plus those of `runs`. Raises FileNotFoundError for a
    run folder without events; rows without a run folder are skipped."""
    runs = runs[runs["run_dir"].notna()]
    scalars = load_scalars(list(runs["run_dir"]), tags)
    return scalars.merge(runs.drop(columns=["run_dir"]), on="run", how="left")


def _group_label(by: list[str], key) -> str:
    key = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{k}={v}" for k, v in zip(by, key)) if by else "all runs"


def _band(values: np.ndarray, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lower and upper edges over axis 0 (runs). values: (runs, points)."""
    from scipy import stats

    n = values.shape[0]
    mean = values.mean(axis=0)
    if band == "range":
        return mean, values.min(axis=0), values.max(axis=0)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    std = values.std(axis=0, ddof=1)
    half = {"std": std, "sem": std / np.sqrt(n), "ci95": stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)}[band]
    return mean, mean - half, mean + half


def summarize(df: pd.DataFrame, by: list[str], tag: str = "eval/episodic_return", x: str = "step",
              num_points: int = 100, band: str = "ci95") -> pd.DataFrame:
    """Mean and band across the runs (seeds) of each group, on a common grid of x.

    Each run's curve is linearly interpolated onto num_points evenly spaced x values spanning the
    range all runs of the group cover (no extrapolation), so seeds logged at different steps or
    times average correctly.

    Args:
        df: long scalars with config columns (`load_sweep`).
        by: columns that define a group (e.g. ["sequence_length", "burn_in_length"]); [] pools all.
        tag: the scalar to aggregate.
        x: "step" (environment steps) or "wall_time" (seconds since the run started).
        band: "ci95" (Student-t 95% interval of the mean), "sem", "std" or "range" (min..max).
    Returns:
        DataFrame with columns *by, x, mean, lower, upper, n (runs in the group); lower = upper = mean
        for a group of one run (except band="range").
    Raises:
        ValueError: an unknown band, or a `by` column missing from df.
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise ValueError(f"no column {missing} in the runs (columns: {sorted(map(str, df.columns))})")
    df = df[df["tag"] == tag]
    frames = []
    for key, group in (df.groupby(by, sort=True, dropna=False) if by else [((), df)]):
        curves = [run.groupby(x)["value"].last().sort_index() for _, run in group.groupby("run")]
        lo, hi = max(c.index[0] for c in curves), min(c.index[-1] for c in curves)
        if lo > hi:
            continue  # the runs do not overlap in x
        grid = np.linspace(lo, hi, num_points) if hi > lo else np.array([lo], dtype=float)
        values = np.stack([np.interp(grid, c.index.to_numpy(float), c.to_numpy(float)) for c in curves])
        mean, lower, upper = _band(values, band)
        frame = pd.DataFrame({x: grid, "mean": mean, "lower": lower, "upper": upper, "n": len(curves)})
        for column, value in zip(by, key if isinstance(key, tuple) else (key,)):
            frame.insert(0, column, value)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*by, x, "mean", "lower", "upper", "n"])
    return pd.concat(frames, ignore_index=True)[[*by, x, "mean", "lower", "upper", "n"]]


def plot_summary(summary: pd.DataFrame, by: list[str], x: str = "step", ax=None, title: str = "",
                 ylabel: str = "eval/episodic_return"):
    """One line (mean) and shaded band per group of `summarize`'s output; returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    groups = summary.groupby(by, sort=True) if by else [((), summary)]
    for i, (key, group) in enumerate(groups):
        color = f"C{i % 10}"
        ax.plot(group[x], group["mean"], color=color, linewidth=2,
                label=f"{_group_label(by, key)} (n={int(group['n'].iloc[0])})")
        ax.fill_between(group[x], group["lower"], group["upper"], color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel({"step": "environment steps", "wall_time": "wall-clock seconds"}.get(x, x))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def run_summary_table(df: pd.DataFrame, by: list[str], return_tag: str = "eval/episodic_return",
                      sps_tag: str = "charts/SPS") -> pd.DataFrame:
    """Per group: final and best return, SPS and wall-clock, mean and std across runs (seeds).

    Per run: final = the return at the last step logged, best = its maximum over the run,
    SPS = environment steps per second between the first and the last `sps_tag` event (steps
    over wall-clock time, whatever the log interval; a mean of the logged values would weight
    fast stretches by their number of logs), wall_clock = seconds from the first to the last event.

    Returns DataFrame indexed by `by` with columns runs, then {final_return, best_return, SPS,
    wall_clock}_{mean, std}."""
    per_run = []
    for run, group in df.groupby("run"):
        returns = group[group["tag"] == return_tag].sort_values("step")
        sps = group[group["tag"] == sps_tag].sort_values("step")
        elapsed = sps["wall_time"].iloc[-1] - sps["wall_time"].iloc[0] if len(sps) > 1 else 0.0
        per_run.append({"run": run, **{c: group[c].iloc[0] for c in by},
                        "final_return": returns["value"].iloc[-1] if len(returns) else np.nan,
                        "best_return": returns["value"].max() if len(returns) else np.nan,
                        "SPS": (sps["step"].iloc[-1] - sps["step"].iloc[0]) / elapsed if elapsed > 0 else np.nan,
                        "wall_clock": group["wall_time"].max()})
    per_run = pd.DataFrame(per_run)
    grouped = per_run.groupby(by, sort=True) if by else per_run.assign(_all="all runs").groupby("_all")
    table = grouped[["final_return", "best_return", "SPS", "wall_clock"]].agg(["mean", "std"])
    table.columns = [f"{a}_{b}" for a, b in table.columns]
    table.insert(0, "runs", grouped.size())
    return table


RUN_PANELS = (
    ("episodic return", ("eval/episodic_return", "charts/episodic_return"), "return"),
    ("TD loss", ("losses/td_loss",), "½ δ² (rescaled values)"),
    ("SPS", ("charts/SPS",), "environment steps / s"),
    ("parameter lag", ("charts/parameter_lag",), "learner updates"),
)
"""The rows of `plot_run`: a title, the tags drawn in it (a row is drawn if any is logged), the y label."""


def _wall_clock_unit(seconds: float) -> tuple[str, float]:
    """A unit to show ``seconds`` of wall-clock in, and its length in seconds."""
    return ("s", 1.0) if seconds < 600 else ("min", 60.0) if seconds < 3 * 3600 else ("h", 3600.0)


def _draw_run_panel(ax, df: pd.DataFrame, title: str, tags: tuple[str, ...], x: str, scale: float) -> bool:
    """One panel of `plot_run`: ``tags`` of the long scalars ``df`` against ``x`` ("step", or
    "wall_time" divided by ``scale``); returns False, and says so in the panel, when none is logged."""
    curves = {tag: df[df["tag"] == tag].sort_values("step") for tag in tags}
    if all(curve.empty for curve in curves.values()):
        ax.text(0.5, 0.5, f"not logged by this run\n({', '.join(tags)})", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
        ax.set_yticks([])  # the x axis is shared with the column's other panels
        return False
    for i, (tag, curve) in enumerate(curves.items()):
        if curve.empty:
            continue
        xs, ys = curve[x].to_numpy(float) / scale, curve["value"].to_numpy(float)
        if tag == "charts/episodic_return":  # many noisy points: dots and a running mean over ~1 % of them
            window = max(20, len(curve) // 100)
            ax.plot(xs, ys, ".", color=f"C{i}", alpha=0.15, markersize=3)
            ys = curve["value"].rolling(window, min_periods=1).mean().to_numpy()
            ax.plot(xs, ys, color=f"C{i}", linewidth=1.5, label=f"training episodes (ε-greedy), mean of {window}")
        elif tag == "eval/episodic_return":
            ax.plot(xs, ys, "o-", color=f"C{i}", markersize=3, linewidth=2, label="evaluation (greedy), mean ± std",
                    zorder=3)
            std = df[df["tag"] == "eval/episodic_return_std"].sort_values("step")
            if len(std) == len(curve) and (std["step"].to_numpy() == curve["step"].to_numpy()).all():
                band = std["value"].to_numpy(float)
                ax.fill_between(xs, ys - band, ys + band, color=f"C{i}", alpha=0.2, linewidth=0)
        else:
            ax.plot(xs, ys, color=f"C{i}", linewidth=1.5, label=tag)
    values = df[df["tag"].isin(tags)]["value"]
    if title in ("TD loss", "SPS") and (values > 0).all() and values.max() > 30 * values.min():
        ax.set_yscale("log")  # SPS before and after learning starts, a loss over decades
    if title == "parameter lag" and (values == 0).all():  # r2d2.py: one process acts and learns
        ax.text(0.5, 0.6, "0 throughout: the actors act with the learner's current parameters", ha="center",
                va="center", transform=ax.transAxes, fontsize=8, color="0.3")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True


def plot_run(run_dir: str | Path, out: str | Path | None = None):
    """One figure of one run's curves, whatever script wrote it: the rows of `RUN_PANELS`
    (episodic return of the evaluations and of the training episodes, TD loss, SPS, parameter
    lag in learner updates), each against environment steps (left) and wall-clock time since the
    run's first event (right). A row whose tags the run did not log (an evaluation turned off; a
    run still before its first update) says so in its panels.

    Args:
        run_dir: a tensorboard run folder (runs/{run_name}).
        out: PNG to write (folders made); None: write nothing.
    Returns:
        the matplotlib Figure; its axes are titled "{row title} vs steps" and "{row title} vs wall-clock".
    Raises:
        FileNotFoundError: the folder holds no event file.
    """
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    df = load_scalars([run_dir])  # every tag: wall-clock counts from the run's first scalar, whatever its tag
    unit, scale = _wall_clock_unit(float(df["wall_time"].max()) if len(df) else 0.0)
    fig, axes = plt.subplots(len(RUN_PANELS), 2, figsize=(11, 2.4 * len(RUN_PANELS) + 0.6), sharex="col",
                             squeeze=False)
    for (title, row_tags, ylabel), (ax_steps, ax_time) in zip(RUN_PANELS, axes):
        if _draw_run_panel(ax_steps, df, title, row_tags, "step", 1.0):
            ax_steps.set_ylabel(ylabel, fontsize=9)
        _draw_run_panel(ax_time, df, title, row_tags, "wall_time", scale)
        ax_steps.set_title(f"{title} vs steps", fontsize=10)
        ax_time.set_title(f"{title} vs wall-clock", fontsize=10)
    axes[-1, 0].set_xlabel("environment steps")
    axes[-1, 1].set_xlabel(f"wall-clock since the run's first log ({unit})")
    args = load_hparams(run_dir)
    evals = df[df["tag"] == "eval/episodic_return"].sort_values("step")
    last = (f"; last evaluation {evals['value'].iloc[-1]:.1f} at {evals['step'].iloc[-1]:,} steps"
            if len(evals) else "")
    script = f"{args['exp_name']}, " if "exp_name" in args else ""
    fig.suptitle(f"{run_dir.name}\n{script}{args.get('env_id', '')}{last}", fontsize=10)
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig
