"""Greedy (or ε-greedy) evaluation episodes of a recurrent Q-network."""

from __future__ import annotations

import numpy as np
import torch

from r2d2_algo.envs import make_vector_env
from r2d2_algo.model import RNNQNetwork


@torch.no_grad()
def evaluate(
    q_network: RNNQNetwork,
    env_id: str,
    num_episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    epsilon: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Play ``num_episodes`` episodes side by side, one per environment, acting
    ε-greedily (ε = 0: greedy) on the network's Q-values with its recurrent state carried
    through the episode.

    Returns:
        returns: (num_episodes,) float64 undiscounted episodic returns.
        lengths: (num_episodes,) int64 episode lengths in agent steps.
    """
    envs = make_vector_env(env_id, num_episodes, seed)
    rng = np.random.default_rng(seed)
    try:
        obs, _ = envs.reset(seed=seed)
        state = q_network.initial_state(num_episodes, device)
        prev_action = torch.full((num_episodes,), -1, dtype=torch.long, device=device)
        prev_reward = torch.zeros(num_episodes, device=device)
        first = torch.ones(num_episodes, dtype=torch.bool, device=device)
        returns = np.zeros(num_episodes)
        lengths = np.zeros(num_episodes, dtype=np.int64)
        done = np.zeros(num_episodes, dtype=bool)
        while not done.all():
            obs_t = torch.as_tensor(obs, device=device).unsqueeze(0)  # (1, N, *obs_shape)
            q, state = q_network(obs_t, prev_action[None], prev_reward[None], first[None], state)
            action = q[0].argmax(dim=-1).cpu().numpy()
            explore = rng.random(num_episodes) < epsilon
            action = np.where(explore, rng.integers(0, q.shape[-1], num_episodes), action)
            obs, reward, terminated, truncated, _ = envs.step(action)
            returns += np.where(done, 0.0, reward)
            lengths += ~done
            done |= terminated | truncated
            prev_action = torch.as_tensor(action, device=device)
            prev_reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
            first = torch.zeros_like(first)
        return returns, lengths
    finally:
        envs.close()
