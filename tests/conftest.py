"""Every test states its device.

- A test of code that behaves differently on CUDA takes the ``device`` fixture: it runs on
  ``cpu`` always and on ``cuda`` too where a GPU is present (skipped otherwise; the test id
  names the device, e.g. ``test_x[cuda]``).
- Every other test runs on the CPU whether or not a GPU is present: in the test process
  ``torch.cuda.is_available()`` answers False, and every process a test starts (a script, Ray's
  workers) sees no GPU (``CUDA_VISIBLE_DEVICES=""``; a ``cuda`` test starts its scripts with
  ``script_env("cuda")``). So on a GPU machine the suite does not pick the GPU behind a test's
  back, and a comparison tuned on the CPU trajectory stays on it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# read once, before the GPUs are hidden below (tests also import this file as tests.conftest)
if "R2D2_TESTS_CUDA" not in os.environ:
    os.environ["R2D2_TESTS_CUDA"] = "1" if torch.cuda.is_available() else "0"
    os.environ["R2D2_TESTS_CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    if os.environ["R2D2_TESTS_CUDA"] == "1":  # this process keeps its GPUs: counted before they are hidden
        torch.cuda.init()
        torch.cuda.device_count()
    # every process a test (or a module fixture) starts sees no GPU, unless started with script_env("cuda")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
CUDA_AVAILABLE = os.environ["R2D2_TESTS_CUDA"] == "1"
ORIGINAL_CUDA_VISIBLE_DEVICES = os.environ["R2D2_TESTS_CUDA_VISIBLE_DEVICES"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a device-dependent test runs on: 'cpu', and 'cuda' where one is present."""
    return request.param


@pytest.fixture(autouse=True)
def _environment_restored_after_each_test():
    """What a test (or a library it calls in-process) sets in ``os.environ`` is undone after it:
    an in-process ``ray.init()`` sets ``RAY_AUTH_MODE=token`` in its caller's environment (Ray
    2.59+), and every later test's ``ray start`` then demanded a token it did not have (CI)."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _cpu_unless_the_test_runs_on_cuda(request, monkeypatch):
    """In the test process, code that asks whether CUDA is there (a script's main, evaluate) hears
    no, unless the test runs on device 'cuda'; then the processes it starts see the GPUs too."""
    if getattr(request.node, "callspec", None) is not None and request.node.callspec.params.get("device") == "cuda":
        # and the processes it spawns (central inference, a script) see the GPUs
        if ORIGINAL_CUDA_VISIBLE_DEVICES == "all":
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ORIGINAL_CUDA_VISIBLE_DEVICES)
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def marked_copy_of_the_repository(folder: Path) -> tuple[Path, str]:
    """A copy of the scripts' package (with the presets it holds) under ``folder``, whose
    ``r2d2_algo`` prints where it was imported from. Returns (the copy's root, the line it prints):
    a script run from the copy must use the copy's package, installed or not."""
    clone = folder / "clone"
    shutil.copytree(ROOT / "r2d2_algo", clone / "r2d2_algo", ignore=shutil.ignore_patterns("__pycache__"))
    with open(clone / "r2d2_algo" / "__init__.py", "a") as f:
        f.write("\nprint('r2d2_algo imported from', __file__)\n")
    return clone, f"r2d2_algo imported from {clone / 'r2d2_algo' / '__init__.py'}"


def script_env(device: str = "cpu", **extra) -> dict:
    """The environment of a process a test starts on ``device``: a 'cuda' one sees the GPUs this
    session sees (the autouse fixture hides them from every other test's processes)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)
    if device == "cuda":
        if ORIGINAL_CUDA_VISIBLE_DEVICES == "all":
            env.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ORIGINAL_CUDA_VISIBLE_DEVICES
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.fixture
def run_script(tmp_path):
    """Run a script of r2d2_algo/ as a user would, in a fresh working directory, on ``device``
    (default 'cpu': the script sees no GPU)."""

    def run(script, *args, timeout=600, env=None, device="cpu"):
        return subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / script), *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout, env=script_env(device, **(env or {})))

    return run
