"""CartPole that raises after a number of steps: for tests of a dying actor.

Use as env id ``crashing_env:CrashingCartPole-v0`` with tests/helpers on PYTHONPATH."""

import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv


class CrashingCartPole(CartPoleEnv):
    crash_after = 300

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if self.steps > self.crash_after:
            raise RuntimeError("CrashingCartPole: deliberate failure for the test")
        return super().step(action)


if "CrashingCartPole-v0" not in gym.registry:
    gym.register(id="CrashingCartPole-v0", entry_point="crashing_env:CrashingCartPole", max_episode_steps=500)
