"""The acting side (EnvActor): what it writes to replay is exactly what the envs produced."""

from collections import defaultdict

import numpy as np
import torch

from r2d2_algo.envs import make_vector_env
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.r2d2_mp import EnvActor
from r2d2_algo.storage import SequenceReplayBuffer


class RecordingVectorEnv:
    """Passes every call to a vector env and records, per env, what really happened: each
    observation it returned (newest frame), each action it was sent and each reward and end flag
    that came back for it."""

    def __init__(self, envs):
        self.envs = envs
        self.single_action_space, self.single_observation_space = envs.single_action_space, envs.single_observation_space
        self.frames, self.actions, self.rewards = defaultdict(list), defaultdict(list), defaultdict(list)
        self.ended = defaultdict(list)
        self.at_hand = None  # envs whose observations were returned last

    def _returned(self, obs, ids):
        for row, env in enumerate(ids):
            self.frames[int(env)].append(obs[row, -1].copy())
        self.at_hand = ids

    def reset(self, seed):
        obs, info = self.envs.reset(seed=seed)
        self._returned(obs, np.asarray(info["env_id"]))
        return obs, info

    def step(self, action):
        for env, a in zip(self.at_hand, action):
            self.actions[int(env)].append(int(a))
        obs, reward, terminated, truncated, info = self.envs.step(action)
        ids = np.asarray(info["env_id"])
        for row, env in enumerate(ids):
            if len(self.actions[int(env)]) > len(self.rewards[int(env)]):  # the result of an action
                self.rewards[int(env)].append(float(reward[row]))
                self.ended[int(env)].append(bool(terminated[row] or truncated[row]))
        self._returned(obs, ids)
        return obs, reward, terminated, truncated, info

    def close(self):
        self.envs.close()


def test_actor_with_env_splits_writes_the_steps_the_envs_really_took():
    """ale-py's reset returns only the first of two splits; the second split's reset observations
    come from the first step. Every replay stream must hold exactly its env's trajectory: the
    reset frame first (flagged first), each action sent, the reward that came back, no step that
    never happened."""
    num_envs, steps = 4, 60
    envs = RecordingVectorEnv(make_vector_env("PongNoFrameskip-v4", num_envs, seed=5, num_splits=2, num_threads=1))
    space = envs.single_observation_space
    torch.manual_seed(0)
    net = RNNQNetwork(space, int(envs.single_action_space.n), "lstm", 16, 16, 16)
    replay = SequenceReplayBuffer(num_streams=num_envs, capacity=num_envs * 400, obs_shape=space.shape,
                                  obs_dtype=space.dtype, state_size=net.state_size, burn_in_length=2,
                                  sequence_length=8, n_step=2, overlap=4, frame_stack=4)
    actor = EnvActor(envs, net, replay, np.array([1.0, 0.5, 0.5, 1.0]), np.random.default_rng(0), seed=5)
    try:
        for _ in range(2 * steps):
            actor.step()
    finally:
        envs.close()
    for env in range(num_envs):
        n = int(replay.write_count[env])
        assert n == len(envs.rewards[env]) >= steps - 1  # one step per reward that came back, no more
        np.testing.assert_array_equal(replay.obs[env, :n], np.stack(envs.frames[env][:n]))
        np.testing.assert_array_equal(replay.action[env, :n], envs.actions[env][:n])
        np.testing.assert_array_equal(replay.reward[env, :n], envs.rewards[env][:n])
        assert not any(envs.ended[env])  # no Pong episode ends this early: one episode per stream
        assert replay.first[env, 0] and not replay.first[env, 1:n].any()
        assert not replay.terminated[env, :n].any() and not replay.truncated[env, :n].any()
        # the stored state entering the episode's first step is zero; later ones are the actor's
        assert not replay.stored_state[env, 0].any()
