"""ray_supervisor.py: --role-nodes, how a rebuilt role is recognised (a new incarnation), and the
last look at the roles at the end of a run (an in-process Ray, CPU). Starting, restarting and
rebuilding the run's roles end to end: test_r2d2_ray.py, test_ray_nodes.py."""

import tempfile
import time
import types

import pytest

ray = pytest.importorskip("ray")

from r2d2_algo import ray_supervisor  # noqa: E402
from r2d2_algo.ray_supervisor import Supervisor, role_nodes  # noqa: E402


def test_role_nodes_names_each_role_once_or_refuses_in_one_line():
    args = types.SimpleNamespace(num_actors=2, num_replay_shards=1, role_nodes=None)
    assert role_nodes(args) == {}
    args.role_nodes = "param-store=10.0.0.1, evaluator=10.0.0.2,replay-shard-0=10.0.0.3,actor-1=10.0.0.4"
    assert role_nodes(args) == {"param-store": "10.0.0.1", "evaluator": "10.0.0.2", "replay-shard-0": "10.0.0.3",
                                "actor-1": "10.0.0.4"}
    for bad in ["actor-2=10.0.0.1", "replay-shard-1=10.0.0.1", "weight-store=10.0.0.1", "actor-0", "actor-0="]:
        args.role_nodes = bad
        with pytest.raises(ValueError, match=r"is not ROLE=NODE_IP with ROLE one of param-store, evaluator, "
                                             r"replay-shard-0\.\.0, actor-0\.\.1"):
            role_nodes(args)


def test_a_new_incarnation_is_a_move_recorded_once():
    supervisor = object.__new__(Supervisor)  # its record alone, without Ray
    supervisor.where = {"replay shard 0": ("127.0.0.2", "a")}
    assert supervisor.moved("replay shard 0", ("127.0.0.2", "a")) is None
    assert supervisor.moved("replay shard 0", ("127.0.0.3", "b")) == ("replay shard 0", "127.0.0.2", "127.0.0.3")
    assert supervisor.moved("replay shard 0", ("127.0.0.3", "b")) is None
    assert supervisor.where["replay shard 0"] == ("127.0.0.3", "b")


@pytest.fixture
def local_ray():
    """An in-process Ray (1 CPU), its files in a short temporary folder."""
    with tempfile.TemporaryDirectory(prefix="rs_", dir="/tmp") as folder:
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=folder, configure_logging=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def test_the_end_of_a_run_waits_for_the_roles_to_say_where_they_are(local_ray, monkeypatch, capsys):
    """``Supervisor.settle``, the last look of a run at the roles Ray rebuilds: a role whose answer
    comes 2 s after the run's last step from a new incarnation (Ray rebuilt it after its node was
    lost) is returned as rebuilt, one that answers from its old incarnation is not, and one that
    never answers is named after SETTLE_S seconds instead of hanging the exit.
    (Before: the run exited at its last step; a role whose rebuild was answered after it was never
    reported or counted, as in a CI run where the evaluator lost with its node went unsaid.)"""

    class Role:
        def __init__(self, answer: tuple, delay: float):
            self.answer, self.delay = answer, delay

        def node(self) -> tuple:
            time.sleep(self.delay)
            return self.answer

    role = ray.remote(num_cpus=0)(Role)
    supervisor = object.__new__(Supervisor)
    supervisor.rebuilt = {"the evaluator": role.remote(("127.0.0.9", "second"), 2.0),
                          "the param store": role.remote(("127.0.0.2", "store"), 0.0)}
    supervisor.where = {"the evaluator": ("127.0.0.4", "first"), "the param store": ("127.0.0.2", "store")}
    supervisor.asking, supervisor.watched = {}, 0.0
    stop = types.SimpleNamespace(check=lambda: None)
    started = time.time()
    assert supervisor.settle(stop) == [("the evaluator", "127.0.0.4", "127.0.0.9")]
    assert time.time() - started >= 2.0
    assert supervisor.where["the evaluator"] == ("127.0.0.9", "second") and not supervisor.asking

    monkeypatch.setattr(ray_supervisor, "SETTLE_S", 1.0)
    supervisor.rebuilt["the evaluator"] = role.remote(("127.0.0.9", "third"), 600.0)
    started = time.time()
    assert supervisor.settle(stop) == []
    assert time.time() - started < 10
    assert ("the evaluator had not answered where it is 1 s after the run's last step; not waiting longer"
            in capsys.readouterr().err)
