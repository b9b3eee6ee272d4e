"""benchmarks/soak.py, run for a few seconds on a small r2d2_mp.py run so that it cannot rot (the
30-minute soaks themselves are benchmarks: README, "Soak")."""

import csv
import json
import subprocess
import sys

from tests.conftest import ROOT, script_env


def test_soak_samples_the_process_tree_and_writes_csv_plot_and_verdict(tmp_path):
    command = [sys.executable, str(ROOT / "r2d2_algo" / "r2d2_mp.py"), "--env-id", "CartPole-v1", "--num-actors", "2",
               "--total-timesteps", "10000000", "--no-progress-bar", "--log-interval", "500"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.2", "--interval", "1",
                           "--label", "tiny", "--out-dir", str(tmp_path), "--", *command], capture_output=True, text=True,
                          timeout=180, env=script_env("cpu"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "tiny.csv")))
    assert len(rows) >= 8
    running = [r for r in rows if int(r["processes"]) >= 4]  # learner, 2 actors, evaluator (and the tracker)
    assert running and all(float(r["uss_gib"]) > 0.1 and int(r["fds"]) > 10 for r in running)
    assert max(int(r["replay_size"]) for r in rows) > 0  # read from the run's progress lines
    summary = json.loads((tmp_path / "tiny.json").read_text())
    assert summary["returncode"] == 130 and summary["processes_left_after_exit"] == 0
    assert summary["shm_gib_left_after_exit"] == 0
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    assert "tiny: " in proc.stdout and "%/h" in proc.stdout and "left after exit: 0 processes" in proc.stdout
