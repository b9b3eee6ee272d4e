"""Processes by /proc (Linux): liveness that a reused pid cannot fool, and the reaper of an
embedded Ray whose driver died without stopping it. Stdlib only.

- ``process_start_time`` / ``pid_alive``: a process is named by its pid and its start time (field
  22 of /proc/PID/stat), so a later process that reuses the pid never counts as it (the
  scheduler's records of its runs; the reaper below).
- ``quiet_if_hung_up``: after a hangup (a closed terminal, a dropped ssh connection), stdout and
  stderr that were that terminal go to /dev/null, so that the last lines of a clean stop do not
  fail with EIO.
- ``skip_final_collection``: a process that is about to exit leaves Python's last garbage
  collection out (it walks every object torch and tensorboard created: 1.5 s of CPU per process
  on a 2-core VM, paid by the learner and by every child at each stop).
- Run as a script, the reaper. When its driver dies (SIGKILL, the OOM killer), Ray takes the
  raylet, the GCS and every worker down at once, but its dashboard and runtime-env agents first
  wait 60 s on the dead GCS (to report the raylet's death), and nothing removes the session
  folder. ``r2d2_ray.py`` therefore starts this file right after ``ray.init``, in a new session
  (signals to the run's process group do not reach it):

      python r2d2_algo/processes.py FOLDER PID:START_TIME ...

  FOLDER is the run's Ray folder; each PID:START_TIME one of Ray's processes then
  (``descendants`` of the driver). It reads its stdin, a pipe only the driver holds, to the end:
  the driver writes ``done`` there after it has shut Ray down and removed the folder. The end of
  the pipe without ``done`` means the driver died: it SIGKILLs those of the processes still
  alive and removes the folder.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import time


# which of stdout/stderr were terminals when this module loaded (a hung-up one no longer says so)
_tty_at_start = {fd: os.isatty(fd) for fd in (1, 2)}


def quiet_if_hung_up() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that has hung up (writes to
    it fail with EIO; ``isatty`` answers False once it has): what a closed terminal leaves."""
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by a test, or closed
            continue
        if _tty_at_start.get(fd) and not os.isatty(fd):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


def skip_final_collection() -> None:
    """Call right before a process exits: Python's finalization would otherwise run a full garbage
    collection over every object still alive (~300,000 after torch, gymnasium and tensorboard
    load; measured 1.5 s on this project's 2-core VM, half of a short run's stop). Objects are
    still freed as their modules are cleared; only cycles are left to the OS, so anything that
    must be flushed (writers, files, queues) is closed explicitly before this, as the scripts do."""
    gc.freeze()


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/{pid}/stat after the command name (state first), or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (to tell it from a later process with the same pid)."""
    stat = proc_stat(pid)
    return stat[19] if stat else None


def pid_alive(pid: int | None, start_time: str | None = None) -> bool:
    """Whether the process runs (a zombie, or a new process that reuses the pid, does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    if stat is None:
        return True
    return stat[0] not in ("Z", "X") and (start_time is None or stat[19] == start_time)


def descendants(pid: int) -> list[str]:
    """Every live descendant of ``pid`` as ``PID:START_TIME`` (the reaper's arguments)."""
    children: dict[int, list[str]] = {}  # parent pid -> its children as PID:START_TIME
    for entry in os.listdir("/proc"):
        stat = proc_stat(int(entry)) if entry.isdigit() else None
        if stat:
            children.setdefault(int(stat[1]), []).append(f"{entry}:{stat[19]}")
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(int(child.split(":")[0]), []))
    return found


def reap(folder: str, processes: list[str]) -> None:
    """SIGKILL each ``PID:START_TIME`` still alive (and the same process), wait up to 5 s for them
    to go (or turn zombies their dead parent left to init), then remove ``folder``."""
    alive = []
    for entry in processes:
        pid, started = entry.split(":")
        pid = int(pid)
        if pid_alive(pid, started):
            try:
                os.kill(pid, signal.SIGKILL)
                alive.append((pid, started))
            except OSError:
                pass
    deadline = time.time() + 5
    while alive and time.time() < deadline:
        alive = [(pid, started) for pid, started in alive if pid_alive(pid, started)]
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
