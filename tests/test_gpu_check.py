"""benchmarks/gpu_check.py, the one command that proves the GPU paths on a lent GPU machine, run
here at toy sizes on the CPU (``--device cpu --small``) so that it cannot rot between GPU sessions.
The short runs of r2d2.py, r2d2_ray.py and r2d2_mp.py --amp are skipped here: on the CPU they are
what test_r2d2_cli, test_r2d2_ray and test_devices run, and their check is the same helper as the
central-inference run's, which runs. So is the checkpoint → resume → evaluate check: on the CPU it
is CPU → CPU, what test_checkpoint runs (a resumed run, a saved model evaluated); its runs use the
same helper too."""

import json
import subprocess
import sys

from tests.conftest import ROOT, script_env

CHECKS = ["machine", "precision of each part (learner update)", "r2d2.py", "r2d2_mp.py --inference local --amp",
          "r2d2_mp.py --inference central", "r2d2_ray.py", "checkpoint → resume → evaluate across devices",
          "learner at the paper batch", "actors through central inference", "whole system on Pong (central inference)"]


SKIPPED = ["r2d2.py", "r2d2_mp.py --inference local --amp", "r2d2_ray.py",
           "checkpoint → resume → evaluate across devices"]


def test_gpu_check_small_on_the_cpu_passes_every_check_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                           "--skip", *SKIPPED, "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=400, env=script_env("cpu"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["check"]: row for row in result["checks"]}
    assert list(rows) == CHECKS
    assert [name for name, row in rows.items() if row["status"] == "skipped"] == SKIPPED
    assert all(rows[name]["status"] == "ok" for name in CHECKS if name not in SKIPPED), rows
    precision = rows["precision of each part (learner update)"]["result"]
    assert precision["fp32"] == "torso float32, core float32, head float32"
    assert precision["amp"] == "torso bfloat16, core float32, head bfloat16"
    assert rows["r2d2_mp.py --inference central"]["result"]["updates"] > 0
    assert rows["whole system on Pong (central inference)"]["result"]["updates/s"] > 0
    assert rows["learner at the paper batch"]["result"]["amp updates/s"] > 0
    table = proc.stdout[proc.stdout.index("| check | status | s | result |"):]
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == len(CHECKS) + 1
