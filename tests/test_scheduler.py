"""scheduler.py and experiments.py: configs are validated before anything starts, sweeps run a
few at a time, and a scheduler killed mid-sweep resumes without rerunning finished runs.

Most tests use tests/helpers/fake_train.py (an r2d2.py stand-in that starts in half a second);
one runs the real r2d2.py."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from r2d2_algo.experiments import ConfigError, load_config, read_records, validate_config, write_config

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "helpers" / "fake_train.py"


@pytest.fixture
def repo(tmp_path):
    """A working directory like the repository root: fake_train.py and experiment_configs/."""
    shutil.copy(FAKE, tmp_path / "fake_train.py")
    (tmp_path / "experiment_configs").mkdir()
    return tmp_path


def write(repo: Path, name: str, text: str) -> Path:
    path = repo / "experiment_configs" / name
    path.write_text(textwrap.dedent(text))
    return path


def scheduler(repo: Path, *args, timeout=120, popen=False):
    cmd = [sys.executable, str(ROOT / "scheduler.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout, env=env)


def records(repo: Path) -> dict:
    return {r["run_id"]: r for r in read_records(repo / "runs")}


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def sweep(**args) -> str:
    """A 2 sequence lengths × 2 seeds sweep of fake_train.py; keyword arguments are added to args."""
    args = {"total_timesteps": 500, "progress-bar": "false", **args}
    return ("script: fake_train.py\nseeds: 2\nargs:\n" + "".join(f"  {k}: {v}\n" for k, v in args.items())
            + "grid:\n  sequence_length: [8, 16]\n")


SWEEP = sweep()


# --- configs ---------------------------------------------------------------------------------


def test_grid_expands_to_runs_with_deterministic_ids(repo):
    path = write(repo, "study.yaml", """\
        script: fake_train.py
        seeds: [1, 5]
        args: {total-timesteps: 300, progress_bar: false}
        grid:
          burn_in_length: [0, 8]
          sequence_length,log_interval: [[8, 50], [16, 100]]
        """)
    runs = load_config(path, root=repo)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    assert [r.seed for r in runs] == [1] * 4 + [5] * 4  # seed-major: half a sweep covers the grid
    first = runs[0]
    assert first.run_id == "study-burn_in_length=0-sequence_length=8-log_interval=50__1"
    assert first.values == {"total_timesteps": 300, "progress_bar": False, "burn_in_length": 0,
                            "sequence_length": 8, "log_interval": 50, "seed": 1}
    assert list(first.argv) == ["--exp-name", first.exp_name, "--seed", "1", "--total-timesteps", "300",
                                "--no-progress-bar", "--burn-in-length", "0", "--sequence-length", "8",
                                "--log-interval", "50"]
    assert first.slots == 1 and first.run_dir_glob() == f"runs/*__{first.exp_name}__1__*"
    assert [r.run_id for r in load_config(path, root=repo)] == [r.run_id for r in runs]  # deterministic


def test_slots_count_actor_processes(repo):
    mp = validate_config({"script": "fake_train.py", "args": {"num_actors": 3}}, "mp.yaml", repo)
    assert mp[0].slots == 4  # num_actors + the learner, like r2d2_mp.py
    assert validate_config({"script": "fake_train.py", "slots": 2}, "big.yaml", repo)[0].slots == 2


def test_real_scripts_validate_and_mp_takes_actors_plus_one_slots():
    runs = validate_config({"script": "r2d2_mp.py", "args": {"num_actors": 2, "env_id": "CartPole-v1"},
                            "grid": {"burn_in_length": [0, 4]}}, "mp.yaml", ROOT)
    assert [r.slots for r in runs] == [3, 3] and runs[0].script == "r2d2_algo/r2d2_mp.py"  # a bare name works
    with pytest.raises(ConfigError, match=r"^cfg.yaml: args.sequnce_length: r2d2_algo/r2d2.py has no argument "
                                          r"--sequnce-length \(did you mean --sequence-length\?\)$"):
        validate_config({"script": "r2d2_algo/r2d2.py", "args": {"sequnce_length": 8}}, "cfg.yaml", ROOT)
    with pytest.raises(ConfigError, match=r"cfg.yaml: grid.rnn_type: 'gur' is not a valid value of --rnn-type "
                                          r"\(Literal\['lstm', 'gru', 'none'\]\)"):
        validate_config({"script": "r2d2_algo/r2d2.py", "grid": {"rnn_type": ["lstm", "gur"]}}, "cfg.yaml", ROOT)
    with pytest.raises(ConfigError, match=r"cfg.yaml: run .*: --burn-in-length must be >= 0"):  # r2d2.check_args
        validate_config({"script": "r2d2_algo/r2d2.py", "grid": {"burn_in_length": [2, -1]}}, "cfg.yaml", ROOT)


@pytest.mark.parametrize("text, message", [
    ("script: fake_train.py\nargs: {sequnce_length: 8}",
     "bad.yaml: args.sequnce_length: fake_train.py has no argument --sequnce-length (did you mean --sequence-length?)"),
    ("script: missing.py", "bad.yaml: script: missing.py not found"),
    ("args: {sequence_length: 8}", "bad.yaml: script: missing"),
    ("script: fake_train.py\ngrid: {sequence_length: 8}",
     "bad.yaml: grid.sequence_length: must be a non-empty list of values, got 8"),
    ("script: fake_train.py\ngrid: {sequence_length: []}", "bad.yaml: grid.sequence_length: must be a non-empty list"),
    ("script: fake_train.py\ngrid: {sequence_length: [8, 8]}", "bad.yaml: grid.sequence_length: repeats the value 8"),
    ("script: fake_train.py\ngrid: {sequence_lenght: [8, 16]}", "bad.yaml: grid.sequence_lenght: fake_train.py has no"),
    ("script: fake_train.py\nargs: {sequence_length: 8}\ngrid: {sequence_length: [8, 16]}",
     "bad.yaml: grid.sequence_length: also set in args"),
    ("script: fake_train.py\ngrid: {sequence_length: [8, eight]}",
     "bad.yaml: grid.sequence_length: 'eight' is not a valid value of --sequence-length (int)"),
    ("script: fake_train.py\ngrid: {'sequence_length,burn_in_length': [[8, 0], [16]]}",
     "bad.yaml: grid.sequence_length,burn_in_length: each entry must be a list of 2 values"),
    ("script: fake_train.py\nargs: {seed: 3}", "bad.yaml: args.seed: set by the scheduler"),
    ("script: fake_train.py\nargs: {exp_name: x}", "bad.yaml: args.exp_name: set by the scheduler"),
    ("script: fake_train.py\nseeds: 0", "bad.yaml: seeds: must be >= 1"),
    ("script: fake_train.py\nseeds: [1, 1]", "bad.yaml: seeds: repeats a seed"),
    ("script: fake_train.py\ngird: {sequence_length: [8]}", "bad.yaml: gird: unknown key (did you mean grid?)"),
    ("script: fake_train.py\nargs: {total_timesteps: [1, 2}", "bad.yaml: line 2: invalid YAML"),
])
def test_bad_config_is_refused_naming_file_and_key(repo, text, message):
    path = write(repo, "bad.yaml", text)
    with pytest.raises(ConfigError) as error:
        load_config(path, root=repo)
    assert str(error.value).startswith(str(path.parent) + "/") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_scheduler_refuses_a_bad_config_before_starting_anything(repo):
    write(repo, "a_good.yaml", SWEEP)
    write(repo, "b_bad.yaml", "script: fake_train.py\nargs: {sequnce_length: 8}\n")
    result = scheduler(repo, "--max-parallel", 2)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "scheduler.py: error: experiment_configs/b_bad.yaml: args.sequnce_length: fake_train.py has no argument "
        "--sequnce-length (did you mean --sequence-length?)"]
    assert not (repo / "runs").exists()  # the good config did not start either


def test_write_config_validates_then_writes_yaml(repo):
    path = repo / "experiment_configs" / "w.yaml"
    with pytest.raises(ConfigError, match="w.yaml: grid.sequence_length: must be a non-empty list"):
        write_config(path, "fake_train.py", grid={"sequence_length": 8}, root=repo)
    assert not path.exists()
    runs = write_config(path, "fake_train.py", {"total_timesteps": 200}, {"sequence_length": (8, 16)}, seeds=2,
                        description="two lengths", root=repo)
    assert [r.run_id for r in load_config(path, root=repo)] == [r.run_id for r in runs] and len(runs) == 4


def test_dry_run_lists_runs_and_starts_nothing(repo):
    write(repo, "sweep.yaml", SWEEP)
    result = scheduler(repo, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "experiment_configs/sweep.yaml: 4 runs, 4 to run" in result.stdout
    assert "python fake_train.py --exp-name sweep-sequence_length=16 --seed 2" in result.stdout
    assert not (repo / "runs").exists()


# --- running ---------------------------------------------------------------------------------


def test_sweep_runs_then_skips_done_and_retries_failed_on_request(repo):
    write(repo, "sweep.yaml", sweep(fail_seed=2))
    result = scheduler(repo, "--max-parallel", 2)
    assert result.returncode == 1 and "2 run(s) failed" in result.stderr
    state = records(repo)
    assert sorted((r["seed"], r["state"], r["exit_code"]) for r in state.values()) == [
        (1, "done", 0), (1, "done", 0), (2, "failed", 3), (2, "failed", 3)]
    done = state["sweep-sequence_length=8__1"]
    assert Path(repo / done["run_dir"]).is_dir() and done["values"]["sequence_length"] == 8
    assert "OMP_NUM_THREADS=1" in (repo / done["log"]).read_text()  # the thread budget reaches the run
    assert "error: seed 2 fails" in (repo / state["sweep-sequence_length=8__2"]["log"]).read_text()

    again = scheduler(repo, "--max-parallel", 2)  # done and failed runs are both skipped
    assert again.returncode == 1 and "0 done" not in again.stdout and "2 done, 0 to run, 2 failed skipped" in again.stdout
    assert all(r["attempts"] == 1 for r in records(repo).values())

    retry = scheduler(repo, "--max-parallel", 2, "--retry-failed")
    assert retry.returncode == 1
    assert {k: r["attempts"] for k, r in records(repo).items()} == {
        "sweep-sequence_length=8__1": 1, "sweep-sequence_length=16__1": 1,
        "sweep-sequence_length=8__2": 2, "sweep-sequence_length=16__2": 2}

    write(repo, "sweep.yaml", sweep(total_timesteps=600))
    changed = scheduler(repo)  # results of done runs would no longer match their config
    assert changed.returncode == 2
    assert "experiment_configs/sweep.yaml: total_timesteps: changed since run" in changed.stderr


def test_killed_scheduler_resumes_without_rerunning_finished_runs(repo):
    """SIGKILL mid-sweep (2 runs done, 2 running); the restart reruns only the 2 interrupted ones."""
    write(repo, "sweep.yaml", sweep(total_timesteps=1000, step_seconds=0.25))
    first = scheduler(repo, "--max-parallel", 2, popen=True)
    try:
        wait_for(lambda: sorted(r["state"] for r in records(repo).values()) == ["done", "done", "running", "running"]
                 and len(list((repo / "runs").glob("CartPole-v1__*"))) == 4)  # the running ones have begun writing
    finally:
        first.kill()
        first.wait()
    before = records(repo)
    done = {k: r for k, r in before.items() if r["state"] == "done"}
    running = {k: r for k, r in before.items() if r["state"] == "running"}
    assert [r["seed"] for r in done.values()] == [1, 1]
    wait_for(lambda: not any(alive(r["pid"]) for r in running.values()), timeout=10)  # no orphan outlives it
    time.sleep(1.1)  # the rerun's run folder gets a new unix-time suffix

    result = scheduler(repo, "--max-parallel", 2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("was running when the last scheduler stopped") == 2
    after = records(repo)
    assert all(r["state"] == "done" for r in after.values())
    for run_id, record in done.items():  # not rerun: same attempt, same run folder
        assert after[run_id]["attempts"] == 1 and after[run_id]["run_dir"] == record["run_dir"]
    for run_id in running:
        assert after[run_id]["attempts"] == 2
        assert "removed runs/" in (repo / after[run_id]["log"]).read_text()
    folders = sorted(p.name for p in (repo / "runs").iterdir() if p.name != "_scheduler")
    assert len(folders) == 4 and sorted(Path(r["run_dir"]).name for r in after.values()) == folders


def test_sigterm_stops_every_run_and_a_second_scheduler_is_refused(repo):
    write(repo, "sweep.yaml", sweep(total_timesteps=10000, step_seconds=0.5))
    first = scheduler(repo, "--max-parallel", 2, popen=True)
    try:
        wait_for(lambda: [r["state"] for r in records(repo).values()].count("running") == 2)
        second = scheduler(repo)
        assert second.returncode == 2 and "another scheduler" in second.stderr
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM, out
    state = records(repo)
    stopped = [r for r in state.values() if r["attempts"] == 1]
    assert len(stopped) == 2 and all(r["state"] == "interrupted" for r in stopped)
    assert not any(alive(int(line.split(" pid ")[1].split()[0]))
                   for r in stopped for line in (repo / r["log"]).read_text().splitlines() if " pid " in line)
    dry = scheduler(repo, "--dry-run")
    assert dry.stdout.count("run   interrupted") == 2 and dry.stdout.count("run   pending") == 2


def load_scheduler_module():
    if "scheduler_under_test" not in sys.modules:
        spec = importlib.util.spec_from_file_location("scheduler_under_test", ROOT / "scheduler.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass resolves annotations through it
        spec.loader.exec_module(module)
    return sys.modules["scheduler_under_test"]


def test_gpu_assignment_spreads_runs():
    sched = load_scheduler_module()
    assert sched.visible_gpus(device_count=0, environ={}) == []
    assert sched.visible_gpus(device_count=1, environ={}) == []  # one GPU: CUDA_VISIBLE_DEVICES untouched
    assert sched.visible_gpus(device_count=3, environ={}) == ["0", "1", "2"]
    assert sched.visible_gpus(device_count=2, environ={"CUDA_VISIBLE_DEVICES": "4,6"}) == ["4", "6"]
    gpus = ["0", "1", "2"]
    assert sched.assign_gpu([], ["0"]) is None
    assert sched.assign_gpu(gpus, []) == "0"
    assert sched.assign_gpu(gpus, ["0"]) == "1"
    assert sched.assign_gpu(gpus, ["0", "1"]) == "2"
    assert sched.assign_gpu(gpus, ["0", "1", "2"]) == "0"
    assert sched.assign_gpu(gpus, ["0", "0", "2"]) == "1"  # the least loaded, after a run on 1 ended


def test_runs_get_their_gpu_in_cuda_visible_devices(repo, monkeypatch):
    sched = load_scheduler_module()
    write(repo, "sweep.yaml", sweep(total_timesteps=400, step_seconds=0.1))
    monkeypatch.chdir(repo)
    runs = load_config("experiment_configs/sweep.yaml")
    args = sched.Args(max_parallel=2, poll_interval=0.05, progress_bar=False)
    scheduler_ = sched.Scheduler(runs, args, gpus=["0", "1"])
    progress = sched.Progress(len(runs), 0, bar=False, status_interval=60)
    scheduler_.loop(progress)
    state = records(repo)
    assert all(r["state"] == "done" for r in state.values())
    assert sorted(r["gpu"] for r in state.values()) == ["0", "0", "1", "1"]
    for r in state.values():
        assert f"CUDA_VISIBLE_DEVICES={r['gpu']} " in (repo / r["log"]).read_text()


def test_real_r2d2_run_through_the_scheduler(repo):
    write(repo, "real.yaml", f"""\
        script: {ROOT / 'r2d2_algo' / 'r2d2.py'}
        args: {{total_timesteps: 1000, learning_starts: 500, eval_interval: 1000, eval_episodes: 1,
                progress_bar: false, cuda: false, num_envs: 4}}
        """)
    result = scheduler(repo, "--max-parallel", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = records(repo).values()
    assert record["state"] == "done" and Path(record["run_dir"]).name.startswith("CartPole-v1__real__1__")
    assert "eval return" in (repo / record["log"]).read_text()
    assert json.loads((repo / "runs" / "_scheduler" / "real" / "real__1.json").read_text())["exit_code"] == 0


def test_interrupted_run_with_checkpoints_is_resumed_not_restarted(repo):
    """A real r2d2.py run with --checkpoint-interval: the scheduler is SIGKILLed, its run gets
    SIGTERM and writes a last checkpoint; the restarted scheduler resumes it in the same folder."""
    write(repo, "ckpt.yaml", f"""\
        script: {ROOT / 'r2d2_algo' / 'r2d2.py'}
        args: {{total_timesteps: 6000, learning_starts: 500, replay_ratio: 4, eval_interval: 3000, eval_episodes: 1,
                checkpoint_interval: 1000, progress_bar: false, cuda: false, num_envs: 4}}
        """)
    first = scheduler(repo, "--max-parallel", 1, popen=True)
    wait_for(lambda: list((repo / "saved_checkpoints").glob("*/checkpoint.pt")), timeout=120)
    (record,) = records(repo).values()
    first.send_signal(signal.SIGKILL)
    first.wait()
    wait_for(lambda: not alive(record["pid"]), timeout=60)  # SIGTERM from the dead scheduler: a last checkpoint
    second = scheduler(repo, "--max-parallel", 1, timeout=300)
    assert second.returncode == 0, second.stdout
    (record,) = records(repo).values()
    assert record["state"] == "done" and record["attempts"] == 2
    log = (repo / record["log"]).read_text()
    assert "resuming the earlier attempt from saved_checkpoints/" in log and "--resume" in log
    assert "resuming CartPole-v1__ckpt__1__" in log  # r2d2.py continued from the checkpoint's step
    (run_dir,) = (repo / "runs").glob("CartPole-v1__ckpt__1__*")  # one folder, continued
    assert record["run_dir"] and Path(record["run_dir"]).name == run_dir.name
    from r2d2_algo.analysis import load_scalars

    steps = load_scalars([run_dir], ["charts/SPS"])["step"]
    assert steps.is_unique and steps.max() == 6000
