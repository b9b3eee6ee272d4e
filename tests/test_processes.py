"""processes.py: a process is its pid and its start time (psutil's, seconds since boot), so a later
process that reuses the pid never counts as it; a zombie does not count as running; descendants
reach grandchildren. The reaper itself: tests/test_r2d2_ray.py (test_reaper_...)."""

import os
import subprocess
import sys
import time

import psutil
import pytest

from r2d2_algo import processes

TICK = 1 / os.sysconf("SC_CLK_TCK")  # s: the smallest difference two start times show (Linux: 10 ms)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_pid_with_another_start_time_is_another_process(sleeper):
    started = processes.process_start_time(sleeper.pid)
    assert started == processes.process_start_time(sleeper.pid)  # the same value every time it is read
    assert abs(started - (psutil.Process(sleeper.pid).create_time() - psutil.boot_time())) < 1e-6
    assert processes.pid_alive(sleeper.pid) and processes.pid_alive(sleeper.pid, started)
    assert not processes.pid_alive(sleeper.pid, started + TICK)  # what a reused pid looks like
    assert not processes.pid_alive(sleeper.pid, started - TICK)
    # a scheduler record of the /proc version: clock ticks since boot, as a string
    ticks = round(started * os.sysconf("SC_CLK_TCK"))
    assert processes.pid_alive(sleeper.pid, str(ticks)) and not processes.pid_alive(sleeper.pid, str(ticks + 1))


def test_the_start_time_read_in_another_process_matches():
    """The driver records the start times, the reaper (another process, later) compares them."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        code = f"from r2d2_algo import processes; print(repr(processes.process_start_time({proc.pid})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(processes.__file__))).stdout
        assert processes.pid_alive(proc.pid, float(out))
    finally:
        proc.kill()
        proc.wait()


def test_zombies_and_ended_processes_do_not_run():
    proc = subprocess.Popen(["true"])
    started = processes.process_start_time(proc.pid)
    deadline = time.time() + 10
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.01)
    assert processes.process_start_time(proc.pid) == started  # a zombie keeps its start time
    assert not processes.pid_alive(proc.pid) and not processes.pid_alive(proc.pid, started)
    proc.wait()
    assert not processes.pid_alive(proc.pid, started) and processes.process_start_time(proc.pid) is None
    assert not processes.pid_alive(None) and not processes.pid_alive(0) and not processes.pid_alive(-5)
    assert processes.descendants(proc.pid) == []


def test_descendants_are_every_generation_with_start_times():
    script = ("import subprocess, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); "
              "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        found = dict(entry.split(":") for entry in processes.descendants(os.getpid()))
        assert {child.pid, grandchild} <= set(map(int, found))
        for pid in (child.pid, grandchild):
            assert processes.pid_alive(pid, float(found[str(pid)]))
        assert [entry.split(":")[0] for entry in processes.descendants(child.pid)] == [str(grandchild)]
    finally:
        for process in psutil.Process(child.pid).children(recursive=True):
            process.kill()  # while it is still the child's: init reaps it
        child.kill()
        child.wait()
