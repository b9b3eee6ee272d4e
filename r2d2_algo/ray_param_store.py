"""The param store of r2d2_ray.py: where the learner publishes params and the actors fetch them,
and where an actor waits while the learner is behind (--min-replay-ratio).

- ``ParamStore``, a Ray actor (asyncio), holds the newest published params as (version, [object
  reference]): ``version`` is the learner update they come from, the reference a float32 vector
  in ``parameters_to_vector`` order (in a list, so that Ray hands the reference on instead of
  the array). The learner publishes when an actor asks, as r2d2_mp.py does: ``fetch`` with
  nothing newer marks the params wanted and waits for the next publication; the learner holds
  one ``wanted`` call, answered when an actor asks, and publishes after its next update.
- The store also holds the allowances, the steps each replay shard may hold before its actors
  wait for the learner (--min-replay-ratio, as a Reverb table's rate limiter). The shards hold
  the same allowances and tell an actor past its own to wait (ray_replay.py); it waits here
  (``allowance``), and resumes on the params the learner has caught up with. The learner raises
  them after each update; a learner that makes no update (a stall, a long wait on a checkpoint or
  an evaluation) raises none, so the actors stop within a push, whatever the learner is doing.
- ``ParamPublisher`` is the learner's side: a publication is one ``ray.put`` (``put_params``) and
  one call. ``ParamFetcher`` is an actor's: the params it acts with, fetched without stopping to
  act.
"""

from __future__ import annotations

import asyncio
import time

import ray
import torch
from torch.nn.utils import parameters_to_vector

from r2d2_algo.model import load_parameter_vector
from r2d2_algo.ray_start import incarnation


class ParamStore:
    """The Ray actor (asyncio) holding the newest params and the allowances of ``num_shards``
    replay shards (module docstring). Ray rebuilds a store lost with its node empty: its actors
    wait until the learner has published again."""

    def __init__(self, num_shards: int):
        self.version, self.params = -1, None
        self.allowed = [0.0] * num_shards  # steps each shard may hold; none until the learner publishes
        self.changed, self.asked = asyncio.Event(), asyncio.Event()
        self.where = incarnation()

    @ray.method(concurrency_group="where")
    async def node(self) -> tuple[str, str]:
        return self.where

    def _changed(self) -> None:
        self.changed.set()  # wakes every waiting call; later ones wait on a new event
        self.changed = asyncio.Event()

    async def _wait_until(self, done, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not done() and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return

    async def publish(self, version: int, params: list, allowed: list[float]) -> None:
        """Params of learner update ``version`` ([object reference]) with the allowances: one call,
        so that an actor the allowance releases gets them."""
        self.version, self.params, self.allowed = version, params, allowed
        self._changed()

    async def allow(self, allowed: list[float]) -> None:
        """The steps each shard may hold now (float("inf"): no limit)."""
        self.allowed = allowed
        self._changed()

    async def fetch(self, version: int, wait_s: float) -> tuple[int, list | None]:
        """(version, [params] if newer than ``version`` else None), once params newer than ``version``
        are published (they are asked for) or ``wait_s`` seconds pass."""
        if self.version <= version:
            self.asked.set()
        await self._wait_until(lambda: self.version > version, wait_s)
        return self.version, (self.params if self.version > version else None)

    async def allowance(self, shard: int, steps: int, version: int, wait_s: float) -> tuple[int, list | None, float]:
        """(version, [params] if newer than ``version`` else None, the steps shard ``shard`` may hold),
        once it may hold more than ``steps`` or ``wait_s`` seconds pass. Newer params are asked
        for, so that an actor resumes on the params the learner has caught up with."""
        if self.version <= version:
            self.asked.set()
        await self._wait_until(lambda: self.allowed[shard] > steps, wait_s)
        return self.version, (self.params if self.version > version else None), self.allowed[shard]

    async def wanted(self) -> bool:
        """Returns once an actor has asked for params newer than the published ones."""
        await self.asked.wait()
        self.asked.clear()
        return True


class ParamPublisher:
    """The learner's side of the param store (a Ray actor handle) and of the allowances, which it
    also sends to the replay shards (Ray actor handles): they tell their actors to wait, the store
    is where they wait. ``allowed``: the allowances last sent."""

    def __init__(self, store, shards: list, allowed: list[float]):
        self.store, self.shards, self.allowed = store, shards, allowed
        self.wanted = store.wanted.remote().future()  # a future: done() costs far less than ray.wait

    def publish(self, version: int, q_network: torch.nn.Module, allowed: list[float] | None = None) -> list:
        """Publish the params of learner update ``version`` with ``allowed`` (None: the last
        allowances) in one call, so that an actor the allowance releases gets them; returns the params."""
        params = put_params(q_network)
        self.allowed = self.allowed if allowed is None else allowed
        self.store.publish.remote(version, params, self.allowed)
        self._allow_shards()
        return params

    def allow(self, allowed: list[float]) -> None:
        """The steps each shard may hold from now on (float("inf"): no limit)."""
        self.allowed = allowed
        self.store.allow.remote(allowed)
        self._allow_shards()

    def _allow_shards(self) -> None:
        for shard, steps in zip(self.shards, self.allowed):
            shard.allow.remote(steps)

    def asked(self) -> bool:
        """Whether an actor has asked for params newer than the published ones (then: publish)."""
        if not self.wanted.done():
            return False
        self.wanted = self.store.wanted.remote().future()
        return True


def put_params(q_network: torch.nn.Module) -> list:
    """The network's params in Ray's object store, as ``ParamStore.publish`` and
    ``Evaluator.evaluate`` take them: [reference to a (P,) float32 vector]."""
    return [ray.put(parameters_to_vector(q_network.parameters()).detach().cpu().numpy())]


def load_params(net: torch.nn.Module, params: list) -> None:
    """Load published ``params`` into ``net`` in place (Ray's object store hands out a read-only
    array: load_parameter_vector copies it)."""
    load_parameter_vector(net, ray.get(params[0]))


class ParamFetcher:
    """An actor's side of the param store: ``net`` holds the params of learner update ``version``.

    ``first`` waits for the learner's first publication. ``fetch`` asks for newer params without
    waiting (one question out at a time, answered within 10 s) and loads the answer when it has
    come. ``wait_for_allowance`` waits until the learner allows shard ``shard`` more than ``held``
    steps, and loads the params it has caught up with."""

    def __init__(self, store, net: torch.nn.Module):
        self.store, self.net, self.version, self.asking = store, net, -1, None

    def load(self, version: int, params: list | None) -> bool:
        """Load the params of a store's reply, if any (newer). Returns whether it did."""
        if params is None:
            return False
        load_params(self.net, params)
        self.version = version
        return True

    def first(self) -> None:
        """Wait for the learner's first params (asking every second) and load them."""
        while self.version < 0:
            self.load(*ray.get(self.store.fetch.remote(self.version, 1.0)))

    def fetch(self) -> bool:
        """Ask for newer params, or load the answer to the last question; True once newer ones are
        loaded (an answer with nothing newer, after 10 s, is asked again at the next call)."""
        if self.asking is None:
            self.asking = self.store.fetch.remote(self.version, 10.0).future()
        if not self.asking.done():
            return False
        reply, self.asking = self.asking.result(), None
        return self.load(*reply)

    def wait_for_allowance(self, shard: int, held: int) -> None:
        allowed, self.asking = 0.0, None
        while allowed <= held:
            version, params, allowed = ray.get(self.store.allowance.remote(shard, held, self.version, 1.0))
            self.load(version, params)
