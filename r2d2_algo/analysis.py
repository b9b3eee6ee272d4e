"""Load tensorboard runs into pandas for plots and tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


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
