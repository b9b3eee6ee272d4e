"""ray_param_store.py: the param store's protocol (its async methods, without Ray), and the
learner's and an actor's sides of it over an in-process Ray (CPU): params published, fetched
without waiting, asked for, and an actor held by the allowances until the learner catches up."""

import asyncio
import tempfile
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

ray = pytest.importorskip("ray")

from r2d2_algo.model import RNNQNetwork  # noqa: E402
from r2d2_algo.ray_param_store import ParamFetcher, ParamPublisher, ParamStore  # noqa: E402
from r2d2_algo.ray_supervisor import REBUILT  # noqa: E402


def test_the_store_publishes_on_request_and_rate_limits():
    """An actor asking with the newest version marks the params wanted and gets the next
    publication as soon as it is made; an actor whose shard holds the steps the learner allows
    waits until the learner allows more (and then gets the newest params), and a store that was
    never published to allows nothing.
    (Before: the learner published every --actor-update-interval *learner updates*, unasked; the
    limit was a flag the learner had to set, so a stalled learner never stopped the actors.)"""

    async def protocol():
        store = ParamStore(2)
        assert await store.allowance(0, 0, -1, 0.05) == (-1, None, 0.0)  # nothing published: wait
        await store.publish(0, ["p0"], [100.0, 50.0])
        assert await store.fetch(-1, 5.0) == (0, ["p0"])  # newer ones: at once
        assert await store.fetch(0, 0.05) == (0, None)  # nothing newer: waits, then none
        wanted = asyncio.ensure_future(store.wanted())
        await asyncio.sleep(0)
        assert wanted.done()  # the learner has seen the ask (it publishes after its next update)
        asking = asyncio.ensure_future(store.fetch(0, 5.0))
        await asyncio.sleep(0.05)
        assert not asking.done()
        await store.publish(1, ["p1"], [100.0, 50.0])
        assert await asyncio.wait_for(asking, 1.0) == (1, ["p1"])

        assert await store.allowance(0, 99, 1, 5.0) == (1, None, 100.0)  # within the allowance: at once
        waiting = asyncio.ensure_future(store.allowance(1, 50, 1, 5.0))  # shard 1 holds its 50: wait
        wanted = asyncio.ensure_future(store.wanted())
        await asyncio.sleep(0.05)
        assert not waiting.done() and wanted.done()  # ... and newer params are asked for
        await store.allow([100.0, 50.0])  # an allowance that is no larger: still waiting
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await store.publish(7, ["p7"], [120.0, 60.0])  # the learner caught up: resume on update 7
        assert await asyncio.wait_for(waiting, 1.0) == (7, ["p7"], 60.0)
        await store.allow([float("inf")] * 2)
        assert await store.allowance(1, 10**9, 7, 5.0) == (7, None, float("inf"))

    asyncio.run(protocol())


@pytest.fixture(scope="module")
def local_ray():
    """An in-process Ray (1 CPU), its files in a short temporary folder."""
    with tempfile.TemporaryDirectory(prefix="rp_", dir="/tmp") as folder:
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=folder, configure_logging=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def params_of(net: torch.nn.Module) -> torch.Tensor:
    return parameters_to_vector(net.parameters()).detach()


def until(condition, timeout: float = 30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_the_learner_publishes_and_an_actor_fetches(local_ray):
    class AllowanceRecorder:  # stands in for a replay shard (defined here: Ray's workers get it by value)
        def __init__(self):
            self.steps = None

        def allow(self, steps: float) -> None:
            self.steps = steps

        def allowed(self) -> float | None:
            return self.steps

    torch.manual_seed(0)
    space = gym.spaces.Box(-1, 1, (4,), np.float32)
    learner_net, actor_net = RNNQNetwork(space, 2, "lstm", 8, 8, 8), RNNQNetwork(space, 2, "lstm", 8, 8, 8)
    store = ray.remote(**REBUILT)(ParamStore).remote(1)
    shard = ray.remote(num_cpus=0)(AllowanceRecorder).remote()
    publisher = ParamPublisher(store, [shard], [float("inf")])
    fetcher = ParamFetcher(store, actor_net)

    publisher.publish(0, learner_net)
    fetcher.first()  # the learner's first params
    assert fetcher.version == 0 and torch.equal(params_of(actor_net), params_of(learner_net))
    assert ray.get(shard.allowed.remote()) == float("inf")

    assert not fetcher.fetch()  # nothing newer: the question is out, and the params are wanted
    until(publisher.asked)
    assert not publisher.asked()  # one ask, seen once
    with torch.no_grad():
        for p in learner_net.parameters():
            p.add_(1.0)
    publisher.publish(1, learner_net)
    until(fetcher.fetch)  # loaded as soon as the answer has come
    assert fetcher.version == 1 and torch.equal(params_of(actor_net), params_of(learner_net))

    publisher.allow([100.0])  # the shard may hold 100 steps: an actor whose shard holds 100 waits
    until(lambda: ray.get(shard.allowed.remote()) == 100.0)
    waiting = threading.Thread(target=fetcher.wait_for_allowance, args=(0, 100))
    waiting.start()
    time.sleep(1.5)
    assert waiting.is_alive()
    with torch.no_grad():
        for p in learner_net.parameters():
            p.add_(1.0)
    publisher.publish(2, learner_net, [200.0])  # caught up: the actor resumes on update 2
    waiting.join(timeout=30)
    assert not waiting.is_alive() and fetcher.version == 2 and publisher.allowed == [200.0]
    assert torch.equal(params_of(actor_net), params_of(learner_net))
    assert ray.get(shard.allowed.remote()) == 200.0
    ray.kill(store)
    ray.kill(shard)
