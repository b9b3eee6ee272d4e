"""Evaluation episodes of a recurrent Q-network, and the CLI that evaluates a saved model.

    python r2d2_algo/evaluate.py --model saved_models/{run_name}/model.pt [--episodes 10]
        [--epsilon 0.001] [--capture-video] [--capture-gif [--gif-width 320] [--gif-frame-skip 2]]

Plays ``--episodes`` episodes side by side (one per environment, Atari with up to 30 no-op
starts) acting ε-greedily on the saved network with its recurrent state carried through each
episode, prints mean ± std and the per-episode returns, and writes them as JSON (default:
``eval.json`` next to the model). ``--capture-video`` records one mp4 per episode under
``videos/{run_name}/`` with gymnasium's RecordVideo (moviepy); ``--capture-gif`` one animated GIF
per episode there (``RecordGif``: every ``--gif-frame-skip``-th frame, ``--gif-width`` pixels
wide, small enough for a README). The default seed is the one the training scripts use for their
evaluations, so the final evaluation of a run made with ``--save-model`` is reproduced exactly on
the same device.
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
from PIL import Image

from r2d2_algo.devices import set_float32_precision
from r2d2_algo.envs import check_env_id, make_env, make_vector_env
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.processes import quiet_if_hung_up

EVAL_EPSILON = 0.001
"""ε of evaluation episodes. The R2D2 paper gives none; 0.001 is the usual evaluation ε of the
DQN family on Atari (Rainbow / Dopamine's ``epsilon_eval``), so rare random actions break
deterministic loops."""
EVAL_SEED_OFFSET = 10_000  # evaluation envs use seed + 10,000, apart from the training envs
GIF_WIDTH = 320
"""Width of a GIF in pixels (0: the env's own): CartPole's 600 × 400 frames shrink to 320 × 213,
MinAtar's 10 × 10 and Atari's 160 × 210 grow (nearest neighbour, pixels kept sharp)."""
GIF_FRAME_SKIP = 2
"""Every 2nd rendered frame goes into a GIF (played at the env's render_fps / 2, so at the mp4's
speed): a 500-step CartPole episode is 251 frames, 365 KB at 320 pixels wide."""


class RecordGif(gym.Wrapper):
    """Records the env's first episode as an animated GIF, written to ``path`` when it ends (or
    at ``close`` if it did not end).

    Frames are the env's ``render()`` (``render_mode="rgb_array"``): the reset frame, every
    ``frame_skip``-th step's frame and the last one, resized to ``width`` pixels (0: as
    rendered; nearest neighbour when enlarging, Lanczos when shrinking). Float frames in [0, 1]
    (MinAtar) are scaled to uint8. The GIF loops and plays at the env's ``render_fps`` (30 if it
    declares none, as RecordVideo) divided by ``frame_skip``. Pillow encodes it (an adaptive
    palette of at most 256 colours per frame; only the region that changed is stored, and a frame
    equal to the one before lengthens that one). Frames are held in memory until the episode
    ends, one byte per pixel: an Atari episode of 27,000 agent steps at the defaults is 1.8 GB
    (a trained Pong episode of ~2,000 steps, 130 MB); raise ``frame_skip`` for long episodes.

    Raises ValueError for width < 0 or frame_skip < 1.
    """

    def __init__(self, env: gym.Env, path: str, width: int = GIF_WIDTH, frame_skip: int = GIF_FRAME_SKIP):
        if width < 0 or frame_skip < 1:
            raise ValueError(f"--gif-width must be >= 0 and --gif-frame-skip >= 1, got {width} and {frame_skip}")
        super().__init__(env)
        self.path, self.width, self.frame_skip = path, width, frame_skip
        self.frames: list[Image.Image] | None = None  # None: not recording
        self.episodes = 0
        self.steps = 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        # NEXT_STEP autoreset starts a second episode after the first ends: record the first only
        self.frames = [self._frame()] if self.episodes == 0 else None
        self.episodes += 1
        self.steps = 0
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.frames is not None:
            self.steps += 1
            if self.steps % self.frame_skip == 0 or terminated or truncated:
                self.frames.append(self._frame())
            if terminated or truncated:
                self._write()
        return obs, reward, terminated, truncated, info

    def close(self):
        if self.frames:
            self._write()
        super().close()

    def _frame(self) -> Image.Image:
        frame = np.asarray(self.env.render())  # (H, W, 3)
        if frame.dtype != np.uint8:
            frame = np.clip(frame * (255.0 if frame.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(frame)
        if self.width and self.width != image.width:
            height = max(1, round(image.height * self.width / image.width))
            resample = Image.Resampling.NEAREST if self.width > image.width else Image.Resampling.LANCZOS
            image = image.resize((self.width, height), resample)
        return image.convert("P", palette=Image.Palette.ADAPTIVE)  # as the GIF stores it: a third of the memory

    def _write(self) -> None:
        frames, self.frames = self.frames, None
        fps = self.env.metadata.get("render_fps") or 30
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        frames[0].save(self.path, save_all=True, append_images=frames[1:], loop=0, optimize=True,
                       duration=round(1000 * self.frame_skip / fps))


def _video_env(env_id: str, index: int, video_folder: str, env_kwargs: tuple[str, ...] = (), mp4: bool = True,
               gif: tuple[int, int] | None = None) -> gym.Env:
    """An env recording its first episode as ``episode-{index}-episode-0.mp4`` (if ``mp4``) and as
    ``episode-{index}.gif`` (if ``gif``, which is (width, frame skip)) in ``video_folder``."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen (no display needed)
    env = make_env(env_id, render_mode="rgb_array", env_kwargs=env_kwargs)
    if gif is not None:
        env = RecordGif(env, os.path.join(video_folder, f"episode-{index}.gif"), *gif)
    if not mp4:
        return env
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
    mp4: bool = True,
    gif: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Play ``num_episodes`` episodes side by side, one per environment, acting
    ε-greedily (ε = 0: greedy) on the network's Q-values with its recurrent state carried
    through the episode.

    Args:
        seed: env i is reset with seed + i; exploration draws from a Generator seeded ``seed``.
        video_folder: if given, one mp4 per episode ``episode-{i}-episode-0.mp4`` is written there
            (if ``mp4``), and one GIF ``episode-{i}.gif`` (if ``gif``: (width, frame skip), RecordGif).
        env_kwargs: ``--env-kwargs`` items for the env's constructor (envs.parse_env_kwargs).
    Returns:
        returns: (num_episodes,) float64 undiscounted episodic returns.
        lengths: (num_episodes,) int64 episode lengths in agent steps.
    """
    if video_folder is None:
        envs = make_vector_env(env_id, num_episodes, seed, env_kwargs=env_kwargs)
    else:
        envs = gym.vector.SyncVectorEnv([lambda i=i: _video_env(env_id, i, video_folder, env_kwargs, mp4, gif)
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
                         env_kwargs: tuple[str, ...] | None = None, capture_gif: bool = False,
                         gif_width: int = GIF_WIDTH, gif_frame_skip: int = GIF_FRAME_SKIP) -> dict:
    """Load a saved model, play ``episodes`` episodes, write the results as JSON and return them.

    Args:
        seed: evaluation seed (default: the training seed + 10,000, as the training scripts).
        env_id: environment (default: the model's); another id must have the same spaces.
        env_kwargs: ``--env-kwargs`` items for its constructor (default: the model's run's).
        capture_video: record one mp4 per episode under videos/{run_name}/ (episode-{i}.mp4).
        capture_gif: record one GIF per episode there (episode-{i}.gif), ``gif_width`` pixels wide
            (0: as rendered), every ``gif_frame_skip``-th frame (RecordGif).
        output: JSON path (default: eval.json next to the model, the training run's final evaluation).
    Returns:
        dict with model, env_id, episodes, epsilon, seed, returns, lengths, mean, std, videos (mp4
        paths), gifs (GIF paths).
    Raises:
        CheckpointError: missing, truncated or foreign model file.
        UnsupportedEnvError: an env id that does not exist or does not fit the model.
        ValueError: episodes < 1, ε outside [0, 1], a seed outside [0, 2³²), an output path that is a
            folder, a GIF width < 0 or frame skip < 1.
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
    if capture_gif and (gif_width < 0 or gif_frame_skip < 1):
        raise ValueError(f"--gif-width must be >= 0 and --gif-frame-skip >= 1, got {gif_width} and {gif_frame_skip}")
    output = os.path.join(os.path.dirname(model_path), "eval.json") if output is None else output
    if os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a folder; name a JSON file")
    seed = info["args"]["seed"] + EVAL_SEED_OFFSET if seed is None else seed
    video_folder = os.path.join("videos", run_dir_name(model_path)) if capture_video or capture_gif else None
    start = time.time()
    returns, lengths = evaluate(q_network, env_id, episodes, seed, device, epsilon, video_folder, env_kwargs,
                                mp4=capture_video, gif=(gif_width, gif_frame_skip) if capture_gif else None)
    result = {
        "model": model_path, "env_id": env_id, "env_kwargs": list(env_kwargs), "episodes": episodes, "epsilon": epsilon, "seed": seed,
        "mean": float(returns.mean()), "std": float(returns.std()), "returns": returns.tolist(),
        "lengths": lengths.tolist(), "seconds": time.time() - start,
        "videos": _rename_videos(video_folder) if capture_video else [],
        "gifs": [os.path.join(video_folder, f"episode-{i}.gif") for i in range(episodes)] if capture_gif else [],
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
    capture_gif: bool = False
    """record one animated GIF per episode under videos/{run_name}/ (episode-{i}.gif), as for a README"""
    gif_width: int = GIF_WIDTH
    """width of the GIFs in pixels, height in proportion (0: as the env renders)"""
    gif_frame_skip: int = GIF_FRAME_SKIP
    """keep every n-th rendered frame in the GIFs, each shown for n frames' time (the mp4's speed)"""
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
                                      args.capture_video, output, device, args.env_kwargs, args.capture_gif,
                                      args.gif_width, args.gif_frame_skip)
    except ValueError as e:  # CheckpointError, UnsupportedEnvError: one line
        raise SystemExit(f"evaluate.py: error: {e}") from None
    except OSError as e:  # an output or video folder that cannot be written (read-only, full disk)
        raise SystemExit(f"evaluate.py: error: cannot write {e.filename or 'the results'}: {e.strerror or e}") \
            from None
    print(f"{result['env_id']}: {result['mean']:.2f} ± {result['std']:.2f} over {result['episodes']} episodes "
          f"(ε = {result['epsilon']}, seed {result['seed']})")
    print("returns: " + ", ".join(f"{r:g}" for r in result["returns"]))
    for video in result["videos"] + result["gifs"]:
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
