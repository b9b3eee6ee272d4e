"""Environment construction shared by every R2D2 variant.

- ``check_env_id`` refuses, with one line, any id that is not a registered gymnasium
  environment with Discrete actions, or whose constructor or first reset fails (the line names
  the id and the cause). The ``module:EnvId`` form imports ``module`` first, as
  ``gymnasium.make`` does; a package that registers its ids through a function
  (MinAtar: ``minatar.gym:MinAtar/Breakout-v1``) has its ``register_envs()`` called when the
  import alone did not register the id. Envs that take no ``render_mode`` keyword are built
  without one.
- Observations of any gymnasium space R2D2 can encode become a ``Box`` (``adapt_observation``):
  a numeric 1-D vector or 3-D image is kept (bool images become uint8 0/1); ``Discrete``,
  ``MultiDiscrete`` and ``MultiBinary`` become one-hot / 0-1 vectors, and ``Tuple`` / ``Dict`` of
  such parts are flattened into one vector (gymnasium's ``FlattenObservation``); parts that
  cannot be encoded (free text, such as MiniGrid's ``mission``) are dropped with a note at start.
  Vectors of small non-negative integers (one-hots, object ids) are stored as uint8.
- Atari ids (ale-py) get the paper's preprocessing (docs/algorithm.md, Table 2): 84×84 grayscale,
  frame skip 4 with max-pool, 4-frame stack, full 18-action set, no reward clipping, no
  loss-of-life termination, episodes capped at 108,000 frames, up to 30 no-op starts; all
  from gymnasium's ``AtariPreprocessing`` and ``FrameStackObservation`` for single envs
  (evaluation, video), and from ale-py's C++ ``AtariVectorEnv`` for the actors' vector envs.
- ``CartPoleNoVelocity-v1``: CartPole-v1 with the two velocity entries removed from the
  observation (cart position, pole angle remain), a memory task: the velocities must be
  inferred from consecutive observations, so a memoryless Q-network cannot balance well.
  ``CartPoleNoVelocity-RewardScale0.01-v1`` and ``CartPoleNoVelocity-RewardScale100-v1`` are
  the same task with every reward multiplied by 0.01 and 100 (returns at most 5 and 50,000).
- ``env_kwargs`` (the scripts' ``--env-kwargs``): keyword arguments for the environment's
  constructor, passed to every env a run builds (``parse_env_kwargs``). For Atari ids only
  ``ATARI_ENV_KWARGS`` are taken (the rest of the preprocessing is the paper's).
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
import re
from typing import Any

import gymnasium as gym
import numpy as np
import yaml

from r2d2_algo.limits import usable_cpus

ATARI_MAX_FRAMES = 108_000  # 30 minutes at 60 Hz (R2D2 Table 2)
ATARI_FRAME_STACK = 4
NO_VELOCITY_CARTPOLE_ID = "CartPoleNoVelocity-v1"


class UnsupportedEnvError(ValueError):
    """The environment id cannot be used by R2D2; the message is one line naming why."""


ENCODABLE = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class CastObservation(gym.ObservationWrapper):
    """Observations cast to ``dtype`` (bool or small integers to uint8; others to float32)."""

    def __init__(self, env: gym.Env, dtype):
        super().__init__(env)
        space = env.observation_space
        self.dtype = np.dtype(dtype)
        self.observation_space = gym.spaces.Box(space.low.astype(self.dtype), space.high.astype(self.dtype),
                                                dtype=self.dtype)

    def observation(self, observation):
        return np.asarray(observation, dtype=self.dtype)


class SelectTupleParts(gym.ObservationWrapper):
    """A ``Tuple`` observation reduced to the parts at ``keep`` (indices)."""

    def __init__(self, env: gym.Env, keep: list[int]):
        super().__init__(env)
        self.keep = list(keep)
        self.observation_space = gym.spaces.Tuple([env.observation_space[i] for i in self.keep])

    def observation(self, observation):
        return tuple(observation[i] for i in self.keep)


def _encodable(space: gym.Space) -> bool:
    if isinstance(space, gym.spaces.Box):
        return np.issubdtype(space.dtype, np.number) or space.dtype == np.bool_
    if isinstance(space, gym.spaces.Tuple):
        return all(_encodable(s) for s in space.spaces)
    if isinstance(space, gym.spaces.Dict):
        return all(_encodable(s) for s in space.spaces.values())
    return isinstance(space, ENCODABLE)


def _compact_dtype(space: gym.spaces.Box):
    """uint8 for bools and integers in [0, 255], else float32."""
    if space.dtype == np.bool_:
        return np.uint8
    if np.issubdtype(space.dtype, np.integer) and space.low.min() >= 0 and space.high.max() <= 255:
        return np.uint8
    return space.dtype if space.dtype in (np.uint8, np.float32) else np.float32


def adapt_observation(env: gym.Env) -> tuple[gym.Env, list[str]]:
    """Wrap ``env`` so that its observation is a ``Box`` R2D2's network takes: a 1-D vector (MLP
    torso) or a 3-D image (conv torso), in a compact dtype. Returns the env and notes on what
    was changed (for the run's start).

    Raises:
        UnsupportedEnvError: a space with no part R2D2 can encode (names the space).
    """
    space, notes = env.observation_space, []
    if isinstance(space, gym.spaces.Box) and len(space.shape) in (1, 3) and _encodable(space):
        if space.dtype not in (np.uint8, np.float32):
            dtype = _compact_dtype(space)
            env = CastObservation(env, dtype)
            notes.append(f"{space.dtype} observations stored as {np.dtype(dtype)}")
        return env, notes
    if isinstance(space, gym.spaces.Dict):
        dropped = [key for key, part in space.spaces.items() if not _encodable(part)]
        if dropped:
            env = gym.wrappers.FilterObservation(env, [key for key in space.spaces if key not in dropped])
            notes.append(f"observation part(s) {', '.join(map(repr, dropped))} dropped "
                         f"({', '.join(type(space[k]).__name__ for k in dropped)}: cannot be encoded)")
    elif isinstance(space, gym.spaces.Tuple):
        dropped = [i for i, part in enumerate(space.spaces) if not _encodable(part)]
        if dropped:
            env = SelectTupleParts(env, [i for i in range(len(space.spaces)) if i not in dropped])
            notes.append(f"observation part(s) {', '.join(map(str, dropped))} of the Tuple dropped "
                         f"({', '.join(type(space[i]).__name__ for i in dropped)}: cannot be encoded)")
    if not _encodable(env.observation_space) or \
            isinstance(env.observation_space, gym.spaces.Dict | gym.spaces.Tuple) and not env.observation_space:
        raise UnsupportedEnvError(f"its {type(space).__name__} observation has no part R2D2 can encode "
                                  f"(Box, Discrete, MultiDiscrete, MultiBinary, or Tuple/Dict of them)")
    env = gym.wrappers.FlattenObservation(env)
    flat = env.observation_space
    dtype = _compact_dtype(flat)
    if flat.dtype != dtype:
        env = CastObservation(env, dtype)
    discrete = not isinstance(space, gym.spaces.Box)
    notes.append(f"{type(space).__name__} observation flattened to a {np.dtype(dtype)} vector of "
                 f"{flat.shape[0]}{' (one-hot for discrete parts)' if discrete else ''}")
    return env, notes


class CartPoleNoVelocity(gym.ObservationWrapper):
    """CartPole observation without the velocities: [cart position, pole angle], float32 (2,)."""

    KEPT = np.array([0, 2])

    def __init__(self, env: gym.Env):
        super().__init__(env)
        box = env.observation_space
        self.observation_space = gym.spaces.Box(box.low[self.KEPT], box.high[self.KEPT], dtype=np.float32)

    def observation(self, observation):
        return observation[self.KEPT]


def make_cartpole_no_velocity(reward_scale: float = 1.0, **kwargs) -> gym.Env:
    """Entry point of CartPoleNoVelocity-v1 and its reward-scaled variants (TimeLimit 500 is
    added by the registry): every reward is multiplied by ``reward_scale``."""
    from gymnasium.envs.classic_control import CartPoleEnv

    env = CartPoleNoVelocity(CartPoleEnv(**kwargs))
    if reward_scale != 1.0:  # partial, not lambda: r2d2.py's checkpoints pickle the envs
        env = gym.wrappers.TransformReward(env, functools.partial(operator.mul, reward_scale))
    return env


# The same memory task with rewards × 0.01 (return at most 5) and × 100 (at most 50,000): one
# set of hyperparameters must learn all three (R2D2 uses one setting for every Atari game).
REWARD_SCALED_IDS = {f"CartPoleNoVelocity-RewardScale{scale:g}-v1": scale for scale in (0.01, 100.0)}
for env_id, scale in {NO_VELOCITY_CARTPOLE_ID: 1.0, **REWARD_SCALED_IDS}.items():
    if env_id not in gym.registry:
        gym.register(
            id=env_id,
            entry_point="r2d2_algo.envs:make_cartpole_no_velocity",
            max_episode_steps=500,
            reward_threshold=475.0 * scale,
            kwargs={"reward_scale": scale} if scale != 1.0 else {},
        )


# what --env-kwargs may set for an Atari id: the ALE's own settings (Machado et al. 2018: sticky
# actions with repeat_action_probability 0.25; the paper: 0 with up to 30 no-op starts)
ATARI_ENV_KWARGS = ("repeat_action_probability", "full_action_space", "frameskip")  # what ale-py's vector env takes


def parse_env_kwargs(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--env-kwargs`` as a dict: each item ``key:value`` (the value read as YAML: ``30`` an int,
    ``0.25`` a float, ``true`` a bool, ``[1, 2]`` a list, ``null`` None, other text a string) or a
    whole YAML/JSON mapping (``{memory_length: 30}``); later items win.

    Raises:
        ValueError: an item that is neither (one line, naming it).
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        text = str(item).strip()
        if text.startswith("{"):
            try:
                mapping = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"--env-kwargs {text!r} is not a YAML/JSON mapping: {str(e).splitlines()[0]}") from None
            if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
                raise ValueError(f"--env-kwargs {text!r} is not a mapping of names to values")
            kwargs.update(mapping)
            continue
        key, colon, value = text.partition(":")
        if not colon or not key.strip().isidentifier():
            raise ValueError(f"--env-kwargs {text!r}: expected key:value (e.g. memory_length:30) or a mapping "
                             "({memory_length: 30})")
        try:
            kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--env-kwargs {text!r}: the value is not YAML: {str(e).splitlines()[0]}") from None
    return kwargs


def _spec(env_id: str) -> gym.envs.registration.EnvSpec:
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            imported = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - ImportError, or anything the module raises on import
            raise UnsupportedEnvError(f"cannot import module {module!r} named in env id {env_id!r}: "
                                      f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        if name not in gym.registry and callable(getattr(imported, "register_envs", None)):
            imported.register_envs()  # packages that register on request (MinAtar's minatar.gym)
    if name.startswith("ALE/") or "NoFrameskip" in name:
        try:
            import ale_py

            gym.register_envs(ale_py)
        except ImportError:
            raise UnsupportedEnvError(f"{env_id!r} needs ale-py: pip install ale-py") from None
    try:
        return gym.spec(name)
    except gym.error.Error as e:
        raise UnsupportedEnvError(f"unknown environment id {env_id!r}: {str(e).splitlines()[0]}") from None


def is_atari(env_id: str) -> bool:
    """Whether the id names an ale-py Atari game."""
    entry = _spec(env_id).entry_point
    return isinstance(entry, str) and entry.startswith("ale_py")


def _env_kwargs(env_id: str, env_kwargs: tuple[str, ...]) -> dict[str, Any]:
    """``parse_env_kwargs`` with its errors as UnsupportedEnvError; for Atari, only ATARI_ENV_KWARGS."""
    try:
        kwargs = parse_env_kwargs(env_kwargs)
    except ValueError as e:
        raise UnsupportedEnvError(str(e)) from None
    if kwargs and is_atari(env_id):
        other = sorted(set(kwargs) - set(ATARI_ENV_KWARGS))
        if other:
            raise UnsupportedEnvError(f"--env-kwargs {', '.join(other)}: not taken for Atari ids ({env_id!r}); "
                                      f"these are: {', '.join(ATARI_ENV_KWARGS)}")
    return kwargs


def make_env(env_id: str, seed: int | None = None, render_mode: str | None = None, env_kwargs: tuple[str, ...] = (),
             **atari_kwargs) -> gym.Env:
    """One environment, with Atari preprocessing for ale-py games (see module docstring) and its
    observation adapted (``adapt_observation``); ``render_mode="rgb_array"`` for video;
    ``env_kwargs`` (``--env-kwargs`` items, see ``parse_env_kwargs``) go to the constructor.

    Raises:
        UnsupportedEnvError: unknown id or module, an env that does not render when asked, an
            exception from the env's constructor (a keyword it does not take among them), or an
            observation space R2D2 cannot encode.
    """
    _spec(env_id)
    name = env_id.rpartition(":")[2]
    kwargs = _env_kwargs(env_id, env_kwargs)
    if is_atari(env_id):
        return make_atari(name, render_mode=render_mode, **atari_kwargs, **kwargs)
    try:  # envs that take no render_mode keyword are built without one when none is asked for
        env = gym.make(name, render_mode=render_mode, **kwargs) if render_mode is not None else gym.make(name, **kwargs)
    except TypeError as e:
        if render_mode is not None and "render_mode" in str(e):
            raise UnsupportedEnvError(f"{env_id!r} cannot render (its constructor takes no render_mode)") from None
        rejected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if kwargs and rejected:
            raise UnsupportedEnvError(f"--env-kwargs: {env_id!r} takes no argument {rejected.group(1)!r} "
                                      f"(it was given {', '.join(sorted(kwargs))})") from None
        raise UnsupportedEnvError(f"{env_id!r} failed to build: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the env's own constructor: any error becomes one line
        with_kwargs = f" with --env-kwargs {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
        raise UnsupportedEnvError(f"{env_id!r} failed to build{with_kwargs}: {_first_line(e)}") from None
    env, _ = adapt_observation(env)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def make_atari(env_id: str, noop_max: int = 30, max_frames: int = ATARI_MAX_FRAMES,
               render_mode: str | None = None, frameskip: int = 4, full_action_space: bool = True,
               **ale_kwargs) -> gym.Env:
    """Atari as in R2D2 Table 2: full action set, 84×84 gray, skip 4 + max-pool, stack 4.
    ``frameskip``, ``full_action_space`` and ``ale_kwargs`` (repeat_action_probability: see
    ATARI_ENV_KWARGS) change the ALE's settings (``--env-kwargs``).

    Returns observations (4, 84, 84) uint8; rewards unclipped; lives ignored; episodes
    truncated after ``max_frames`` emulator frames.
    """
    env = gym.make(
        env_id,
        frameskip=1,  # AtariPreprocessing does the skipping and max-pooling
        full_action_space=full_action_space,
        max_episode_steps=max_frames,  # counted in raw frames because frameskip=1
        render_mode=render_mode,
        **ale_kwargs,
    )
    env = gym.wrappers.AtariPreprocessing(
        env, noop_max=noop_max, frame_skip=frameskip, screen_size=84, terminal_on_life_loss=False,
        grayscale_obs=True, scale_obs=False,
    )
    # zero padding at an episode start, as the replay rebuilds stacks (storage.stack_frames)
    return gym.wrappers.FrameStackObservation(env, stack_size=ATARI_FRAME_STACK, padding_type="zero")


def frame_stack_of(env_id: str) -> int:
    """Frames per observation that replay may store once (4 for Atari, else 1)."""
    return ATARI_FRAME_STACK if is_atari(env_id) else 1


def check_env_id(env_id: str, quiet: bool = False, env_kwargs: tuple[str, ...] = ()) -> tuple[gym.spaces.Box, int]:
    """Validate that R2D2 can run ``env_id`` (built and reset once per process: the answer is
    kept, so the preset's family check and the script's own check build it once); return its
    (adapted) observation space and action count. Prints the notes of ``adapt_observation``
    unless ``quiet``.

    Raises:
        UnsupportedEnvError: unknown id, an env whose constructor or first reset raises, an
            observation R2D2 cannot encode, or actions not Discrete; the message names what.
    """
    obs_space, n_actions, notes = _inspect_env(env_id, tuple(env_kwargs))
    if not quiet:
        for note in notes:
            print(f"note: {env_id}: {note}", flush=True)
    return obs_space, n_actions


@functools.lru_cache(maxsize=16)
def _inspect_env(env_id: str, env_kwargs: tuple[str, ...] = ()) -> tuple[gym.spaces.Box, int, tuple[str, ...]]:
    """``check_env_id``'s work, once per id and env_kwargs (a raised error is not kept)."""
    env = make_env(env_id, env_kwargs=env_kwargs)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        try:
            env.reset(seed=0)
        except Exception as e:  # noqa: BLE001 - the env's own code: any error becomes one line
            raise UnsupportedEnvError(f"{env_id!r} failed on its first reset: {_first_line(e)}") from None
        notes = () if is_atari(env_id) else tuple(adapt_observation(env.unwrapped)[1])
    finally:
        env.close()
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UnsupportedEnvError(
            f"{env_id!r} has a {type(act_space).__name__} action space; R2D2 needs Discrete actions"
        )
    if not isinstance(obs_space, gym.spaces.Box):
        raise UnsupportedEnvError(
            f"{env_id!r} has a {type(obs_space).__name__} observation space; R2D2 needs a Box (vector or image)"
        )
    if len(obs_space.shape) not in (1, 3):
        raise UnsupportedEnvError(
            f"{env_id!r} has observations of shape {obs_space.shape}; R2D2 needs a 1-D vector or a 3-D image"
        )
    return obs_space, int(act_space.n), notes


def default_env_threads(num_processes: int) -> int:
    """C++ env threads per actor process when not given: the usable CPUs (``limits.usable_cpus``:
    affinity mask and cgroup CPU quota) shared among the processes (at least 1), so all actors'
    ale-py threads together match the CPUs (ale-py's own default, one per core of the affinity
    mask in every process, would start cores × processes threads)."""
    return max(1, usable_cpus()[0] // max(1, num_processes))


def make_vector_env(env_id: str, num_envs: int, seed: int, num_splits: int = 1,
                    num_threads: int = 0, thread_niceness: int = 0,
                    env_kwargs: tuple[str, ...] = ()) -> gym.vector.VectorEnv:
    """``num_envs`` copies with NEXT_STEP autoreset, env i seeded ``seed + i``.

    NEXT_STEP autoreset is what storage.py expects: a final observation is returned with its
    done flag, and the next step returns the reset observation with reward 0.

    Atari ids run in ale-py's ``AtariVectorEnv`` (emulators and preprocessing in C++ threads,
    frame-identical to ``make_atari`` for the same actions and no-op starts). With
    ``num_splits`` > 1 it is asynchronous (double buffering, as Sample Factory's
    ``worker_num_splits``): ``step(actions)`` sends the actions of the envs of the batch last
    returned and returns the next batch of ``num_envs / num_splits`` envs that is ready, named
    by ``info["env_id"]``, so one split steps while the policy acts on another. ``num_threads``
    C++ threads step the envs (0: ale-py's default, min(envs per split, cores); ale-py uses at
    most one per core). ``thread_niceness`` > 0 lowers their scheduling priority below the
    caller's by that much (Linux), so that the thread running the policy is not preempted by
    envs that are only running ahead.
    Other ids use gymnasium's SyncVectorEnv (``num_splits`` must be 1). ``env_kwargs``: as
    ``make_env``'s, for every env.

    Raises:
        ValueError: ``num_splits`` does not divide ``num_envs``, or is > 1 for a non-Atari id.
    """
    if num_splits < 1 or num_envs % num_splits:
        raise ValueError(f"env splits ({num_splits}) must divide the envs per actor ({num_envs})")
    kwargs = _env_kwargs(env_id, env_kwargs)
    if is_atari(env_id):
        from ale_py.vector_env import AtariVectorEnv

        spec = _spec(env_id)
        threads_before = _thread_ids()
        vec = AtariVectorEnv(
            spec.kwargs["game"], num_envs, batch_size=num_envs // num_splits, num_threads=num_threads,
            max_num_frames_per_episode=ATARI_MAX_FRAMES,
            repeat_action_probability=kwargs.get("repeat_action_probability",
                                                 spec.kwargs.get("repeat_action_probability", 0.0)),
            full_action_space=kwargs.get("full_action_space", True), stack_num=ATARI_FRAME_STACK,
            frameskip=kwargs.get("frameskip", 4), maxpool=True, noop_max=30,
            episodic_life=False, reward_clipping=False, use_fire_reset=False,
        )
        vec.action_space.seed(seed)
        if thread_niceness > 0:  # relative to the caller's (Ray's workers run at 15 unless told otherwise)
            niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + thread_niceness)
            for tid in _thread_ids() - threads_before:  # the C++ threads ale-py just started
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                except OSError:  # not allowed here: they keep the normal priority
                    pass
        return vec
    if num_splits != 1:
        raise ValueError(f"env splits > 1 need an Atari env (ale-py's AtariVectorEnv), not {env_id!r}")
    # partial, not lambda: the vector env pickles (checkpoints save it to resume bit for bit)
    vec = gym.vector.SyncVectorEnv([functools.partial(make_env, env_id, seed + i, env_kwargs=tuple(env_kwargs))
                                    for i in range(num_envs)],
                                   autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    vec.action_space.seed(seed)
    return vec


def _thread_ids() -> set[int]:
    """Thread ids of this process (Linux; empty elsewhere)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def epsilon_ladder(num_rungs: int, base: float = 0.4, alpha: float = 7.0) -> np.ndarray:
    """The Ape-X exploration ladder ε_i = base^(1 + alpha·i/(N−1)), i = 0..N−1 (Horgan et al.
    2018, Sec. 4.1; docs/algorithm.md). Ape-X gives each actor one rung; here each environment
    is one rung, over all the envs of all actors. A single rung gets ``base``.

    Returns:
        (num_rungs,) float64 exploration rates.
    Raises:
        ValueError: num_rungs < 1.
    """
    if num_rungs < 1:
        raise ValueError(f"num_rungs must be >= 1, got {num_rungs}")
    if num_rungs == 1:
        return np.array([base])
    return base ** (1.0 + alpha * np.arange(num_rungs) / (num_rungs - 1))
