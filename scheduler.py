"""Run every pending experiment of experiment_configs/, a few at a time; safe to leave overnight.

    python scheduler.py                                   # every config, one slot per core
    python scheduler.py --max-parallel 2 --retry-failed   # also rerun runs that failed
    python scheduler.py experiment_configs/cartpole_study.yaml --dry-run   # list, start nothing

Each configuration (format: r2d2_algo/experiments.py) is validated against its script's Args
before anything starts. A run occupies one slot, an r2d2_mp.py run num_actors + 1. Each run's
output goes to runs/_scheduler/{config}/{run_id}.log, and its record (state: pending, running,
done, failed with its exit code, interrupted; pid, attempts, run folder, config values) to
runs/_scheduler/{config}/{run_id}.json, written atomically. So re-running the scheduler skips
done runs, skips failed ones unless --retry-failed, and reruns runs that were running when a
scheduler died: from their last checkpoint when the run has one (args: checkpoint_interval > 0;
a run killed with its scheduler gets SIGTERM and writes one), else from scratch after their
partial run folders are deleted, so nothing is counted twice.
Ctrl-C or SIGTERM stops every run (each in its own process group) and exits; a run also
receives SIGTERM if the scheduler is killed outright. One scheduler at a time per runs/ folder
(a lock file). With several GPUs visible, runs are spread over them (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import tyro

from r2d2_algo.checks import check_writable
from r2d2_algo.experiments import (ConfigError, Run, config_paths, load_configs, log_path, read_record,
                                   record_path, state_dir, write_record)
from r2d2_algo.limits import usable_cpus
from r2d2_algo.processes import pid_alive, process_start_time, quiet_if_hung_up

RUNS_DIR = "runs"  # the scripts write runs/{run_name} relative to their working directory
CHECKPOINTS_DIR = Path("saved_checkpoints")  # and saved_checkpoints/{run_name}/ with --checkpoint-interval


@dataclass
class Args:
    configs: tyro.conf.Positional[list[str]] = dataclasses.field(default_factory=list)
    """configuration files to run (default: every *.yaml of --config-dir)"""
    config_dir: str = "experiment_configs"
    """folder of the configurations"""
    max_parallel: int = dataclasses.field(default_factory=lambda: usable_cpus()[0])
    """slots (CPUs) used at once: a run takes one, an r2d2_mp.py run num_actors + 1 (default: the usable CPUs:
    affinity mask, cgroup CPU quota)"""
    retry_failed: bool = False
    """rerun runs that failed before (by default they are skipped)"""
    dry_run: bool = False
    """list every run with its state and the command that would start; start nothing"""
    kill_timeout: float = 20.0
    """seconds a stopped run gets to exit after SIGTERM before SIGKILL"""
    poll_interval: float = 0.5
    """seconds between checks of the running processes"""
    progress_bar: bool = True
    """a tqdm bar (done/running/failed, elapsed); off, or when stderr is not a terminal, a status line
    every --status-interval seconds"""
    status_interval: float = 60.0
    """seconds between status lines when there is no progress bar"""


# ---------------------------------------------------------------------------------------------
# processes


_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _libc = None


def _child_setup(parent_pid: int):
    """Runs in the child before exec: its own session (so one killpg stops the run and every process
    it starts), and SIGTERM when the scheduler dies, even by SIGKILL (Linux)."""

    def setup():
        os.setsid()
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the scheduler died before prctl took effect
                os._exit(1)

    return setup


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def visible_gpus(device_count: int | None = None, environ: dict | None = None) -> list[str]:
    """Ids to put in CUDA_VISIBLE_DEVICES when runs are spread over GPUs; [] with fewer than two GPUs.

    device_count: default torch.cuda.device_count(); ids follow an inherited CUDA_VISIBLE_DEVICES."""
    environ = os.environ if environ is None else environ
    if device_count is None:
        if sys.platform.startswith("linux") and len(glob.glob("/dev/nvidia[0-9]*")) < 2:
            return []  # fewer than two NVIDIA devices: no need to import torch to count them
        import torch

        device_count = torch.cuda.device_count()
    if device_count < 2:
        return []
    inherited = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    ids = inherited if len(inherited) >= device_count else [str(i) for i in range(device_count)]
    return ids[:device_count]


def assign_gpu(gpus: list[str], in_use: list[str | None]) -> str | None:
    """The GPU with the fewest running runs (the first on ties): round-robin as runs start and end."""
    if not gpus:
        return None
    load = Counter(g for g in in_use if g is not None)
    return min(gpus, key=lambda g: (load[g], gpus.index(g)))


# ---------------------------------------------------------------------------------------------
# progress


class Progress:
    """done/running/failed counts and elapsed time: a tqdm bar on a terminal, else status lines."""

    def __init__(self, total: int, done: int, bar: bool, status_interval: float):
        self.start, self.last_line, self.interval = time.time(), 0.0, status_interval
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                width = 0
            self.bar = tqdm(total=total, initial=done, unit="run", desc="sweep", dynamic_ncols=width > 0,
                            ncols=None if width > 0 else 100, nrows=None if width > 0 else 20)  # a pty may be 0×0
        self.total = total

    def message(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        if self.bar is not None:
            self.bar.write(f"[{stamp}] {text}")
        else:
            print(f"[{stamp}] {text}", flush=True)

    def update(self, counts: Counter, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.n = counts["done"]
            self.bar.set_postfix(running=counts["running"], failed=counts["failed"],
                                 pending=counts["pending"] + counts["interrupted"], refresh=False)
            self.bar.refresh()
        elif force or time.time() - self.last_line >= self.interval:
            self.last_line = time.time()
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self.start))
            self.message(f"{counts['done']}/{self.total} done, {counts['running']} running, {counts['failed']} failed,"
                         f" {counts['pending'] + counts['interrupted']} pending, {elapsed} elapsed")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# the scheduler


class Scheduler:
    """Starts pending runs while slots are free (in order: a run that does not fit waits, and so
    do the runs after it), records each state change, and stops every run on a signal."""

    def __init__(self, runs: list[Run], args: Args, gpus: list[str]):
        self.runs, self.args, self.gpus = runs, args, gpus
        self.records = {run.run_id: read_record(record_path(run, RUNS_DIR)) or self.new_record(run) for run in runs}
        self.procs: dict[str, tuple[subprocess.Popen, Run]] = {}
        self.stop_signal: int | None = None

    @staticmethod
    def new_record(run: Run) -> dict:
        return {"run_id": run.run_id, "config": run.config_path, "config_name": run.config_name, "script": run.script,
                "exp_name": run.exp_name, "seed": run.seed, "values": run.values, "argv": list(run.argv),
                "slots": run.slots, "state": "pending", "exit_code": None, "attempts": 0, "pid": None,
                "log": str(log_path(run, RUNS_DIR)), "run_dir": None, "gpu": None}

    def save(self, run: Run, **changes) -> None:
        record = self.records[run.run_id]
        record.update(changes)
        write_record(record_path(run, RUNS_DIR), record)

    def counts(self) -> Counter:
        return Counter(record["state"] for record in self.records.values())

    def to_run(self, run: Run) -> bool:
        state = self.records[run.run_id]["state"]
        return state in ("pending", "interrupted", "running") or (state == "failed" and self.args.retry_failed)

    # --- restart -----------------------------------------------------------------------------

    def check_unchanged(self) -> None:
        """A done run whose config values changed since is refused: its results would be mislabelled."""
        for run in self.runs:
            record = self.records[run.run_id]
            if record["state"] == "done" and (record["argv"] != list(run.argv) or record["script"] != run.script):
                old = {"script": record["script"], **record["values"]}
                new = {"script": run.script, **run.values}
                key = next((k for k in {**old, **new} if old.get(k) != new.get(k)), "args")
                raise ConfigError(f"{run.config_path}: {key}: changed since run {run.run_id} was done "
                                  f"({old.get(key)!r} → {new.get(key)!r}); rename the config to start a new sweep, "
                                  f"or delete {state_dir(RUNS_DIR) / run.config_name} to forget its runs")

    def recover(self, progress: Progress) -> None:
        """Runs recorded as running belong to a scheduler that died (we hold the lock): stop any
        process of theirs still alive and run them again."""
        for run in self.runs:
            record = self.records[run.run_id]
            if record["state"] != "running":
                continue
            if pid_alive(record.get("pid"), record.get("pid_start_time")):
                kill_group(record["pid"], signal.SIGTERM)
                deadline = time.time() + self.args.kill_timeout
                while pid_alive(record["pid"], record.get("pid_start_time")) and time.time() < deadline:
                    time.sleep(0.1)
                kill_group(record["pid"], signal.SIGKILL)
            progress.message(f"{run.run_id}: was running when the last scheduler stopped; will rerun")
            self.save(run, state="interrupted", exit_code=None, pid=None)

    # --- one run -----------------------------------------------------------------------------

    def start(self, run: Run, progress: Progress) -> None:
        log = Path(log_path(run, RUNS_DIR))
        log.parent.mkdir(parents=True, exist_ok=True)
        record = self.records[run.run_id]
        gpu = assign_gpu(self.gpus, [self.records[r]["gpu"] for r in self.procs])
        with open(log, "a") as f:
            stale_dirs = sorted(Path().glob(run.run_dir_glob(RUNS_DIR)), key=lambda p: p.stat().st_mtime)
            # an earlier attempt that left a checkpoint (--checkpoint-interval) is resumed in its own folder
            resume = next((CHECKPOINTS_DIR / d.name for d in reversed(stale_dirs)
                           if (CHECKPOINTS_DIR / d.name / "checkpoint.pt").is_file()), None)
            for stale in stale_dirs:  # an earlier, unfinished attempt's
                if resume is None or stale.name != resume.name:
                    shutil.rmtree(stale, ignore_errors=True)
                    f.write(f"# scheduler: removed {stale} (an unfinished earlier attempt)\n")
            command = run.command() if resume is None else [sys.executable, run.script, "--resume", str(resume)]
            if resume is not None:
                f.write(f"# scheduler: resuming the earlier attempt from {resume}\n")
            f.write(f"# scheduler: attempt {record['attempts'] + 1} started {datetime.now().isoformat(timespec='seconds')}"
                    f"{f' on GPU {gpu}' if gpu is not None else ''}\n# {subprocess.list2cmdline(command)}\n")
            f.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            threads = str(max(1, usable_cpus()[0] * run.slots // max(self.args.max_parallel, 1)))
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, threads)  # N runs × all cores each would oversubscribe the CPU
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, preexec_fn=_child_setup(os.getpid()))
        self.procs[run.run_id] = (proc, run)
        self.save(run, state="running", pid=proc.pid, pid_start_time=process_start_time(proc.pid),
                  scheduler_pid=os.getpid(), attempts=record["attempts"] + 1, argv=list(run.argv), values=run.values,
                  script=run.script, slots=run.slots, exit_code=None, gpu=gpu,
                  started=time.time(), ended=None, run_dir=None)
        progress.message(f"start {run.run_id}" + (f" (GPU {gpu})" if gpu is not None else ""))

    def finished(self, run: Run, code: int, progress: Progress, stopped: bool = False) -> None:
        """Record a run's end: done (exit 0), failed, or interrupted (stopped by the scheduler)."""
        del self.procs[run.run_id]
        dirs = sorted(Path().glob(run.run_dir_glob(RUNS_DIR)), key=lambda p: p.stat().st_mtime)
        run_dir = str(dirs[-1]) if dirs else None
        elapsed = time.time() - self.records[run.run_id]["started"]
        state = "interrupted" if stopped else "done" if code == 0 else "failed"
        self.save(run, state=state, exit_code=code, ended=time.time(), run_dir=run_dir, pid=None)
        with open(log_path(run, RUNS_DIR), "a") as f:
            f.write(f"\n# scheduler: {state}, exit code {code}, {elapsed:.0f} s\n")
        if state == "done":
            progress.message(f"done  {run.run_id} in {elapsed:.0f} s" + ("" if run_dir else " (no run folder found)"))
        elif state == "failed":
            progress.message(f"FAILED {run.run_id}: exit code {code} after {elapsed:.0f} s; log: {log_path(run, RUNS_DIR)}")

    # --- the loop ----------------------------------------------------------------------------

    def loop(self, progress: Progress) -> None:
        queue = [run for run in self.runs if self.to_run(run)]
        for run in queue:
            if self.records[run.run_id]["state"] == "failed":
                self.save(run, state="pending")
        limit = max(self.args.max_parallel, 1)
        while (queue or self.procs) and self.stop_signal is None:
            for run_id, (proc, run) in list(self.procs.items()):
                code = proc.poll()
                if code is not None:
                    self.finished(run, code, progress)
            used = sum(run.slots for _, run in self.procs.values())
            while queue and self.stop_signal is None:
                slots = min(queue[0].slots, limit)  # a run bigger than the budget runs alone
                if used + slots > limit:
                    break
                run = queue.pop(0)
                self.start(run, progress)
                used += slots
            progress.update(self.counts())
            time.sleep(self.args.poll_interval)

    def stop_all(self, progress: Progress) -> None:
        """SIGTERM to every run's process group, SIGKILL after --kill-timeout; records say interrupted."""
        if not self.procs:
            return
        for run_id, (proc, run) in list(self.procs.items()):
            if proc.poll() is not None:  # it ended on its own: its exit code stands
                self.finished(run, proc.returncode, progress)
        if not self.procs:
            return
        progress.message(f"stopping {len(self.procs)} running run(s)")
        for proc, _ in self.procs.values():
            kill_group(proc.pid, signal.SIGTERM)
        deadline = time.time() + self.args.kill_timeout
        while any(proc.poll() is None for proc, _ in self.procs.values()) and time.time() < deadline:
            time.sleep(0.1)
        for run_id, (proc, run) in list(self.procs.items()):
            kill_group(proc.pid, signal.SIGKILL)  # also whatever the run left in its group
            self.finished(run, proc.wait(), progress, stopped=True)


