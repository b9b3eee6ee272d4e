"""Environment construction: accepted and refused ids, Atari preprocessing, the ε ladder."""

import os

import gymnasium as gym
import numpy as np
import pytest

from r2d2_algo.envs import (
    NO_VELOCITY_CARTPOLE_ID,
    UnsupportedEnvError,
    check_env_id,
    default_env_threads,
    epsilon_ladder,
    make_env,
    make_vector_env,
)


def test_cartpole_accepted():
    space, n = check_env_id("CartPole-v1")
    assert space.shape == (4,) and n == 2


def test_module_colon_env_id_form_imports_the_module():
    space, n = check_env_id(f"r2d2_algo.envs:{NO_VELOCITY_CARTPOLE_ID}")
    assert space.shape == (2,) and n == 2


def test_no_velocity_cartpole_drops_the_velocities():
    full, masked = gym.make("CartPole-v1"), make_env(NO_VELOCITY_CARTPOLE_ID)
    obs_full, _ = full.reset(seed=3)
    obs_masked, _ = masked.reset(seed=3)
    np.testing.assert_array_equal(obs_masked, obs_full[[0, 2]])
    for _ in range(5):
        obs_full, *_ = full.step(1)
        obs_masked, *_ = masked.step(1)
    np.testing.assert_array_equal(obs_masked, obs_full[[0, 2]])
    assert masked.spec.max_episode_steps == 500


@pytest.mark.parametrize(
    "env_id, match",
    [
        ("Pendulum-v1", "Box action space; R2D2 needs Discrete actions"),
        ("NoSuchEnv-v0", "unknown environment id 'NoSuchEnv-v0'"),
        ("no_such_module:CartPole-v1", "cannot import module 'no_such_module'"),
    ],
)
def test_unsupported_ids_refused_with_one_line(env_id, match):
    with pytest.raises(UnsupportedEnvError, match=match) as info:
        check_env_id(env_id)
    assert "\n" not in str(info.value)


def test_discrete_observations_become_one_hot():
    """FrozenLake (Discrete(16) states), once refused, is a uint8 one-hot of 16."""
    space, n_actions = check_env_id("FrozenLake-v1", quiet=True)
    assert space.shape == (16,) and space.dtype == np.uint8 and n_actions == 4
    obs, _ = make_env("FrozenLake-v1").reset(seed=0)
    assert obs.tolist() == [1] + [0] * 15  # the start state, 0


def test_atari_preprocessing_as_in_the_paper():
    env = make_env("PongNoFrameskip-v4")
    try:
        assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
        assert env.action_space.n == 18  # full action set
        obs, _ = env.reset(seed=0)
        assert obs.shape == (4, 84, 84)
        assert not obs[:3].any() and obs[3].any()  # zero frames before the episode start, as replay rebuilds
        ale_env = env.unwrapped
        assert ale_env._frameskip == 1  # skipping (4, max-pooled) happens in AtariPreprocessing
        preprocessing = env.env
        assert isinstance(preprocessing, gym.wrappers.AtariPreprocessing)
        assert preprocessing.frame_skip == 4 and preprocessing.noop_max == 30
        assert not preprocessing.terminal_on_life_loss
        assert env.spec.max_episode_steps is None or env.spec.max_episode_steps >= 27_000
        time_limit = env
        while not isinstance(time_limit, gym.wrappers.TimeLimit):
            time_limit = time_limit.env
        assert time_limit._max_episode_steps == 108_000  # raw frames
        _, reward, *_ = env.step(0)
        assert reward in (-1.0, 0.0, 1.0)  # Pong's raw reward, unclipped by us
    finally:
        env.close()


def test_vector_env_uses_next_step_autoreset():
    envs = make_vector_env("CartPole-v1", 2, seed=0)
    envs.reset(seed=0)
    saw_reset_step = False
    done_prev = np.zeros(2, dtype=bool)
    for _ in range(200):
        _, reward, terminated, truncated, _ = envs.step(np.zeros(2, dtype=np.int64))
        if done_prev.any():
            assert np.all(reward[done_prev] == 0.0)  # the step after a final obs is the reset
            saw_reset_step = True
        done_prev = terminated | truncated
    envs.close()
    assert saw_reset_step


def test_epsilon_ladder_ape_x_values():
    eps = epsilon_ladder(8)
    np.testing.assert_allclose(eps, [0.4 ** (1 + 7 * i / 7) for i in range(8)])
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4**8)
    assert epsilon_ladder(1)[0] == 0.4
    with pytest.raises(ValueError):
        epsilon_ladder(0)


def test_default_env_threads_share_the_cores_among_the_actors(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [default_env_threads(n) for n in (1, 2, 3, 15, 16, 40)] == [16, 8, 5, 1, 1, 1]


def test_auto_preset_and_the_scripts_check_build_a_non_atari_env_once(capsys):
    """`--preset auto` looks at the env to find its family and the script then checks it: one
    construction between them (an env can take seconds to build), with the notes still printed."""
    from r2d2_algo.arguments import apply_preset
    from r2d2_algo.r2d2 import Args

    built = []

    class CountedEnv(gym.Env):
        observation_space = gym.spaces.Box(0, 3, (4,), np.int64)  # int64: cast, so there is a note
        action_space = gym.spaces.Discrete(2)

        def __init__(self, render_mode=None):
            built.append(1)

        def reset(self, *, seed=None, options=None):
            return np.zeros(4, np.int64), {}

        def step(self, action):
            return np.zeros(4, np.int64), 0.0, True, False, {}

    gym.register(id="CountedBuild-v0", entry_point=CountedEnv)
    try:
        args, _ = apply_preset(Args(env_id="CountedBuild-v0"), {"env_id"}, "r2d2.py")
        space, n_actions = check_env_id(args.env_id)
        out = capsys.readouterr().out
        assert "preset vector (auto" in out and "note: CountedBuild-v0:" in out, out
        assert len(built) == 1 and n_actions == 2 and space.shape == (4,)
        check_env_id(args.env_id)
        assert "note: CountedBuild-v0:" in capsys.readouterr().out
    finally:
        gym.registry.pop("CountedBuild-v0")
