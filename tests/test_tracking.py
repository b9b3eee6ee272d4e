"""--track (CPU): each training script syncs its run to Weights & Biases, here offline
(``WANDB_MODE=offline``: this machine reaches no service). The offline run folder is read back
record by record (W&B's transaction log: 32 KiB blocks of length-prefixed protobuf records): it
holds the run's tensorboard scalars with their env steps, its arguments and, with
``--capture-video``, the saved model's evaluation video. Without wandb installed, ``--track`` is
one line and nothing is written."""

import glob
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import script_env

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--env-id", "CartPole-v1", "--hidden-size", "16", "--torso-size", "16", "--head-hidden-size", "16",
         "--burn-in-length", "2", "--sequence-length", "4", "--overlap", "2", "--batch-size", "8", "--buffer-size",
         "4000", "--learning-starts", "200", "--replay-ratio", "1", "--log-interval", "200", "--eval-episodes", "1",
         "--no-progress-bar", "--total-timesteps", "600", "--track", "--wandb-project-name", "r2d2-tests"]
PER_SCRIPT = {"r2d2.py": ["--num-envs", "2", "--save-model", "--capture-video"],
              "r2d2_mp.py": ["--num-actors", "1", "--num-envs-per-actor", "2"],
              "r2d2_ray.py": ["--num-actors", "1", "--num-envs-per-actor", "2", "--actor-push-interval", "10"]}


def wandb_records(path: str) -> list:
    """The protobuf records of a W&B transaction log (``run-*.wandb``): a 7-byte file header,
    then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type: 1 a whole
    record, 2/3/4 its first/middle/last part)."""
    data, records, part, position = open(path, "rb").read(), [], b"", 7
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        part += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def run(tmp_path, script: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="rt_", dir="/tmp") as ray_home:  # Ray's sockets: short paths
        env = script_env("cpu", WANDB_MODE="offline", WANDB_SILENT="true", RAY_TMPDIR=ray_home, HOME=ray_home,
                         PYTHONWARNINGS="ignore::DeprecationWarning", **(extra_env or {}))
        return subprocess.run([sys.executable, str(ROOT / "r2d2_algo" / script), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("script", ["r2d2.py", "r2d2_mp.py", "r2d2_ray.py"])
def test_track_offline_holds_the_scalars_the_arguments_and_the_videos(tmp_path, script):
    out = run(tmp_path, script, *SMALL, *PER_SCRIPT[script])
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    run_name = os.path.basename(run_dir)
    (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(log)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == run_name and started.project == "r2d2-tests"
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert config["env_id"] == "CartPole-v1" and config["total_timesteps"] == 600
    rows = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    sps_steps = [int(float(row["global_step"])) for row in rows if "charts/SPS" in row]
    assert sps_steps and sps_steps[-1] >= 400, sps_steps  # the tensorboard scalars, at their env steps
    assert any("losses/td_loss" in row for row in rows) and any("eval/episodic_return" in row for row in rows)
    if "--capture-video" in PER_SCRIPT[script]:
        assert glob.glob(str(tmp_path / "videos" / run_name / "*.mp4"))
        assert any(key.startswith("videos/") for row in rows for key in row)
        assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "**" / "*.mp4"),
                         recursive=True)


def test_track_without_wandb_is_one_line_and_writes_nothing(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n\n\nclass NoWandb:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'wandb':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, NoWandb())\n")
    out = run(tmp_path, "r2d2.py", *SMALL, extra_env={"PYTHONPATH": str(hide)})
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "r2d2.py: error: --track needs the wandb package, which is not installed: pip install wandb "
        "(or run without --track)"], out.stderr
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "wandb")


def test_capture_video_without_a_saved_model_is_one_line(tmp_path):
    out = run(tmp_path, "r2d2_mp.py", "--env-id", "CartPole-v1", "--capture-video")
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "r2d2_mp.py: error: --capture-video records the final evaluation of the saved model: it needs --save-model "
        "and --eval-episodes > 0"], out.stderr
