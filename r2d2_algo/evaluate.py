"""Evaluation episodes of a recurrent Q-network, and the CLI that evaluates a saved model.

    python r2d2_algo/evaluate.py --model saved_models/{run_name}/model.pt [--episodes 10]
        [--epsilon 0.001] [--capture-video]

Plays ``--episodes`` episodes side by side (one per environment, Atari with up to 30 no-op
starts) acting ε-greedily on the saved network with its recurrent state carried through each
episode, prints mean ± std and the per-episode returns, and writes them as JSON (default:
``eval.json`` next to the model). ``--capture-video`` records one mp4 per episode under
``videos/{run_name}/`` with gymnasium's RecordVideo (moviepy). The default seed is the one the
training scripts use for their evaluations, so the final evaluation of a run made with
``--save-model`` is reproduced exactly on the same device.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

from r2d2_algo.devices import set_float32_precision
from r2d2_algo.envs import check_env_id, make_env, make_vector_env
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.processes import quiet_if_hung_up

EVAL_EPSILON = 0.001
"""ε of evaluation episodes. The R2D2 paper gives none; 0.001 is the usual evaluation ε of the
DQN family on Atari (Rainbow / Dopamine's ``epsilon_eval``), so rare random actions break
deterministic loops."""
EVAL_SEED_OFFSET = 10_000  # evaluation envs use seed + 10,000, apart from the training envs


def _video_env(env_id: str, index: int, video_folder: str, env_kwargs: tuple[str, ...] = ()) -> gym.Env:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen (no display needed)
    env = make_env(env_id, render_mode="rgb_array", env_kwargs=env_kwargs)
    with warnings.catch_warnings():  # every env but the first finds the folder made: not an overwrite
        warnings.filterwarnings("ignore", message=".*Overwriting existing videos.*")
        # NEXT_STEP autoreset starts a second episode after the first ends: record the first only
        return gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda episode: episode == 0,
                                        name_prefix=f"episode-{index}", disable_logger=True)


@torch.no_grad()
def evaluate(
    q_network: RNNQNetwork,
    env_id: str,
    num_episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    epsilon: float = 0.0,
    video_folder: str | None = None,
    env_kwargs: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Play ``num_episodes`` episodes side by side, one per environment, acting
    ε-greedily (ε = 0: greedy) on the network's Q-values with its recurrent state carried
    through the episode.

    Args:
        seed: env i is reset with seed + i; exploration draws from a Generator seeded ``seed``.
        video_folder: if given, one mp4 per episode ``episode-{i}-episode-0.mp4`` is written there.
        env_kwargs: ``--env-kwargs`` items for the env's constructor (envs.parse_env_kwargs).
    Returns:
        returns: (num_episodes,) float64 undiscounted episodic returns.
        lengths: (num_episodes,) int64 episode lengths in agent steps.
    """
    if video_folder is None:
        envs = make_vector_env(env_id, num_episodes, seed, env_kwargs=env_kwargs)
    else:
        envs = gym.vector.SyncVectorEnv([lambda i=i: _video_env(env_id, i, video_folder, env_kwargs)
                                         for i in range(num_episodes)],
                                        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    rng = np.random.default_rng(seed)
    was_training = q_network.training
    q_network.eval()
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
        q_network.train(was_training)


def _rename_videos(video_folder: str) -> list[str]:
    """RecordVideo's ``episode-{i}-episode-0.mp4`` -> ``episode-{i}.mp4``; returns the paths."""
    paths = []
    for name in sorted(os.listdir(video_folder)):
        match = re.fullmatch(r"episode-(\d+)-episode-0\.mp4", name)
        if match:
            os.replace(os.path.join(video_folder, name), os.path.join(video_folder, f"episode-{match.group(1)}.mp4"))
            name = f"episode-{match.group(1)}.mp4"
        if name.endswith(".mp4"):
            paths.append(os.path.join(video_folder, name))
    return sorted(paths)


def run_dir_name(model_path: str) -> str:
    """The run name of ``saved_models/{run_name}/model.pt`` (the model file's folder name)."""
    return os.path.basename(os.path.dirname(os.path.abspath(model_path)))


def evaluate_saved_model(model_path: str, episodes: int = 10, epsilon: float = EVAL_EPSILON,
                         seed: int | None = None, env_id: str | None = None, capture_video: bool = False,
                         output: str | None = None, device: torch.device | str = "cpu",
                         env_kwargs: tuple[str, ...] | None = None) -> dict:
    """Load a saved model, play ``episodes`` episodes, write the results as JSON and return them.

    Args:
        seed: evaluation seed (default: the training seed + 10,000, as the training scripts).
        env_id: environment (default: the model's); another id must have the same spaces.
        env_kwargs: ``--env-kwargs`` items for its constructor (default: the model's run's).
        capture_video: record one mp4 per episode under videos/{run_name}/ (episode-{i}.mp4).
        output: JSON path (default: eval.json next to the model, the training run's final evaluation).
    Returns:
        dict with model, env_id, episodes, epsilon, seed, returns, lengths, mean, std, videos.
    Raises:
        CheckpointError: missing, truncated or foreign model file.
        UnsupportedEnvError: an env id that does not exist or does not fit the model.
        ValueError: episodes < 1, ε outside [0, 1], a seed outside [0, 2³²), an output path that is a
            folder.
        OSError: the output or video folder cannot be written.
    """
    from r2d2_algo.checkpoint import load_model
    from r2d2_algo.envs import UnsupportedEnvError

    q_network, info = load_model(model_path, device)
    env_id = info["env_id"] if env_id is None else env_id
    trained_kwargs = tuple(info["args"].get("env_kwargs", ()))
    env_kwargs = trained_kwargs if env_kwargs is None else tuple(env_kwargs)
    if env_id != info["env_id"] or env_kwargs != trained_kwargs:
        observation_space, n_actions = check_env_id(env_id, env_kwargs=env_kwargs)
        trained = info["observation_space"]
        if observation_space.shape != trained.shape or n_actions != info["n_actions"]:
            raise UnsupportedEnvError(
                f"model {model_path!r} was trained on {info['env_id']} (observations {trained.shape}, "
                f"{info['n_actions']} actions); {env_id} has observations {observation_space.shape}, {n_actions} actions")
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"--epsilon must be in [0, 1], got {epsilon}")
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
    output = os.path.join(os.path.dirname(model_path), "eval.json") if output is None else output
    if os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a folder; name a JSON file")
    seed = info["args"]["seed"] + EVAL_SEED_OFFSET if seed is None else seed
    video_folder = os.path.join("videos", run_dir_name(model_path)) if capture_video else None
    start = time.time()
    returns, lengths = evaluate(q_network, env_id, episodes, seed, device, epsilon, video_folder, env_kwargs)
    result = {
        "model": model_path, "env_id": env_id, "env_kwargs": list(env_kwargs), "episodes": episodes, "epsilon": epsilon, "seed": seed,
        "mean": float(returns.mean()), "std": float(returns.std()), "returns": returns.tolist(),
        "lengths": lengths.tolist(), "seconds": time.time() - start,
        "videos": _rename_videos(video_folder) if video_folder else [],
    }
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    try:  # a whole file or none
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    result["output"] = output
    return result


@dataclass
class Args:
    model: str
    """saved model: saved_models/{run_name}/model.pt (written by --save-model)"""
    episodes: int = 10
    """evaluation episodes, played side by side"""
    epsilon: float = EVAL_EPSILON
    """ε of the ε-greedy evaluation policy (0: greedy)"""
    seed: int | None = None
    """evaluation seed (default: the training seed + 10,000, as the training scripts' evaluations)"""
    env_id: str | None = None
    """environment (default: the model's); another id must have the same observation and action spaces"""
    env_kwargs: tuple[str, ...] | None = None
    """keyword arguments for the environment's constructor, as the training scripts' --env-kwargs (default: the
    model's run's)"""
    capture_video: bool = False
    """record one mp4 per episode under videos/{run_name}/"""
    output: str | None = None
    """JSON file for the results (default: evaluate.json next to the model; the training run's own final
    evaluation, eval.json, is kept)"""
    cuda: bool = True
    """if toggled and CUDA is available, the network runs on the GPU"""


def main(args: Args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    set_float32_precision(False)  # IEEE float32 on CUDA too: the reference of the training runs' evaluations
    try:
        output = args.output or os.path.join(os.path.dirname(args.model), "evaluate.json")
        result = evaluate_saved_model(args.model, args.episodes, args.epsilon, args.seed, args.env_id,
                                      args.capture_video, output, device, args.env_kwargs)
    except ValueError as e:  # CheckpointError, UnsupportedEnvError: one line
        raise SystemExit(f"evaluate.py: error: {e}") from None
    except OSError as e:  # an output or video folder that cannot be written (read-only, full disk)
        raise SystemExit(f"evaluate.py: error: cannot write {e.filename or 'the results'}: {e.strerror or e}") \
            from None
    print(f"{result['env_id']}: {result['mean']:.2f} ± {result['std']:.2f} over {result['episodes']} episodes "
          f"(ε = {result['epsilon']}, seed {result['seed']})")
    print("returns: " + ", ".join(f"{r:g}" for r in result["returns"]))
    for video in result["videos"]:
        print(f"video: {video}")
    print(f"results written to {result['output']}")


def _stop(signum, frame):
    """SIGTERM and SIGHUP stop an evaluation as Ctrl-C does (a hung-up terminal's output goes to /dev/null)."""
    if signum == signal.SIGHUP:
        quiet_if_hung_up()
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _stop)
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt as e:  # the results file is written whole or not at all
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"evaluate.py: stopped by {signal.Signals(signum).name}; no results written", file=sys.stderr)
        sys.exit(128 + signum)
