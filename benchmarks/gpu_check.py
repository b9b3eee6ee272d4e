"""One command that proves the main job's GPU paths and measures them, on a lent GPU machine.

    python benchmarks/gpu_check.py                        # one H100/H200 with 16 cores: under 8 minutes
    python benchmarks/gpu_check.py --scaling              # the scaling tables: under 8 minutes
    python benchmarks/gpu_check.py --device cpu --small   # every check at toy sizes: under 2 minutes on 2
                                                          # cores (tests/test_gpu_check.py runs it)

Checks, in order (each ok, FAILED with its reason, or skipped with its reason):

1. machine: device name, torch and CUDA versions, cores, PyTorch's own float32 precision switches
2. precision: the dtype each part of the network (torso, core, head) computes in during the
   learner's update, float32 and --amp (r2d2_algo/devices.compute_dtypes); a weight load keeps
   each parameter's device, dtype and storage
3. runs: short CartPole runs of r2d2.py, r2d2_mp.py (local and central inference, with and without
   --amp) and r2d2_ray.py (skipped where Ray is not installed) on the device, each exiting 0 with
   no process and no /dev/shm entry left behind
4. checkpoints across devices: r2d2_mp.py checkpointed on the device resumes on the CPU and its
   saved model is evaluated there, and a CPU checkpoint resumes on the device (central inference)
5. learner updates/s at the paper batch (64 × (40 + 80 + 5) steps, paper network), float32 and
   --amp, on a pre-loaded batch and fed by the sampling pipeline; the learner's peak GPU memory
6. actors: SPS of 15 actors × 64 Pong envs through central inference on the device (60 s)
7. whole system on Pong: r2d2_mp.py's SPS and updates/s over 120 s of learning (central
   inference), and the GPU memory its processes hold (nvidia-smi)

``--scaling`` instead measures actor SPS against the number of actor processes (1, 2, 4, 8, 15),
at 64 envs per actor and at a fixed total of 240 envs, through central inference on the device,
and learner updates/s against the batch size. Each mode prints one table and writes JSON
(benchmarks/results/gpu_check.json, gpu_check_scaling.json); the exit code is 1 if a check failed.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this clone's r2d2_algo and benchmarks, installed or not

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

from benchmarks.bench_mp import learner_rates, parallel_rate, system_sps  # noqa: E402
from r2d2_algo import r2d2_mp  # noqa: E402
from r2d2_algo.devices import compute_dtypes, float32_precision  # noqa: E402
from r2d2_algo.model import RNNQNetwork, load_parameter_vector  # noqa: E402
from r2d2_algo.stopping import StopRequest  # noqa: E402
from r2d2_algo.storage import later_state_offsets  # noqa: E402

PONG = "PongNoFrameskip-v4"


@dataclass
class Args:
    device: str = "cuda"
    """the device to prove: cuda (the GPU machine) or cpu (this check's own test)"""
    small: bool = False
    """toy sizes everywhere (small networks and batches, seconds instead of minutes): a smoke test of the checks"""
    scaling: bool = False
    """measure the scaling tables instead of the checks"""
    actors: int = 15
    """actor processes of the actor and whole-system measurements (the GPU machine: 16 cores, one for the learner)"""
    envs_per_actor: int = 64
    """envs per actor there (r2d2_mp.py's default)"""
    actor_seconds: float = 60.0
    """measuring time of the actor SPS"""
    system_seconds: float = 120.0
    """learning time of the whole-system measurement"""
    learner_updates: int = 20
    """updates timed in each learner measurement (after one warm-up update)"""
    scaling_processes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 15])
    """actor counts of the scaling tables"""
    scaling_total_envs: int = 240
    """total envs of the fixed-total table (240 = 15 × 16 = 8 × 30 = ...)"""
    scaling_seconds: float = 12.0
    """measuring time per scaling cell"""
    scaling_batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    """batch sizes (sequences) of the learner table"""
    skip: list[str] = field(default_factory=list)
    """checks not to run, by name (reported as skipped): the test suite skips those its own tests prove on the CPU"""
    out: str | None = None
    """JSON file (default: benchmarks/results/gpu_check[_scaling][_small].json)"""


# r2d2_mp.py flags of a toy network and replay: what --small measures with
SMALL_NETWORK = {"hidden_size": 32, "torso_size": 32, "head_hidden_size": 32, "batch_size": 4, "burn_in_length": 4,
                 "sequence_length": 8, "overlap": 4, "n_step": 3}
