"""Parameter lag, and the learner's speed while evaluations run, of r2d2_mp.py, in one run.

    python benchmarks/bench_lag_eval.py [--before PATH] [--seconds 60] [--rounds 2]

Each measurement runs ``r2d2_mp.py`` for ``--seconds`` after learning has started, stops it with
Ctrl-C and reads its tensorboard scalars (the values logged once learning had started):

1. **Parameter lag** (``charts/parameter_lag``: learner updates between the weights the actors
   act with and the learner's current ones), with the learner's ``charts/updates_per_second``
   and the mean age of the weights the actors act with that it implies (lag ÷ updates/s, in
   seconds; about half the refresh period), on the README's
   CartPole command (2 actors × 4 envs) and on Pong with one actor at its default 64 envs and a
   small network (so that a CPU learner makes a few updates per second).
2. **The learner beside evaluations**: Pong, small network, a learner that always has work
   (``--replay-ratio 64``), once without evaluation and once evaluating all the time
   (``--eval-interval 500 --eval-episodes 2``: a new evaluation is due before the last ends).
   The ratio of the two updates/s says what evaluations cost the learner.

``--before PATH`` names another checkout of this repository (say ``git worktree add /tmp/before
<commit>``): every measurement is made on both, interleaved round by round on the same cores, so
that the ratios compare the two codes under the same conditions. Prints a table, writes JSON.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]

CARTPOLE = ["--env-id", "CartPole-v1", "--num-actors", "2", "--num-envs-per-actor", "4", "--hidden-size", "128",
            "--torso-size", "128", "--head-hidden-size", "128", "--buffer-size", "100000", "--burn-in-length", "8",
            "--sequence-length", "16", "--overlap", "8", "--batch-size", "32", "--learning-rate", "1e-3",
            "--gamma", "0.99", "--target-network-update-period", "50", "--replay-ratio", "32",
            "--min-replay-ratio", "16", "--learning-starts", "2000", "--eval-episodes", "0"]
PONG_SMALL = ["--env-id", "PongNoFrameskip-v4", "--num-actors", "1", "--num-envs-per-actor", "64", "--hidden-size",
              "128", "--torso-size", "128", "--head-hidden-size", "128", "--buffer-size", "200000", "--burn-in-length",
              "10", "--sequence-length", "20", "--overlap", "10", "--batch-size", "16", "--learning-starts", "5000"]
CASES = {
    "lag_cartpole": CARTPOLE,
    "lag_pong": PONG_SMALL + ["--eval-episodes", "0"],
    "learner_no_eval_pong": PONG_SMALL + ["--replay-ratio", "64", "--eval-episodes", "0"],
    "learner_eval_pong": PONG_SMALL + ["--replay-ratio", "64", "--eval-interval", "500", "--eval-episodes", "2"],
}


@dataclass
class Args:
    before: str | None = None
    """another checkout of this repository to measure beside this one (the code before a change)"""
    seconds: float = 60.0
    """seconds each run is measured for, counted from its first learner update"""
    rounds: int = 2
    """interleaved rounds of every measurement (means over rounds are reported)"""
    out: str = str(ROOT / "benchmarks" / "results" / "bench_lag_eval.json")
    """JSON output"""


def measure(checkout: Path, case_args: list[str], seconds: float) -> dict:
    """Run checkout's r2d2_mp.py until it has learned for ``seconds``, Ctrl-C it, read its scalars."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(checkout))
        script = checkout / "r2d2_algo" / "r2d2_mp.py"
        # --log-interval was in seconds in earlier versions, it is in environment steps now
        log_interval = "2" if "log_interval: float" in script.read_text() else "2000"
        proc = subprocess.Popen([sys.executable, str(script), *case_args,
                                 "--total-timesteps", "100000000", "--log-interval", log_interval], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        learning_since, deadline = None, time.time() + seconds + 900
        for line in proc.stdout:
            if learning_since is None and "updates " in line and "updates 0 " not in line and "SPS" in line:
                learning_since = time.time()
            if learning_since is not None and time.time() - learning_since > seconds or time.time() > deadline:
                break
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
        (run_dir,) = glob.glob(os.path.join(tmp, "runs", "*"))
        acc = EventAccumulator(run_dir)
        acc.Reload()

    def learning(tag):  # values logged once the learner had updated
        updates = {e.step: e.value for e in acc.Scalars("charts/learner_updates")}
        return np.array([e.value for e in acc.Scalars(tag) if updates.get(e.step, 0) > 0][1:])  # skip the first

    lag, ups, sps = learning("charts/parameter_lag"), learning("charts/updates_per_second"), learning("charts/SPS")
    return {"parameter_lag": float(lag.mean()), "updates_per_second": float(ups.mean()), "sps": float(sps.mean()),
            "weight_age_seconds": float(lag.mean() / max(ups.mean(), 1e-9)), "log_points": int(len(lag))}


def main(args: Args) -> None:
    checkouts = {"this": ROOT}
    if args.before:
        checkouts["before"] = Path(args.before).resolve()
    results = {"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
               "seconds": args.seconds, "rounds": [], "cases": CASES}
    for i in range(args.rounds):
        row = {}
        for case, case_args in CASES.items():
            for name, checkout in checkouts.items():
                row[f"{case}/{name}"] = measure(checkout, case_args, args.seconds)
                m = row[f"{case}/{name}"]
                print(f"round {i + 1}, {case}, {name}: lag {m['parameter_lag']:.1f} updates, "
                      f"{m['updates_per_second']:.2f} updates/s, SPS {m['sps']:.0f}", flush=True)
        results["rounds"].append(row)
    keys = results["rounds"][0].keys()
    mean = {k: {q: float(np.mean([r[k][q] for r in results["rounds"]])) for q in results["rounds"][0][k]} for k in keys}
    results["mean"] = mean
    print(f"\n| run ({args.rounds} rounds of {args.seconds:.0f} s, means) | code | parameter lag (updates) "
          f"| updates/s | weight age (s) | SPS |\n|---|---|---|---|---|---|")
    for k, m in mean.items():
        case, name = k.split("/")
        print(f"| {case} | {name} | {m['parameter_lag']:.1f} | {m['updates_per_second']:.2f} | "
              f"{m['weight_age_seconds']:.2f} | {m['sps']:.0f} |")
    for name in checkouts:
        ratio = [r[f"learner_eval_pong/{name}"]["updates_per_second"] / r[f"learner_no_eval_pong/{name}"]["updates_per_second"]
                 for r in results["rounds"]]
        results[f"updates_per_second_with_eval_over_without/{name}"] = ratio
        print(f"\nlearner updates/s with evaluations running ÷ without ({name}): "
              + ", ".join(f"{x:.2f}" for x in ratio) + " (rounds)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main(tyro.cli(Args))
