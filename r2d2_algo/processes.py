"""Processes by psutil: liveness that a reused pid cannot fool, and the reaper of an embedded Ray
whose driver died without stopping it.

- ``process_start_time`` / ``pid_alive`` / ``descendants``: a process is named by its pid and its
  start time (psutil's, in seconds since boot), so a later process that reuses the pid never counts
  as it (the scheduler's records of its runs; the reaper below).
- ``quiet_if_hung_up``: after a hangup (a closed terminal, a dropped ssh connection), stdout and
  stderr that were that terminal go to /dev/null, so that the last lines of a clean stop do not
  fail with EIO.
- ``skip_final_collection``: a process that is about to exit leaves Python's last garbage
  collection out (it walks every object torch and tensorboard created: 1.5 s of CPU per process
  on a 2-core VM, paid by the learner and by every child at each stop).
- Run as a script, the reaper. When its driver dies (SIGKILL, the OOM killer), Ray takes the
  raylet, the GCS and every worker down at once, but its dashboard and runtime-env agents first
  wait 60 s on the dead GCS (to report the raylet's death), and nothing removes the session
  folder. ``ray_start.ray_session`` therefore starts this file right after ``ray.init``, in a new session
  (signals to the run's process group do not reach it):

      python r2d2_algo/processes.py FOLDER PID:START_TIME ...

  FOLDER is the run's Ray folder; each PID:START_TIME one of Ray's processes then
  (``descendants`` of the driver, START_TIME in seconds since boot). It reads its stdin, a pipe
  only the driver holds, to the end: the driver writes ``done`` there after it has shut Ray down
  and removed the folder. The end of the pipe without ``done`` means the driver died: it SIGKILLs
  those of the processes still alive and still the same (a reused pid is left alone) and removes
  the folder.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import time

import psutil


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


# seconds: under one clock tick (Linux counts start times in ticks of 10 ms), over the rounding of
# process_start_time to µs and the float noise of create_time less boot_time (~1e-7 s)
START_TIME_TOLERANCE = 0.0005


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since boot (float): psutil's ``create_time`` less
    ``boot_time``, on Linux the kernel's start time (10 ms clock ticks), which a change of the
    clock does not move. A zombie still has one. None where no process has that pid (or it cannot
    be read). Raises nothing."""
    try:  # rounded to µs (psutil's finest resolution), which drops the subtraction's float noise
        return round(psutil.Process(pid).create_time() - psutil.boot_time(), 6)
    except (psutil.Error, ValueError):  # ValueError: a negative pid
        return None


def _process(pid: int | None, start_time: float | str | None = None) -> psutil.Process | None:
    """The process ``pid`` if it runs and, given ``start_time`` (``process_start_time``'s seconds
    since boot; a string is clock ticks since boot, what earlier versions of this module recorded),
    started then (within ``START_TIME_TOLERANCE``); else None: no pid, gone, a zombie, a later
    process that reuses the pid, or one it may not read (another user's)."""
    if not pid:
        return None
    try:
        if isinstance(start_time, str):  # a scheduler record written before psutil
            start_time = int(start_time) / os.sysconf("SC_CLK_TCK")
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        if start_time is not None and \
                abs(process.create_time() - psutil.boot_time() - start_time) > START_TIME_TOLERANCE:
            return None  # the pid is another process's now
        return process
    except (psutil.Error, ValueError):  # gone, a zombie (macOS), another user's; a bad pid or record
        return None


def pid_alive(pid: int | None, start_time: float | str | None = None) -> bool:
    """Whether process ``pid`` runs and, given ``start_time`` (seconds since boot from
    ``process_start_time``; None: any start), is the process that started then. False for no pid,
    a process that has exited, a zombie, a later process that reuses the pid, and one this user may
    not read. Raises nothing."""
    return _process(pid, start_time) is not None


def descendants(pid: int) -> list[str]:
    """Every descendant of process ``pid`` (children, theirs, and so on; zombies included) as
    ``PID:START_TIME`` strings, START_TIME in seconds since boot as ``process_start_time`` gives it
    (the reaper's arguments). [] where ``pid`` does not run. Raises nothing."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except (psutil.Error, ValueError):
        return []
    found = []
    for child in children:
        started = process_start_time(child.pid)
        if started is not None:  # None: it exited after the listing
            found.append(f"{child.pid}:{started!r}")
    return found


def reap(folder: str, processes: list[str]) -> None:
    """SIGKILL each ``PID:START_TIME`` (``descendants``' strings) still alive and still the process
    that started then, wait up to 5 s for them to go (or turn zombies their dead parent left to
    init), then remove ``folder``. A pid that another process uses now is never signalled. Raises
    ValueError on an entry not of that form."""
    alive = []
    for entry in processes:
        pid, started = entry.split(":")
        pid, started = int(pid), float(started)
        process = _process(pid, started)
        if process is not None:
            try:
                process.kill()  # psutil checks once more that the pid is still this process
                alive.append((pid, started))
            except psutil.Error:
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
