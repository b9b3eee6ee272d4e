"""Clean up after an embedded Ray whose driver died without stopping it (SIGKILL, the OOM killer).

When its driver dies, Ray takes the raylet, the GCS and every worker down at once, but its
dashboard and runtime-env agents first wait 60 s on the dead GCS (to report the raylet's death),
and nothing removes the session folder. ``r2d2_ray.py`` therefore starts this file as a process
of its own, in a new session (signals to the run's process group do not reach it), right after
``ray.init``:

    python r2d2_algo/ray_reaper.py FOLDER PID:START_TIME ...

FOLDER is the run's Ray folder; each PID:START_TIME is one of Ray's processes then (START_TIME:
field 22 of /proc/PID/stat, so a reused pid is never touched). It reads its stdin, a pipe only
the driver holds, to the end: the driver writes ``done`` there after it has shut Ray down and
removed the folder. The end of the pipe without ``done`` means the driver died: it SIGKILLs those
of the processes still alive and removes the folder. Linux only (/proc); stdlib only.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if there is no such process."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def descendants(pid: int) -> list[str]:
    """Every live descendant of ``pid`` as ``PID:START_TIME`` (the arguments of this file)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        started = start_time(child)
        if started is not None:
            found.append(f"{child}:{started}")
        todo.extend(children.get(child, []))
    return found


def reap(folder: str, processes: list[str]) -> None:
    """SIGKILL each ``PID:START_TIME`` still alive (and the same process), wait up to 5 s for them
    to go, then remove ``folder``."""
    alive = []
    for entry in processes:
        pid, started = entry.split(":")
        if start_time(int(pid)) == started:
            try:
                os.kill(int(pid), signal.SIGKILL)
                alive.append((int(pid), started))
            except OSError:
                pass
    deadline = time.time() + 5
    while alive and time.time() < deadline:  # gone, or a zombie whose parent (also killed) left it to init
        alive = [(pid, started) for pid, started in alive
                 if (stat_fields(pid) or ["Z"])[0] != "Z" and start_time(pid) == started]
        time.sleep(0.1)
    for _ in range(3):  # a worker still exiting may write one more log line into it
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            break
        time.sleep(1)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the end of the pipe ends it
    if sys.stdin.read().strip() != "done":
        reap(sys.argv[1], sys.argv[2:])