SMALL_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_NETWORK.items()]
CARTPOLE = ["--env-id", "CartPole-v1", "--no-progress-bar", "--hidden-size", "32", "--torso-size", "32",
            "--head-hidden-size", "32", "--batch-size", "8", "--burn-in-length", "4", "--sequence-length", "8",
            "--overlap", "4", "--learning-starts", "500", "--eval-episodes", "1", "--log-interval", "1000"]


class Report:
    """The checks' outcomes and figures, in order; printed as one table and written as JSON."""

    def __init__(self, skip: list[str] = ()):
        self.skip = set(skip)
        self.rows: list[dict] = []
        self.figures: dict = {}

    def check(self, name: str, function, *args, **kwargs):
        """Run one check: its return value is its figures (a dict) or a string to show; an
        exception marks it FAILED with its last line; ``Skip`` marks it skipped."""
        t0 = time.time()
        try:
            if name in self.skip:
                raise Skip("--skip")
            result = function(*args, **kwargs)
            status, detail = "ok", result
        except Skip as e:
            status, detail = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - a failed check is reported, the others still run
            lines = (str(e).strip() or type(e).__name__).splitlines()
            status, detail = "FAILED", f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]
            if len(lines) > 1:
                print("\n".join(lines[-40:]), file=sys.stderr)
        seconds = time.time() - t0
        shown = detail if isinstance(detail, str) else "; ".join(f"{k} {format_value(v)}" for k, v in detail.items())
        self.rows.append({"check": name, "status": status, "seconds": round(seconds, 1), "result": detail})
        print(f"[{status}] {name} ({seconds:.0f} s): {shown}", flush=True)
        return detail if status == "ok" else None

    @property
    def failed(self) -> bool:
        return any(row["status"] == "FAILED" for row in self.rows)

    def table(self) -> str:
        lines = ["| check | status | s | result |", "|---|---|---|---|"]
        for row in self.rows:
            result = row["result"]
            shown = result if isinstance(result, str) else "; ".join(f"{k} {format_value(v)}" for k, v in result.items())
            lines.append(f"| {row['check']} | {row['status']} | {row['seconds']:.0f} | {shown} |")
        return "\n".join(lines)


