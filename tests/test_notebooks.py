"""The write_and_test notebooks run headless on a tiny sweep: write the config, run the
scheduler, read the results and save the figures (so the notebooks cannot rot).

Parameters are overridden papermill-style: a cell inserted after the cell tagged "parameters".
The sweep runs tests/helpers/fake_train.py (r2d2.py's run folder and tags, no learning)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "write_and_test"


def execute(notebook: Path, parameters: str, timeout: int = 120) -> nbformat.NotebookNode:
    """Run a notebook in its folder with `parameters` (Python source) injected after its parameters cell."""
    nb = nbformat.read(notebook, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


@pytest.mark.parametrize("name", ["write_experiments.ipynb", "read_experiments.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in nb.cells if cell.cell_type == "code")
    assert any("parameters" in cell.metadata.get("tags", []) for cell in nb.cells)


def test_write_scheduler_read_on_a_tiny_sweep(tmp_path):
    """From a clean clone's layout: write notebook → scheduler.py --max-parallel 2 → read notebook."""
    shutil.copy(ROOT / "scheduler.py", tmp_path)
    shutil.copy(ROOT / "tests" / "helpers" / "fake_train.py", tmp_path)
    (tmp_path / "experiment_configs").mkdir()
    (tmp_path / "write_and_test").mkdir()
    for name in ("write_experiments.ipynb", "read_experiments.ipynb"):
        shutil.copy(NOTEBOOKS / name, tmp_path / "write_and_test")

    write = execute(tmp_path / "write_and_test" / "write_experiments.ipynb", """
NAME, SCRIPT, SEEDS = "tiny", "fake_train.py", 2
ARGS = {"total_timesteps": 500, "log_interval": 50, "progress_bar": False}
GRID = {"sequence_length": [8, 16], "burn_in_length": [0, 8]}
""")
    config = tmp_path / "experiment_configs" / "tiny.yaml"
    assert config.is_file() and "8 runs" in outputs_text(write)

    result = subprocess.run([sys.executable, "scheduler.py", "--max-parallel", "2"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 8 runs done" in result.stderr

    read = execute(tmp_path / "write_and_test" / "read_experiments.ipynb", """
CONFIGS, FIG_PREFIX, TITLE = ["tiny"], "tiny", "fake_train.py"
""")
    figures = tmp_path / "write_and_test" / "figures"
    for name in ("tiny_return_vs_steps.png", "tiny_return_vs_wall_clock.png", "tiny_sps.png"):
        assert (figures / name).stat().st_size > 10_000, name
    text = outputs_text(read)
    assert "8 runs" in text and "final_return_mean" in text
    # fake_train's final return is 10 × sequence_length + burn_in_length + seed: the table shows the means
    assert "169.5" in text and "81.5" in text
