"""Soak test: does a long run grow? Runs a command for a given time and samples its whole
process tree every --interval seconds.

    python benchmarks/soak.py --minutes 30 --label mp_local               # the default: the main job on Pong
    python benchmarks/soak.py --minutes 30 --label mp_central -- python r2d2_algo/r2d2_mp.py ... --inference central
    python benchmarks/soak.py --minutes 0.2 --interval 1 --label tiny -- python r2d2_algo/r2d2_mp.py --env-id CartPole-v1

Per sample (psutil, over the command's process and all its descendants): RSS summed (shared pages
counted once per process that maps them), PSS summed (shared pages split among the processes:
the machine's real use), USS summed (pages private to each process: where a leak shows), the
bytes of /dev/shm in use, open file descriptors, threads and the number of processes. After the
time it stops the command with Ctrl-C (SIGINT to its process group; it must exit 130 or 0) and
writes ``{label}.csv``, ``{label}.png`` (matplotlib) and ``{label}.json`` under --out-dir, and
prints a one-line verdict: growth per hour of each memory figure after the replay is full (the
first sample from which the replay size in the command's progress lines no longer grows; for a
command without them, once /dev/shm stops growing, else after a third of the run), by a
least-squares line through those samples. The goal (README, "Soak"): USS and PSS grow < 1 % per
hour, file descriptors and threads constant, /dev/shm at the replay's declared size.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import tyro

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = [sys.executable, str(ROOT / "r2d2_algo" / "r2d2_mp.py"), "--env-id", "PongNoFrameskip-v4",
                   "--buffer-size", "200000", "--eval-interval", "100000", "--eval-episodes", "2",
                   "--checkpoint-interval", "500000", "--total-timesteps", "1000000000", "--no-progress-bar",
                   "--log-interval", "10000"]


@dataclass
class Args:
    command: tyro.conf.Positional[list[str]] = field(default_factory=lambda: list(DEFAULT_COMMAND))
    """the command to soak (after --); default: r2d2_mp.py on Pong, a 200k replay (1.3 GiB), evaluations
    every 100k steps and checkpoints every 500k"""
    minutes: float = 30.0
    """how long to run it"""
    interval: float = 10.0
    """seconds between samples"""
    label: str = "soak"
    """name of the output files"""
    out_dir: str = str(ROOT / "benchmarks" / "results" / "soak")
    """folder of the CSV, plot and JSON"""
    cwd: str | None = None
    """working directory of the command (default: {out_dir}/{label}_workdir, kept: it holds the run's runs/ and
    checkpoints)"""


FIELDS = ["seconds", "rss_gib", "pss_gib", "uss_gib", "shm_gib", "fds", "threads", "processes", "replay_size"]


def shm_bytes(names_before: set[str]) -> int:
    """Bytes in use (allocated blocks) by the /dev/shm entries that were not there before the run."""
    total = 0
    for name in set(os.listdir("/dev/shm")) - names_before:
        try:
            total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
        except OSError:
            pass
    return total


def sample(root: psutil.Process, names_before: set[str]) -> dict:
    """One sample of the process tree of ``root`` (processes that vanish meanwhile are skipped)."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    rss = pss = uss = 0
    fds = threads = count = 0
    for p in processes:
        try:
            with p.oneshot():
                memory = p.memory_full_info()
                rss, pss, uss = rss + memory.rss, pss + getattr(memory, "pss", memory.rss), uss + memory.uss
                fds += p.num_fds()
                threads += p.num_threads()
                count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    gib = 2**30
    return {"rss_gib": rss / gib, "pss_gib": pss / gib, "uss_gib": uss / gib, "shm_gib": shm_bytes(names_before) / gib,
            "fds": fds, "threads": threads, "processes": count}