# ---------------------------------------------------------------------------------------------


def describe(runs: list[Run], scheduler: Scheduler) -> None:
    """--dry-run: every run with its state; the command of each run that would start."""
    for config in dict.fromkeys(run.config_path for run in runs):
        mine = [run for run in runs if run.config_path == config]
        print(f"{config}: {len(mine)} runs, {sum(scheduler.to_run(run) for run in mine)} to run")
        for run in mine:
            record = scheduler.records[run.run_id]
            state = record["state"]
            if state == "failed":
                state += f" ({record['exit_code']})"
            elif state == "running":  # by a live scheduler, or by one that died (then rerun)
                state += " (alive)" if pid_alive(record.get("pid"), record.get("pid_start_time")) else " (dead)"
            line = f"  {'run ' if scheduler.to_run(run) else 'skip'}  {state:<14} {run.run_id}"
            if scheduler.to_run(run):
                line += f"  [{run.slots} slot{'s' * (run.slots > 1)}]  {subprocess.list2cmdline(run.command('python'))}"
            print(line)


def check_flags(args: Args) -> None:
    """Refuse the scheduler's own flags out of range, and a runs/ that cannot be written (one
    ValueError line naming the flag or the path)."""
    if args.max_parallel < 1:
        raise ValueError(f"--max-parallel must be >= 1, got {args.max_parallel}")
    if not args.poll_interval >= 0.01:  # 0 would poll without pause (a core at ~70 %)
        raise ValueError(f"--poll-interval must be >= 0.01 seconds, got {args.poll_interval}")
    if not args.status_interval > 0:
        raise ValueError(f"--status-interval must be > 0 seconds, got {args.status_interval}")
    if not args.kill_timeout >= 0:
        raise ValueError(f"--kill-timeout must be >= 0 seconds, got {args.kill_timeout}")
    check_writable(str(RUNS_DIR))


