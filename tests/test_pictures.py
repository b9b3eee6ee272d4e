"""Pictures of runs (CPU): evaluate.py --capture-gif writes one animated GIF per episode, and
write_and_test/plot_run.py draws any run folder's curves (analysis.plot_run), whatever script
wrote it and whatever tags it lacks."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

matplotlib.use("Agg")

from r2d2_algo.analysis import RUN_PANELS, plot_run  # noqa: E402
from r2d2_algo.envs import make_env  # noqa: E402
from r2d2_algo.evaluate import RecordGif  # noqa: E402
from tests.conftest import script_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden-size", "16", "--torso-size", "16", "--head-hidden-size", "16", "--burn-in-length", "2",
         "--sequence-length", "4", "--overlap", "2", "--batch-size", "8", "--buffer-size", "4000",
         "--learning-starts", "400", "--replay-ratio", "1", "--log-interval", "400", "--eval-episodes", "2",
         "--no-progress-bar", "--total-timesteps", "2000", "--eval-interval", "1000", "--env-id", "CartPole-v1"]
TITLES = {f"{title} vs {x}" for title, _, _ in RUN_PANELS for x in ("steps", "wall-clock")}


def run(cwd, path, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / path), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=script_env())


@pytest.fixture(scope="module")
def r2d2_run(tmp_path_factory):
    """A short r2d2.py CartPole run with --save-model and --env-kwargs (its default value, so the
    same task): returns (working folder, run folder, model)."""
    cwd = tmp_path_factory.mktemp("r2d2")
    out = run(cwd, "r2d2_algo/r2d2.py", *SMALL, "--num-envs", "2", "--save-model",
              "--env-kwargs", "sutton_barto_reward:false")
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    (model,) = glob.glob(str(cwd / "saved_models" / "*" / "model.pt"))
    return cwd, run_dir, model


def gif_frames(path) -> tuple[list[Image.Image], int]:
    """The frames of a looping GIF, and how many milliseconds it plays (Pillow stores a frame equal
    to the one before as a longer duration of that one)."""
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.info.get("loop") == 0
        frames, milliseconds = [], 0
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(gif.convert("RGB"))
            milliseconds += gif.info["duration"]
        return frames, milliseconds


def test_capture_gif_writes_one_small_gif_per_episode(r2d2_run, tmp_path):
    cwd, _, model = r2d2_run
    out = run(tmp_path, "r2d2_algo/evaluate.py", "--model", model, "--episodes", "2", "--capture-gif", "--no-cuda",
              "--output", tmp_path / "eval.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    run_name = os.path.basename(os.path.dirname(model))
    assert result["gifs"] == [f"videos/{run_name}/episode-{i}.gif" for i in range(2)]
    assert result["videos"] == [] and not glob.glob(str(tmp_path / "videos" / "*" / "*.mp4"))  # a GIF only
    assert result["env_kwargs"] == ["sutton_barto_reward:false"]  # the model's run's env, kwargs and all
    for gif, length in zip(result["gifs"], result["lengths"]):
        assert f"video: {gif}" in out.stdout
        frames, milliseconds = gif_frames(tmp_path / gif)
        # the reset frame, every 2nd step's and the last, each 2 / 50 s (CartPole's render_fps is 50);
        # CartPole's 600 × 400 shrunk to 320 wide
        assert milliseconds == 40 * (1 + math.ceil(length / 2)) and len(frames) > 1
        assert frames[0].size == (320, 213)
        assert any(a.tobytes() != b.tobytes() for a, b in zip(frames, frames[1:]))  # the pole moves
        assert (tmp_path / gif).stat().st_size < 1_000_000


def test_capture_gif_beside_the_mp4_at_full_size(r2d2_run, tmp_path):
    _, _, model = r2d2_run
    out = run(tmp_path, "r2d2_algo/evaluate.py", "--model", model, "--episodes", "1", "--capture-video",
              "--capture-gif", "--gif-width", "0", "--gif-frame-skip", "1", "--no-cuda",
              "--output", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    (video,), (gif,) = result["videos"], result["gifs"]
    assert os.path.dirname(video) == os.path.dirname(gif) and os.path.isfile(tmp_path / video)
    frames, milliseconds = gif_frames(tmp_path / gif)
    assert milliseconds == 20 * (result["lengths"][0] + 1) and frames[0].size == (600, 400)


@pytest.mark.parametrize("flag, value", [("--gif-frame-skip", "0"), ("--gif-width", "-1")])
def test_bad_gif_settings_are_one_line(r2d2_run, tmp_path, flag, value):
    _, _, model = r2d2_run
    out = run(tmp_path, "r2d2_algo/evaluate.py", "--model", model, "--capture-gif", flag, value, "--no-cuda")
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "error:" in lines[0] and flag in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "videos")


def test_record_gif_enlarges_minatar_float_frames_sharply(tmp_path):
    """MinAtar renders (10, 10, 3) floats in [0, 1]: uint8 frames, 32× nearest neighbour."""
    env = RecordGif(make_env("minatar.gym:MinAtar/Breakout-v1", render_mode="rgb_array"), str(tmp_path / "b.gif"),
                    width=320, frame_skip=1)
    env.reset(seed=0)
    for _ in range(5):
        env.step(0)
    env.close()  # the episode has not ended: close writes what was recorded
    frames, milliseconds = gif_frames(tmp_path / "b.gif")
    assert milliseconds == 6 * 30 and frames[0].size == (320, 320)  # 30 fps when the env declares none
    pixels = frames[0].load()
    cells = {pixels[x, y] for x in range(320) for y in range(320)}
    assert len(cells) > 1 and cells <= {pixels[32 * i + 16, 32 * j + 16] for i in range(10) for j in range(10)}


def assert_panels(fig, missing=()):
    """Every row's two panels are there; those of ``missing`` rows say they were not logged, the others draw."""
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == TITLES
    for title, ax in axes.items():
        said = " ".join(t.get_text() for t in ax.texts)
        if title.rsplit(" vs ", 1)[0] in missing:
            assert "not logged" in said and not ax.lines, title
        else:
            assert ax.lines and "not logged" not in said, title


