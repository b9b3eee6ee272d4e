"""Draws the two process pictures of docs/architecture.md with matplotlib's patches and arrows.

    python docs/figures/architecture.py      # writes docs/figures/architecture_mp.png, architecture_ray.png

Run once by hand when the processes change; the PNGs are committed. Boxes are processes (solid) or
optional processes (dashed); grey panels are the buffers between them; arrows say what crosses.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
PROCESS = "#dbe9f6"      # a process (or a Ray actor)
THREAD = "#ffffff"       # a thread inside a process
BUFFER = "#eeeeee"       # shared memory, queues, Ray's object store
BUFFER_PART = "#fff6d5"  # one named part of a buffer
EDGE = "#333333"


def box(ax, x, y, w, h, title, body="", color=PROCESS, dashed=False, size=8.5, title_size=10):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=color, ec=EDGE,
                                lw=1.2, ls="--" if dashed else "-"))
    ax.text(x + 0.12, y + h - 0.12, title, ha="left", va="top", fontsize=title_size, fontweight="bold")
    if body:
        ax.text(x + 0.12, y + h - 0.45, body, ha="left", va="top", fontsize=size, linespacing=1.3)


def arrow(ax, start, end, label="", both=False, label_at=0.5, offset=(0.0, 0.12), ha="center", style="-",
          rad=0.0, size=8):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=13, lw=1.3,
                                 color=EDGE, ls=style, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if label:
        x = start[0] + (end[0] - start[0]) * label_at + offset[0]
        y = start[1] + (end[1] - start[1]) * label_at + offset[1]
        ax.text(x, y, label, ha=ha, va="bottom", fontsize=size, linespacing=1.2,
                bbox=dict(fc="white", ec="none", alpha=0.85, pad=0.5))


def canvas(width, height):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def path(ax, points, label="", label_xy=None, both=False, size=7.5, style="-"):
    """A polyline whose last leg ends in an arrow head (and its first leg too with ``both``)."""
    xs, ys = zip(*points)
    ax.plot(xs[1:-1] if both else xs[:-1], ys[1:-1] if both else ys[:-1], color=EDGE, lw=1.3, ls=style)
    arrow(ax, points[-2], points[-1], style=style)
    if both:
        arrow(ax, points[1], points[0], style=style)
    if label:
        ax.text(*label_xy, label, ha="center", va="center", fontsize=size, linespacing=1.2,
                bbox=dict(fc="white", ec="none", alpha=0.9, pad=0.5))


def r2d2_mp():
    fig, ax = canvas(17.5, 11)
    ax.text(8.75, 10.85, "r2d2_mp.py: processes (blue), threads (white) and the buffers between them (grey)",
            ha="center", va="top", fontsize=13, fontweight="bold")

    # left column: the actors, central inference, the evaluator
    for k, dx in enumerate((0.24, 0.12, 0.0)):  # a stack of N, fanned up and to the left
        box(ax, 0.54 - dx, 5.8 + dx, 3.86, 3.95, "" if k < 2 else "actor × N  (--num-actors)",
            "" if k < 2 else "one OS process each\nE envs stepped in ale-py's C++ threads,\nin --env-splits halves "
            "(double buffering)\nenv j of actor i: one rung of the ε ladder\nand one replay stream\n"
            "--inference local: a CPU copy of the\nnetwork acts\n--inference central: the inference\n"
            "process acts for it")
    box(ax, 0.3, 3.4, 4.1, 2.1, "central inference  (optional)",
        "--inference central (auto: with a GPU learner)\none process on the learner's device: one\n"
        "forward pass for every request at hand;\nholds every env's recurrent state", dashed=True, size=8)
    box(ax, 0.3, 0.35, 4.1, 2.5, "evaluator",
        "one process, nice 10, CPU\nplays --eval-episodes episodes at\nε = --eval-epsilon with the params\n"
        "published for it, while the\nlearner goes on", size=8)

    # middle: shared memory, then the queues
    box(ax, 6.0, 3.4, 5.0, 6.8, "shared memory  (/dev/shm; create_shared_memory)", color=BUFFER)
    box(ax, 6.2, 8.2, 4.6, 1.4, "replay", "per stream: obs (one frame for Atari), action,\nreward, first, "
        "terminated, truncated, write count\nper sequence: stored state, previous action, reward",
        color=BUFFER_PART, size=7.5, title_size=9)
    box(ax, 6.2, 6.95, 4.6, 1.1, "param store", "params (one float32 vector), version, lock;\n"
        "params wanted: a flag per actor and the inference", color=BUFFER_PART, size=7.5, title_size=9)
    box(ax, 6.2, 5.7, 4.6, 1.1, "counters and flags", "actor steps, the params version each acts with;\n"
        "pause / actor paused (checkpoints); allowed steps", color=BUFFER_PART, size=7.5, title_size=9)
    box(ax, 6.2, 3.6, 4.6, 1.95, "inference slots  (central only)", "one per actor: observations, previous "
        "action\nand reward, first flags in; greedy actions and\nthe states that entered the step out;\n"
        "a semaphore each way", color=BUFFER_PART, size=7.5, title_size=9, dashed=True)
    box(ax, 6.0, 0.35, 5.0, 2.6, "queues and events  (multiprocessing)", "", color=BUFFER)
    ax.text(6.15, 2.35, "episode queue per actor: returns, lengths\nerror queue: tracebacks of any child\n"
            "eval requests: learner → evaluator\neval results: evaluator → learner\n"
            "stop event: learner → every child", ha="left", va="top", fontsize=8, linespacing=1.35)

    # right column: the learner's threads
    box(ax, 12.4, 0.35, 4.8, 9.85, "learner  (main process; GPU if any)")
    box(ax, 12.6, 8.2, 4.4, 1.4, "prefetch thread", "syncs the replay index with the write counts;\n"
        "samples prioritized windows ahead, applies\npriority updates; page-locked batches (CUDA)",
        color=THREAD, size=7.5, title_size=9)
    box(ax, 12.6, 3.3, 4.4, 4.25, "main thread", "burn-in + n-step double-Q loss, Adam,\ntarget copies\n"
        "publishes params when one asked\nraises the allowance after each update\n(--min-replay-ratio)\n"
        "pauses the actors to write a checkpoint\nasks for evaluations, logs", color=THREAD, size=8,
        title_size=9)
    box(ax, 12.6, 0.55, 4.4, 2.3, "supervisor  (main thread)", "starts the processes, watches them,\n"
        "restarts a dead actor (cut streams,\n--max-actor-restarts), stops them all", color=THREAD, size=8,
        title_size=9)
    arrow(ax, (14.0, 8.2), (14.0, 7.55), "batches", label_at=0.5, offset=(-0.1, -0.1), ha="right", size=7.5)
    arrow(ax, (15.6, 7.55), (15.6, 8.2), "priorities", label_at=0.5, offset=(0.1, -0.1), ha="left", size=7.5)

    # actors ↔ shared memory
    arrow(ax, (4.4, 8.9), (6.2, 8.9), "write steps\n(no pickling)", offset=(0, 0.08), size=7.5)
    arrow(ax, (6.2, 7.55), (4.4, 7.55), "ask; fetch params every\n--actor-update-interval", both=True,
          offset=(0, 0.08), size=7.5)
    arrow(ax, (6.2, 6.45), (4.4, 6.45), "wait while paused or\npast the allowance", both=True, offset=(0, 0.08),
          size=7.5)
    # central inference ↔ its slots, and the actors' side of the slots
    arrow(ax, (4.4, 4.3), (6.2, 4.3), "forward passes", both=True, offset=(0, 0.08), size=7.5)
    arrow(ax, (4.4, 5.95), (6.2, 5.0), "", both=True)
    ax.text(5.55, 5.25, "requests", fontsize=7.5, ha="center", bbox=dict(fc="white", ec="none", alpha=0.9, pad=0.5))
    # the param store's readers besides the actors: a bus down the gap
    path(ax, [(6.2, 7.15), (5.0, 7.15), (5.0, 3.7), (4.4, 3.7)], "params", (5.0, 3.95))
    path(ax, [(5.0, 3.7), (5.0, 2.3), (4.4, 2.3)])
    # queues: episodes and errors in, evaluations out and back
    path(ax, [(4.4, 6.05), (5.6, 6.05), (5.6, 2.65), (6.0, 2.65)], "episodes,\nerrors", (5.6, 3.0))
    arrow(ax, (4.4, 1.2), (6.0, 1.2), "eval requests,\nresults", both=True, offset=(0, 0.08), size=7.5)

    # learner ↔ shared memory and queues
    arrow(ax, (10.8, 8.9), (12.6, 8.9), "sample windows\n(copies)", offset=(0, 0.08), size=7.5)
    arrow(ax, (12.6, 7.3), (10.8, 7.3), "publish", offset=(0, 0.08), size=7.5)
    arrow(ax, (12.6, 6.25), (10.8, 6.25), "pause, allowance;\nread steps", both=True, offset=(0, 0.08), size=7.5)
    arrow(ax, (11.0, 1.6), (12.6, 1.6), "", both=True)

    fig.savefig(HERE / "architecture_mp.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def r2d2_ray():
    fig, ax = canvas(15, 7.4)
    ax.text(7.5, 7.2, "r2d2_ray.py: Ray actors (blue), the driver, and what crosses between them", ha="center",
            va="top", fontsize=13, fontweight="bold")
    ax.text(7.5, 6.75, "arrays cross through Ray's object store (in /dev/shm on each node)", ha="center",
            fontsize=9, style="italic")
    for k, dx in enumerate((0.24, 0.12, 0.0)):
        box(ax, 0.54 - dx, 3.5 + dx, 3.76, 2.6, "" if k < 2 else "actor × N  (Ray actors)",
            "" if k < 2 else "one CPU each, on any node\nE envs, a CPU copy of the network,\nε-greedy, one rung per env\n"
            "restarted by Ray when it dies\n(--max-actor-restarts)", size=8)
    box(ax, 5.6, 3.6, 3.9, 2.5, "replay shard × K", "a SequenceReplayBuffer for the\nstreams of its actors;\n"
        "its share of --total-timesteps;\nthe --min-replay-ratio limiter", size=8)
    box(ax, 5.6, 0.5, 3.9, 2.3, "param store", "the newest params (one ray.put)\nand their version; the "
        "allowance\nthe actors wait on", size=8)
    box(ax, 0.3, 0.5, 4.0, 2.1, "evaluator", "plays --eval-episodes episodes\nwith published params", size=8)
    box(ax, 10.8, 0.5, 3.9, 5.6, "driver")
    box(ax, 11.0, 0.7, 3.5, 3.65, "learner", "samples the shards (each batch\nfrom one shard, drawn by its sum\n"
        "of p^α), loss, Adam, target\ncopies; publishes params when\nasked; checkpoints, logs", color=THREAD,
        size=8, title_size=9)
    box(ax, 11.0, 4.5, 3.5, 1.25, "supervisor", "places the roles (--role-nodes),\nwatches, rebuilds a lost one",
        color=THREAD, size=8, title_size=9)

    arrow(ax, (4.3, 5.0), (5.6, 5.0), "push step blocks\n(≤ 2 in flight)", offset=(0, 0.08), size=7.5)
    arrow(ax, (9.5, 4.1), (11.0, 4.1), "batches (≤ --samples-\nin-flight)", offset=(0, 0.08), size=7.5)
    arrow(ax, (11.0, 3.85), (9.5, 3.85), "priorities,\nallowance", offset=(0, -0.6), size=7.5)
    arrow(ax, (11.0, 2.2), (9.5, 1.8), "publish", label_at=0.5, offset=(0.0, 0.05), size=7.5)
    arrow(ax, (5.6, 2.4), (3.0, 3.5), "ask, fetch params;\nwait past the allowance", both=True, label_at=0.5,
          offset=(0.0, -0.05), size=7.5)
    arrow(ax, (5.6, 1.2), (4.3, 1.2), "params", offset=(0, 0.05), size=7.5)
    path(ax, [(11.0, 0.9), (10.15, 0.9), (10.15, 0.15), (2.3, 0.15), (2.3, 0.5)], "evaluation requests / results",
         (7.5, 0.15), both=True)
    fig.savefig(HERE / "architecture_ray.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    r2d2_mp()
    r2d2_ray()