def growth_per_hour(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y over t (seconds), per hour, relative to y's mean (a fraction)."""
    if len(t) < 3 or np.mean(y) == 0:
        return float("nan")
    slope = np.polyfit(t, y, 1)[0]
    return float(slope * 3600 / np.mean(y))


def full_from(rows: list[dict]) -> int:
    """Index of the first sample of the steady state: the replay stops growing (from the command's
    own progress lines), else /dev/shm stops growing, else a third of the way in."""
    sizes = [r["replay_size"] for r in rows]
    if any(s > 0 for s in sizes):
        final = max(sizes)
        return next(i for i, s in enumerate(sizes) if s >= final)
    shm = np.array([r["shm_gib"] for r in rows])
    if shm.max() > 0:
        return int(np.argmax(shm >= 0.99 * shm.max()))
    return len(rows) // 3


def plot(rows: list[dict], start: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r["seconds"] for r in rows]) / 60
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in (("rss_gib", "RSS, summed"), ("pss_gib", "PSS, summed"), ("uss_gib", "USS, summed"),
                       ("shm_gib", "/dev/shm in use")):
        axes[0].plot(t, [r[key] for r in rows], label=label)
    axes[0].set_ylabel("GiB")
    axes[1].plot(t, [r["fds"] for r in rows], label="open file descriptors")
    axes[1].plot(t, [r["threads"] for r in rows], label="threads")
    axes[2].plot(t, [r["processes"] for r in rows], label="processes")
    for ax in axes:
        if start < len(t):
            ax.axvline(t[start], color="grey", linestyle=":", label="replay full")
        ax.set_xlabel("minutes")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> int:
    os.makedirs(args.out_dir, exist_ok=True)
    cwd = args.cwd or os.path.join(args.out_dir, f"{args.label}_workdir")
    os.makedirs(cwd, exist_ok=True)
    # the command runs in its own folder: paths in it that exist here are made absolute
    args.command = [os.path.abspath(a) if not os.path.isabs(a) and os.path.exists(a) and a != "python" else a
                    for a in args.command]
    names_before = set(os.listdir("/dev/shm"))
    log_path = os.path.join(args.out_dir, f"{args.label}.log")
    print(f"soak {args.label}: {shlex.join(args.command)} for {args.minutes:g} min, a sample every {args.interval:g} s "
          f"(log: {log_path})", flush=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(args.command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    replay = {"size": 0}

    def read_output() -> None:  # the command's progress lines: the replay's size
        for line in proc.stdout:
            log.write(line)
            log.flush()
            found = re.search(r"replay ([\d,]*\d)", line)
            if found and line.startswith("step"):
                replay["size"] = int(found.group(1).replace(",", ""))

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    rows, t0 = [], time.time()
    deadline = t0 + args.minutes * 60
    while time.time() < deadline and proc.poll() is None:
        rows.append({"seconds": time.time() - t0, **sample(root, names_before), "replay_size": replay["size"]})
        time.sleep(max(0.0, min(args.interval, deadline - time.time())))
    ended_early = proc.poll() is not None
    if not ended_early:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the run writes its last checkpoint and stops
    try:
        returncode = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
    reader.join(timeout=10)
    log.close()
    time.sleep(1)
    left_shm = shm_bytes(names_before)
    left_processes = [p.pid for p in psutil.process_iter(["pid"]) if _in_session(p, proc.pid)]

    csv_path = os.path.join(args.out_dir, f"{args.label}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = analyze(rows, args.label, args.command, args.out_dir)
    summary.update(returncode=returncode, ended_before_the_time=ended_early, shm_gib_left_after_exit=left_shm / 2**30,
                   processes_left_after_exit=len(left_processes))
    with open(os.path.join(args.out_dir, f"{args.label}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['verdict']}; exit {returncode}, left after exit: {len(left_processes)} processes, "
          f"{left_shm / 2**20:.0f} MiB /dev/shm", flush=True)
    print(f"wrote {csv_path}, {args.label}.png and {args.label}.json", flush=True)
    clean = returncode in (0, 130) and not left_processes and left_shm == 0
    return 0 if clean else 1


def analyze(rows: list[dict], label: str, command: list[str], out_dir: str) -> dict:
    """The steady state's figures, the plot, and the verdict line. Memory growth is taken two ways:
    the least-squares slope through every sample, and through the peak of each 2-minute block (a
    learner that frees and re-allocates its activations every update swings by a GiB between
    samples; the peaks are what fills a machine). Both as a fraction of the steady mean, per hour."""
    start = full_from(rows) if rows else 0
    steady = rows[start:]
    t = np.array([r["seconds"] for r in steady])
    summary = {"label": label, "command": command, "minutes": (rows[-1]["seconds"] / 60) if rows else 0.0,
               "samples": len(rows), "steady_from_minute": (rows[start]["seconds"] / 60) if rows else None}
    for key in ("rss_gib", "pss_gib", "uss_gib", "shm_gib"):
        y = np.array([r[key] for r in steady])
        summary[f"{key}_steady_mean"] = float(y.mean()) if len(y) else float("nan")
        summary[f"{key}_steady_max"] = float(y.max()) if len(y) else float("nan")
        summary[f"{key}_growth_per_hour"] = growth_per_hour(t, y)
        blocks = [(t[(t >= b) & (t < b + 120)], y[(t >= b) & (t < b + 120)]) for b in np.arange(t.min(), t.max(), 120)] \
            if len(t) else []
        peaks = [(bt[np.argmax(by)], by.max()) for bt, by in blocks if len(by)]
        summary[f"{key}_peak_growth_per_hour"] = growth_per_hour(np.array([p[0] for p in peaks]),
                                                                 np.array([p[1] for p in peaks])) \
            if len(peaks) >= 3 else float("nan")
    for key in ("fds", "threads", "processes"):
        values = [r[key] for r in steady]
        summary[f"{key}_steady_range"] = [min(values), max(values)] if values else None
    if rows:
        name = os.path.basename(command[1]) if len(command) > 1 else command[0]
        plot(rows, start, os.path.join(out_dir, f"{label}.png"), f"{label}: {name}")
    s = summary
    summary["verdict"] = (
        f"{label}: {s['minutes']:.1f} min, steady from minute {s['steady_from_minute'] or 0:.1f}: "
        + ", ".join(f"{name} {s[key + '_steady_mean']:.2f} GiB (peak {s[key + '_steady_max']:.2f}) "
                    f"{100 * s[key + '_growth_per_hour']:+.1f} %/h, peaks {100 * s[key + '_peak_growth_per_hour']:+.1f} %/h"
                    for name, key in (("USS", "uss_gib"), ("PSS", "pss_gib"), ("RSS", "rss_gib")))
        + f", /dev/shm {s['shm_gib_steady_mean']:.2f} GiB, fds {s['fds_steady_range']}, threads "
          f"{s['threads_steady_range']}, processes {s['processes_steady_range']}")
    return summary


def reanalyze(csv_path: str) -> dict:
    """``analyze`` again on a soak's CSV and JSON (the JSON's command and exit figures are kept)."""
    with open(csv_path) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    json_path = csv_path[: -len(".csv")] + ".json"
    old = json.load(open(json_path)) if os.path.exists(json_path) else {}
    label = os.path.basename(csv_path)[: -len(".csv")]
    summary = {**old, **analyze(rows, label, old.get("command", ["?"]), os.path.dirname(csv_path))}
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _in_session(p: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reanalyze":  # python benchmarks/soak.py --reanalyze RUN.csv
        print(reanalyze(sys.argv[2])["verdict"])
        sys.exit(0)
    sys.exit(main(tyro.cli(Args)))
