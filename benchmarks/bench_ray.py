"""Actor throughput of r2d2_ray.py against r2d2_mp.py, the same actors and envs, in one run.

    python benchmarks/bench_ray.py [--seconds 40]

Each case runs the script with the learner idle (``--learning-starts`` beyond the run), so its
SPS is the actors' (steps written to the replay per second), for ``--seconds`` after its first
progress line, then stops it with Ctrl-C; the SPS is the mean of the progress lines after the
first. Cases: CartPole (2 actors × 8 envs) and Pong (1 actor × 64 envs, 2 env splits, 2 ale-py
threads), each on r2d2_mp.py (shared memory) and r2d2_ray.py (an embedded Ray). Prints a table
with the ratio ray ÷ mp per env, writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "CartPole-v1": ["--num-actors", "2", "--num-envs-per-actor", "8", "--hidden-size", "128", "--torso-size", "128",
                    "--head-hidden-size", "128", "--buffer-size", "200000", "--log-interval", "5000"],
    "PongNoFrameskip-v4": ["--num-actors", "1", "--num-envs-per-actor", "64", "--env-splits", "2", "--env-threads",
                           "2", "--buffer-size", "200000", "--log-interval", "5000"],
}


@dataclass
class Args:
    seconds: float = 40.0
    """seconds measured per case, from the first progress line"""
    out: str = str(ROOT / "benchmarks" / "results" / "bench_ray.json")
    """JSON output"""


def actor_sps(script: str, env_id: str, case_args: list[str], seconds: float) -> float:
    with tempfile.TemporaryDirectory(prefix="br_", dir="/tmp") as tmp:
        env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONWARNINGS="ignore::DeprecationWarning")
        proc = subprocess.Popen([sys.executable, str(ROOT / "r2d2_algo" / script), "--env-id", env_id, *case_args,
                                 "--learning-starts", "1000000000", "--total-timesteps", "2000000000",
                                 "--eval-episodes", "0"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        rates, since = [], None
        for line in proc.stdout:
            match = re.match(r"step [\d,]+: SPS (\d+)", line)
            if match:
                since = since or time.time()
                rates.append(int(match.group(1)))
            if since and time.time() - since > seconds:
                break
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
    if len(rates) < 2:
        raise SystemExit(f"bench_ray.py: error: {script} on {env_id} logged {len(rates)} progress lines")
    return float(np.mean(rates[1:]))


def main(args: Args) -> None:
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "seconds": args.seconds,
               "cases": CASES, "sps": {}}
    for env_id, case_args in CASES.items():
        for script in ("r2d2_mp.py", "r2d2_ray.py"):
            results["sps"][f"{env_id}/{script}"] = sps = actor_sps(script, env_id, case_args, args.seconds)
            print(f"{env_id}, {script}: actor SPS {sps:.0f}", flush=True)
    print("\n| env | r2d2_mp.py actor SPS | r2d2_ray.py actor SPS | ray ÷ mp |\n|---|---|---|---|")
    for env_id in CASES:
        mp_sps, ray_sps = results["sps"][f"{env_id}/r2d2_mp.py"], results["sps"][f"{env_id}/r2d2_ray.py"]
        results["sps"][f"{env_id}/ray_over_mp"] = ray_sps / mp_sps
        print(f"| {env_id} | {mp_sps:.0f} | {ray_sps:.0f} | {ray_sps / mp_sps:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
