"""analysis: tensorboard runs and the scheduler's records → pandas; seeds aggregated on a common grid."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

from r2d2_algo.analysis import (load_hparams, load_run_table, load_scalars, load_sweep, run_summary_table,
                                runs_from_folders, summarize)
from r2d2_algo.experiments import write_record


def test_load_scalars_round_trip(tmp_path):
    for run, scale in (("a", 1.0), ("b", 2.0)):
        with SummaryWriter(tmp_path / run) as writer:
            for step in (10, 20, 30):
                writer.add_scalar("eval/episodic_return", scale * step, step)
                writer.add_scalar("charts/SPS", 100.0, step)
    df = load_scalars([tmp_path / "a", tmp_path / "b"], tags=["eval/episodic_return"])
    assert set(df["tag"]) == {"eval/episodic_return"}
    b = df[df["run"] == "b"].sort_values("step")
    assert b["step"].tolist() == [10, 20, 30] and b["value"].tolist() == [20.0, 40.0, 60.0]
    assert (df.groupby("run")["wall_time"].min() == 0).all()
    assert len(load_scalars([tmp_path / "a"])) == 6


def test_load_scalars_refuses_a_folder_without_events(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tensorboard event file"):
        load_scalars([tmp_path])


def write_run(runs_dir, name, points, hparams=None):
    """A tensorboard run folder with eval/episodic_return at the given (step, value) points, and
    the arguments in args.json as the training scripts write them."""
    with SummaryWriter(runs_dir / name) as writer:
        if hparams:
            (runs_dir / name / "args.json").write_text(json.dumps(hparams))
        for step, value in points:
            writer.add_scalar("eval/episodic_return", value, step)
            writer.add_scalar("charts/SPS", 100.0 * value, step)
    return runs_dir / name


def test_summarize_interpolates_seeds_onto_a_common_grid_with_a_t_interval():
    # two seeds logged at different steps; seed b is a shifted copy of a
    rows = [("a", s, float(s)) for s in (0, 10, 20, 30, 40)] + [("b", s, s + 2.0) for s in (5, 15, 25, 35)]
    df = pd.DataFrame(rows, columns=["run", "step", "value"]).assign(tag="eval/episodic_return", wall_time=0.0, lr=1)
    out = summarize(df, by=["lr"], num_points=4)
    assert out["step"].tolist() == [5.0, 15.0, 25.0, 35.0]  # the range both seeds cover, no extrapolation
    assert np.allclose(out["mean"], out["step"] + 1.0) and (out["n"] == 2).all()
    half = stats.t.ppf(0.975, 1) * np.sqrt(2.0) / np.sqrt(2)  # sample std of {x, x+2} is √2
    assert np.allclose(out["upper"] - out["mean"], half) and np.allclose(out["mean"] - out["lower"], half)
    rng = summarize(df, by=[], num_points=2, band="range")
    assert np.allclose(rng["lower"], [5.0, 35.0]) and np.allclose(rng["upper"], [7.0, 37.0])
    with pytest.raises(ValueError, match="no column"):
        summarize(df, by=["sequence_length"])


def test_run_table_attaches_config_values_and_skips_unfinished_attempts(tmp_path):
    runs_dir = tmp_path / "runs"
    for seed, state in ((1, "done"), (2, "done"), (3, "interrupted")):
        name = f"CartPole-v1__study-sequence_length=8__{seed}__100"
        write_run(runs_dir, name, [(10, 1.0 * seed), (20, 2.0 * seed)])
        write_record(runs_dir / "_scheduler" / "study" / f"study-sequence_length=8__{seed}.json", {
            "run_id": f"study-sequence_length=8__{seed}", "config_name": "study", "exp_name": "study-sequence_length=8",
            "state": state, "exit_code": 0 if state == "done" else None, "attempts": 1, "log": "x.log",
            "run_dir": f"runs/{name}", "values": {"sequence_length": 8, "env_id": "CartPole-v1", "seed": seed}})
    runs = load_run_table(runs_dir)
    assert sorted(runs["seed"]) == [1, 2] and set(runs["sequence_length"]) == {8}
    assert len(load_run_table(runs_dir, states=None)) == 3 and len(load_run_table(runs_dir, configs=["other"])) == 0
    df = load_sweep(runs)
    assert set(df["seed"]) == {1, 2} and set(df["tag"]) == {"eval/episodic_return", "charts/SPS"}
    table = run_summary_table(df, by=["sequence_length"])
    assert table.loc[8, "runs"] == 2
    assert table.loc[8, "final_return_mean"] == 3.0 and table.loc[8, "best_return_mean"] == 3.0  # (2 + 4) / 2


def test_run_summary_sps_is_steps_over_wall_clock_whatever_the_log_interval():
    """Run a logs every 100 steps, run b every 5 s; each run's SPS is its steps ÷ its seconds."""
    a = [("a", step, 1.0, step / 100.0) for step in range(100, 1001, 100)]  # 100 steps/s, logs every 1 s
    b = [("b", step, 1.0, t) for t, step in ((5.0, 1000), (10.0, 4000), (15.0, 5000))]  # 4,000 steps in 10 s
    df = pd.DataFrame(a + b, columns=["run", "step", "value", "wall_time"]).assign(tag="charts/SPS", lr=1)
    table = run_summary_table(df, by=["run"], return_tag="eval/episodic_return")
    assert np.isclose(table.loc["a", "SPS_mean"], 100.0) and np.isclose(table.loc["b", "SPS_mean"], 400.0)


def test_runs_from_folders_read_the_arguments_of_args_json(tmp_path):
    run = write_run(tmp_path, "r", [(1, 1.0)], {"exp_name": "x", "seed": 3, "learning_rate": 0.001,
                                                "cuda": False, "rnn_type": "lstm", "hline": None})
    table = runs_from_folders([run])
    row = table.iloc[0]
    assert row["run"] == "r" and row["seed"] == 3 and row["learning_rate"] == 0.001
    assert table["cuda"].tolist() == [False] and table["hline"].tolist() == [None] and row["rnn_type"] == "lstm"
    assert load_hparams(write_run(tmp_path, "plain", [(1, 1.0)])) == {}
