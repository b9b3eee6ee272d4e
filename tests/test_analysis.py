"""analysis.load_scalars reads back what SummaryWriter wrote."""

import pytest
from torch.utils.tensorboard import SummaryWriter

from r2d2_algo.analysis import load_scalars


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
