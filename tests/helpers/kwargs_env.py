"""An env that cannot be built without a keyword argument: ``Countdown-v0`` needs ``length``, the
number of steps of every episode (reward 1 per step, so a return equals the length), as
third-party tasks parameterised at ``gym.make`` do. Use as env id ``kwargs_env:Countdown-v0``
with tests/helpers on PYTHONPATH, and ``--env-kwargs length:N``."""

import gymnasium as gym
import numpy as np


class Countdown(gym.Env):
    """Observation: the fraction of the episode left (1 float); reward 1 per step; terminated after
    ``length`` steps whatever the actions."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int, render_mode=None):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        self.length, self.render_mode, self.t = length, render_mode, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([1.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([1.0 - self.t / self.length], np.float32), 1.0, self.t >= self.length, False, {}


if "Countdown-v0" not in gym.registry:
    gym.register(id="Countdown-v0", entry_point="kwargs_env:Countdown")