def test_plot_run_of_an_r2d2_run(r2d2_run, tmp_path):
    cwd, run_dir, _ = r2d2_run
    out = run(cwd, "write_and_test/plot_run.py", run_dir, "--out", tmp_path / "figure.png")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "figure.png").stat().st_size > 20_000 and f"wrote {tmp_path / 'figure.png'}" in out.stdout
    fig = plot_run(run_dir)
    assert_panels(fig)
    lag = next(ax for ax in fig.axes if ax.get_title() == "parameter lag vs steps")
    assert "0 throughout" in lag.texts[0].get_text()  # r2d2.py acts with the learner's own network
    assert "last evaluation" in fig._suptitle.get_text()


def test_plot_run_of_an_r2d2_mp_run_into_its_folder(tmp_path):
    out = run(tmp_path, "r2d2_algo/r2d2_mp.py", *SMALL, "--num-actors", "1", "--num-envs-per-actor", "2")
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    out = run(tmp_path, "write_and_test/plot_run.py", run_dir)
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 20_000
    assert_panels(plot_run(run_dir))


def test_plot_run_says_which_curves_a_run_lacks(tmp_path):
    """fake_train.py logs returns and SPS only; a folder without events is one line."""
    out = run(tmp_path, "tests/helpers/fake_train.py", "--total-timesteps", "500", "--log-interval", "100")
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    out = run(tmp_path, "write_and_test/plot_run.py", run_dir, tmp_path, "--out-dir", tmp_path / "figures")
    assert out.returncode == 1 and out.stderr.strip() == f"plot_run.py: error: no tensorboard event file in {tmp_path}"
    assert (tmp_path / "figures" / f"{os.path.basename(run_dir)}.png").stat().st_size > 20_000
    assert_panels(plot_run(run_dir), missing=("TD loss", "parameter lag"))