def main(args: Args) -> int:
    try:
        check_flags(args)
    except ValueError as e:
        print(f"scheduler.py: error: {e}", file=sys.stderr)
        return 2
    try:
        paths = args.configs or config_paths(args.config_dir)
        if not paths:
            raise ConfigError(f"{args.config_dir}: no *.yaml configuration")
        runs = load_configs(paths)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as e:
        print(f"scheduler.py: error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        describe(runs, Scheduler(runs, args, []))
        return 0

    state_dir(RUNS_DIR).mkdir(parents=True, exist_ok=True)
    lock = open(state_dir(RUNS_DIR) / "scheduler.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        print(f"scheduler.py: error: another scheduler (pid {lock.read().strip() or '?'}) is running on "
              f"{RUNS_DIR}/; one at a time", file=sys.stderr)
        return 2
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()

    scheduler = Scheduler(runs, args, visible_gpus())
    try:
        scheduler.check_unchanged()
    except ConfigError as e:
        print(f"scheduler.py: error: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        if signum == signal.SIGHUP:  # a closed terminal: its output would fail with EIO
            quiet_if_hung_up()
        if scheduler.stop_signal is None:
            scheduler.stop_signal = signum
        else:  # a second Ctrl-C: no more waiting
            for proc, _ in scheduler.procs.values():
                kill_group(proc.pid, signal.SIGKILL)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    counts = scheduler.counts()
    todo = sum(scheduler.to_run(run) for run in runs)
    progress = Progress(len(runs), counts["done"], args.progress_bar, args.status_interval)
    progress.message(f"{len(runs)} runs in {len(set(r.config_path for r in runs))} config(s): {counts['done']} done, "
                     f"{todo} to run, {counts['failed'] if not args.retry_failed else 0} failed skipped; "
                     f"{args.max_parallel} slots" + (f", GPUs {','.join(scheduler.gpus)}" if scheduler.gpus else ""))
    try:
        scheduler.recover(progress)
        scheduler.loop(progress)
    finally:
        scheduler.stop_all(progress)
        progress.update(scheduler.counts(), force=True)
        progress.close()
    counts = scheduler.counts()
    if scheduler.stop_signal is not None:
        print(f"scheduler.py: stopped by {signal.Signals(scheduler.stop_signal).name}; "
              f"{counts['interrupted']} interrupted run(s) rerun at the next start", file=sys.stderr)
        return 128 + scheduler.stop_signal
    if counts["failed"]:
        failed = [r for r in scheduler.records.values() if r["state"] == "failed"]
        print(f"scheduler.py: {len(failed)} run(s) failed (rerun with --retry-failed): "
              + ", ".join(f"{r['run_id']} (exit {r['exit_code']}, {r['log']})" for r in failed), file=sys.stderr)
        return 1
    print(f"scheduler.py: all {counts['done']} runs done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
