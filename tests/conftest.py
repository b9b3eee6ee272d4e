import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_script(tmp_path):
    """Run a script of r2d2_algo/ as a user would, in a fresh working directory."""

    def run(script, *args, timeout=600, env=None):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
        return subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / script), *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout, env=env)

    return run