class Skip(Exception):
    """A check that does not apply here (one line why)."""


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# ---------------------------------------------------------------------- 1. machine
def machine(device: torch.device) -> dict:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda or "none", "cores": len(os.sched_getaffinity(0)),
           "float32 precision (PyTorch's)": ", ".join(f"{k} {v}" for k, v in float32_precision().items())}
    if device.type == "cuda":
        out["cudnn"] = torch.backends.cudnn.version()
        out["gpu memory GiB"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return out


# ---------------------------------------------------------------------- 2. precision
def precision(device: torch.device, small: bool) -> dict:
    """The dtypes each part ran in during r2d2_mp.update (float32 and --amp), and a weight load."""
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    width = 32 if small else 512
    l, m, n, B, A = (4, 6, 2, 2, 6) if small else (40, 80, 5, 64, 6)
    rng = np.random.default_rng(0)
    W = l + m + n
    batch = {
        "obs": torch.tensor(rng.integers(0, 255, (W, B, 4, 84, 84), dtype=np.uint8)),
        "action": torch.tensor(rng.integers(0, A, (W, B))), "reward": torch.tensor(rng.normal(size=(W, B))).float(),
        "first": torch.tensor(rng.random((W, B)) < 0.05), "terminated": torch.zeros(W, B, dtype=torch.bool),
        "truncated": torch.zeros(W, B, dtype=torch.bool), "prev_action": torch.tensor(rng.integers(-1, A, (W, B))),
        "prev_reward": torch.tensor(rng.normal(size=(W, B))).float(),
        "initial_state": torch.zeros(B, 2 * width), "weights": torch.ones(B)}
    offsets = list(later_state_offsets(l, m, m // 2))  # the actor states inside the window, for ΔQ
    batch["later_states"] = torch.tensor(rng.normal(size=(len(offsets), B, 2 * width))).float()
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["later_state_offsets"] = offsets
    out = {}
    for amp in (False, True):
        online = RNNQNetwork(space, A, "lstm", width, width, width).to(device)
        target = RNNQNetwork(space, A, "lstm", width, width, width).to(device)
        args = r2d2_mp.Args(amp=amp, burn_in_length=l, sequence_length=m, n_step=n)
        optimizer = torch.optim.Adam(online.parameters(), lr=1e-4, eps=1e-3)
        stop = StopRequest()
        try:
            with compute_dtypes(online) as dtypes:
                priorities, stats = r2d2_mp.update(online, target, optimizer, batch, args, 1, stop)
        finally:
            stop.restore()
        low = "bfloat16" if amp else "float32"
        expected = {"torso": [low], "core": ["float32"], "head": [low]}
        label = "amp" if amp else "fp32"
        out[label] = ", ".join(f"{part} {'/'.join(d)}" for part, d in dtypes.items())
        if dtypes != expected or not np.isfinite(priorities).all():
            raise AssertionError(f"{label}: the parts ran in {dtypes}, expected {expected}")
        if not (np.isfinite(stats["q_discrepancy_first"]) and np.isfinite(stats["q_discrepancy_last"])):
            raise AssertionError(f"{label}: the Q discrepancy (ΔQ) is not finite: {stats}")
    before = [(p.device, p.dtype, p.data_ptr()) for p in online.parameters()]
    vector = torch.nn.utils.parameters_to_vector(target.parameters()).detach().cpu().double().numpy()
    load_parameter_vector(online, vector)
    if [(p.device, p.dtype, p.data_ptr()) for p in online.parameters()] != before:
        raise AssertionError("a weight load moved a parameter (device, dtype or storage changed)")
    out["weight load"] = "device, dtype and storage kept"
    return out


# ---------------------------------------------------------------------- 3. and 4. runs
def session_processes(session: int) -> list[int]:
    """Live processes of a session (a run started with start_new_session: the run and all it started)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() not in (psutil.STATUS_ZOMBIE,
                                                                               psutil.STATUS_DEAD):
                found.append(process.pid)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return found


def run_clean(script: str, *flags: str, cwd: str, timeout: float = 300) -> str:
    """Run ``script`` with ``flags`` in ``cwd``: exit 0, and nothing of it left behind (no process
    of its session 5 s after its exit, no new /dev/shm entry). Returns its stdout."""
    shm_before = set(os.listdir("/dev/shm"))
    path = ROOT / ("benchmarks" if script == "gpu_check.py" else "r2d2_algo") / script
    env = dict(os.environ, RAY_TMPDIR=cwd)
    proc = subprocess.Popen([sys.executable, str(path), *flags], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError(f"{script} {' '.join(flags)} ran past {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise RuntimeError(f"{script} exited {proc.returncode}:\n{tail}")
    deadline = time.time() + 5
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = session_processes(proc.pid)
    if left:
        for pid in left:
            os.kill(pid, 9)
        raise RuntimeError(f"{script} left {len(left)} process(es) behind")
    new_shm = set(os.listdir("/dev/shm")) - shm_before
    if new_shm:
        raise RuntimeError(f"{script} left {len(new_shm)} /dev/shm entries: {sorted(new_shm)[:3]}")
    return out


def cuda_flag(device: torch.device) -> str:
    return "--cuda" if device.type == "cuda" else "--no-cuda"


def short_run(script: str, device: torch.device, *flags: str, steps: int = 3000) -> dict:
    """A short CartPole run of ``script`` on the device: it learns a few hundred updates and stops clean."""
    with tempfile.TemporaryDirectory() as cwd:
        extra = ["--num-actors", "2", "--num-envs-per-actor", "2"] if script != "r2d2.py" else ["--num-envs", "4"]
        out = run_clean(script, *CARTPOLE, *extra, "--total-timesteps", str(steps), cuda_flag(device), *flags,
                        cwd=cwd)
    return {"computes": summary_of(out), **last_figures(out)}


def summary_of(stdout: str) -> str:
    """The part of a script's run line that says where and how it computes."""
    line = next((line for line in stdout.splitlines() if line.startswith("run ")), "")
    for start in ("inference", "learner on", "parameters on"):
        if start in line:
            return line[line.find(start):].split(", replay")[0]
    return line[:120]


def last_figures(stdout: str) -> dict:
    """The last progress line's learner updates and the last evaluation's return, where logged."""
    import re

    out = {}
    updates = re.findall(r"updates ([\d,]+)", stdout)
    if updates:
        out["updates"] = int(updates[-1].replace(",", ""))
    returns = re.findall(r"eval return ([-\d.]+)", stdout)
    if returns:
        out["eval return"] = float(returns[-1])
    return out


def ray_run(device: torch.device, steps: int) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise Skip("Ray is not installed here (pip install ray); r2d2_ray.py not run") from None
    return short_run("r2d2_ray.py", device, "--num-replay-shards", "1", steps=steps)


def across_devices(device: torch.device) -> dict:
    """r2d2_mp.py checkpointed on ``device`` → resumed on the CPU → saved model evaluated on the
    CPU; and checkpointed on the CPU → resumed on ``device`` with central inference → evaluated there."""
    cpu = torch.device("cpu")
    out = {}
    directions = [(device, cpu, "local"), (cpu, device, "central")]
    for first, second, inference in directions[: 1 if device.type == "cpu" else 2]:  # on the CPU: once
        with tempfile.TemporaryDirectory() as cwd:
            common = [*CARTPOLE, "--num-actors", "2", "--num-envs-per-actor", "2", "--checkpoint-interval", "1000"]
            run_clean("r2d2_mp.py", *common, "--total-timesteps", "1500", cuda_flag(first), cwd=cwd)
            (checkpoint,) = glob.glob(os.path.join(cwd, "saved_checkpoints", "*"))
            resumed = run_clean("r2d2_mp.py", "--resume", checkpoint, "--total-timesteps", "2500", "--save-model",
                                "--inference", inference, cuda_flag(second), cwd=cwd)
            if "resuming" not in resumed:
                raise AssertionError(f"the {second.type} run did not resume the {first.type} checkpoint")
            (model,) = glob.glob(os.path.join(cwd, "saved_models", "*", "model.pt"))
            evaluated = run_clean("evaluate.py", "--model", model, "--episodes", "2", cuda_flag(second), cwd=cwd)
            out[f"{first.type} → {second.type}"] = evaluated.strip().splitlines()[0].split(":", 1)[1].strip()
    return out


# ---------------------------------------------------------------------- 5. learner
def learner(device: torch.device, small: bool, updates: int) -> dict:
    env_id = PONG
    overrides = SMALL_NETWORK if small else {}
    capacity = 16 * 200 if small else 50_000
    out = {}
    for amp in (False, True):
        r = learner_rates(env_id, updates, str(device), amp, overrides, capacity)
        label = "amp" if amp else "fp32"
        out[f"{label} updates/s"] = r["preloaded_updates_per_second"]
        out[f"{label} updates/s with sampling"] = r["pipeline_updates_per_second"]
        if r["peak_gpu_memory_gib"] is not None:
            out[f"{label} peak GiB"] = r["peak_gpu_memory_gib"]
    batch = r["batch"]
    if device.type == "cuda":  # what --tf32 would buy (the default is off)
        r = learner_rates(env_id, updates, str(device), False, {**overrides, "tf32": True}, 16 * 500, pipeline=False)
        out["fp32 --tf32 updates/s"] = r["preloaded_updates_per_second"]
    out["batch"] = batch
    out["amp ÷ fp32"] = out["amp updates/s"] / out["fp32 updates/s"]
    return out


# ---------------------------------------------------------------------- 6. and 7. actors, whole system
def actors(device: torch.device, actors_: int, envs: int, seconds: float) -> dict:
    r = parallel_rate("actor", PONG, actors_, envs, seconds, num_splits=2, central=True,
                      inference_device=str(device))
    return {"actors × envs": f"{actors_} × {envs}", "SPS": r["per_second"], "SPS per CPU-second": r["per_cpu_second"],
            "inference CPU share": r["inference_cpu_share"]}


def gpu_memory_of(pids: set[int]) -> float | None:
    """GiB of GPU memory the processes ``pids`` hold now (nvidia-smi), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    total = 0.0
    for line in out.strip().splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids:
            total += float(used) / 1024
    return total


def whole_system(device: torch.device, small: bool, actors_: int, envs: int, seconds: float) -> dict:
    peak = {"gib": None}

    def sample(pid: int) -> None:
        if device.type == "cuda":
            held = gpu_memory_of({pid, *session_processes(pid)})
            if held is not None:
                peak["gib"] = max(peak["gib"] or 0.0, held)

    extra = (*SMALL_FLAGS, "--learning-starts", "500", "--log-interval", "1000") if small else ()
    r = system_sps(PONG, actors_, envs, seconds, 2, inference="central", extra=(cuda_flag(device), *extra),
                   on_line=sample)
    if not np.isfinite(r["sps"]):
        raise RuntimeError(f"r2d2_mp.py logged no learning line (exit {r['returncode']}):\n{r['log_tail']}")
    out = {"actors × envs": f"{actors_} × {envs}", "SPS": r["sps"], "updates/s": r["updates_per_second"],
           "exit after Ctrl-C s": r["exit_seconds_after_ctrl_c"]}
    if peak["gib"] is not None:
        out["GPU GiB of its processes"] = peak["gib"]
    return out


# ---------------------------------------------------------------------- --scaling
def scaling(device: torch.device, args: Args, report: Report) -> None:
    E = args.envs_per_actor
    for p in args.scaling_processes:
        report.check(f"actors {p} × {E} envs (fixed envs per actor)", actors, device, p, E, args.scaling_seconds)
    for p in args.scaling_processes:
        envs = max(2, args.scaling_total_envs // p // 2 * 2)
        report.check(f"actors {p} × {envs} envs (fixed total {args.scaling_total_envs})", actors, device, p, envs,
                     args.scaling_seconds)
    for batch_size in args.scaling_batch_sizes:
        overrides = {**(SMALL_NETWORK if args.small else {}), "batch_size": batch_size}

        def rate(batch_size=batch_size, overrides=overrides) -> dict:
            out = {}
            for amp in (False, True):
                r = learner_rates(PONG, args.learner_updates, str(device), amp, overrides,
                                  16 * 200 if args.small else 16 * 500, pipeline=False)
                out[f"{'amp' if amp else 'fp32'} updates/s"] = r["preloaded_updates_per_second"]
                out[f"{'amp' if amp else 'fp32'} sequences/s"] = r["preloaded_updates_per_second"] * batch_size
            return out

        report.check(f"learner, batch {batch_size}", rate)


def main(args: Args) -> int:
    device = torch.device(args.device)
    if args.small:  # toy sizes: seconds per measurement, a couple of processes
        args.actors, args.envs_per_actor, args.actor_seconds, args.system_seconds = 2, 4, 3.0, 4.0
        args.learner_updates, args.scaling_processes, args.scaling_seconds = 2, [1, 2], 2.0
        args.scaling_total_envs, args.scaling_batch_sizes = 8, [2, 4]
    report = Report(args.skip)
    t0 = time.time()
    info = report.check("machine", machine, device)
    if info is None:
        print(report.table())
        return 1
    if args.scaling:
        scaling(device, args, report)
    else:
        report.check("precision of each part (learner update)", precision, device, args.small)
        steps = 1200 if args.small else 2500  # of the short runs
        report.check("r2d2.py", short_run, "r2d2.py", device, "--replay-ratio", "4", steps=steps)
        for inference in ("local", "central"):
            for amp in (False, True):
                if args.small and (inference, amp) in (("local", False), ("central", True)):
                    continue  # --small: two of the four (each mode and each precision once)
                report.check(f"r2d2_mp.py --inference {inference}{' --amp' if amp else ''}", short_run, "r2d2_mp.py",
                             device, "--inference", inference, *(["--amp"] if amp else []), steps=steps)
        report.check("r2d2_ray.py", ray_run, device, steps)
        report.check("checkpoint → resume → evaluate across devices", across_devices, device)
        report.check("learner at the paper batch", learner, device, args.small, args.learner_updates)
        report.check("actors through central inference", actors, device, args.actors, args.envs_per_actor,
                     args.actor_seconds)
        report.check("whole system on Pong (central inference)", whole_system, device, args.small, args.actors,
                     args.envs_per_actor, args.system_seconds)
    print(f"\n{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, {info['cores']} cores; "
          f"{time.time() - t0:.0f} s in all\n")
    print(report.table())
    name = "gpu_check" + ("_scaling" if args.scaling else "") + ("_small" if args.small else "")
    out = args.out or str(ROOT / "benchmarks" / "results" / f"{name}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "machine": info, "seconds": time.time() - t0, "checks": report.rows}, f,
                  indent=1, default=str)
    print(f"\nwrote {out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
