"""An env whose episodes always last 400 steps, whatever the actions: evaluations that take a
while. Use as env id ``long_episode_env:LongEpisode-v0`` with tests/helpers on PYTHONPATH."""

import gymnasium as gym
import numpy as np


class LongEpisode(gym.Env):
    """Observation: 4 random floats; reward 1 per step; truncated after 400 steps (registry)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 4).astype(np.float32), {}

    def step(self, action):
        return self.np_random.uniform(-1, 1, 4).astype(np.float32), 1.0, False, False, {}


if "LongEpisode-v0" not in gym.registry:
    gym.register(id="LongEpisode-v0", entry_point="long_episode_env:LongEpisode", max_episode_steps=400)
