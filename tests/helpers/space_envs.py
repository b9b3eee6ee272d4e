"""Tiny envs, one per observation space kind, for tests of the observation adapter.

Use as env ids ``space_envs:Space-<kind>-v0`` with tests/helpers on PYTHONPATH. Each episode
lasts 8 steps; the reward is 1 when the action equals a hidden bit seen in the first
observation only (a memory task, so the tests also exercise recurrence), 0 otherwise.
Also: ``space_envs:NoRenderMode-v0`` (a constructor without ``render_mode``),
``space_envs:RaisingConstructor-v0``, ``space_envs:RaisingReset-v0`` and
``space_envs:Space-text-v0`` (only free text: nothing to encode)."""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

KINDS = {
    "discrete": lambda: spaces.Discrete(3),
    "multidiscrete": lambda: spaces.MultiDiscrete([3, 4]),
    "multibinary": lambda: spaces.MultiBinary(5),
    "tuple": lambda: spaces.Tuple((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32))),
    "dict": lambda: spaces.Dict({"image": spaces.Box(0, 255, (3, 3, 2), np.uint8), "direction": spaces.Discrete(4),
                                 "mission": spaces.Text(20)}),
    "boolvector": lambda: spaces.Box(0, 1, (6,), bool),
    "boolimage": lambda: spaces.Box(0, 1, (6, 6, 2), bool),
    "intvector": lambda: spaces.Box(0, 9, (4,), np.int64),
    "float64vector": lambda: spaces.Box(-1.0, 1.0, (3,), np.float64),
    "matrix": lambda: spaces.Box(0.0, 1.0, (3, 4), np.float32),
    "text": lambda: spaces.Text(10),
}


def _encode(space, bit: int, show: bool, rng):
    """An observation of ``space`` that carries ``bit`` (when ``show``) in its first entry."""
    if isinstance(space, spaces.Discrete):
        return int(1 + bit) if show else 0
    if isinstance(space, spaces.MultiDiscrete):
        return np.array([1 + bit if show else 0, rng.integers(4)], dtype=space.dtype)
    if isinstance(space, (spaces.MultiBinary, spaces.Box)):
        obs = np.zeros(space.shape, dtype=space.dtype)
        obs.flat[0] = bit if show else 0
        obs.flat[-1] = 1
        return obs
    if isinstance(space, spaces.Tuple):
        return tuple(_encode(s, bit, show, rng) for s in space.spaces)
    if isinstance(space, spaces.Dict):
        return {k: _encode(s, bit, show, rng) for k, s in space.spaces.items()}
    if isinstance(space, spaces.Text):
        return "left" if bit == 0 else "right"
    raise TypeError(space)


class SpaceEnv(gym.Env):
    def __init__(self, kind: str = "discrete", render_mode=None):
        self.observation_space = KINDS[kind]()
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.bit, self.t = int(self.np_random.integers(2)), 0
        return _encode(self.observation_space, self.bit, True, self.np_random), {}

    def step(self, action):
        self.t += 1
        reward = float(action == self.bit) if self.t == 8 else 0.0
        return _encode(self.observation_space, self.bit, False, self.np_random), reward, self.t == 8, False, {}


class NoRenderMode(SpaceEnv):
    def __init__(self):  # takes no render_mode keyword, as some third-party envs
        super().__init__("boolvector")


class RaisingConstructor(SpaceEnv):
    def __init__(self, **kwargs):
        raise RuntimeError("no licence file found for the simulator")


class RaisingReset(SpaceEnv):
    def reset(self, *, seed=None, options=None):
        raise ValueError("level file missing")


for _kind in KINDS:
    if f"Space-{_kind}-v0" not in gym.registry:
        gym.register(id=f"Space-{_kind}-v0", entry_point="space_envs:SpaceEnv", kwargs={"kind": _kind})
for _name in ("NoRenderMode", "RaisingConstructor", "RaisingReset"):
    if f"{_name}-v0" not in gym.registry:
        gym.register(id=f"{_name}-v0", entry_point=f"space_envs:{_name}")
