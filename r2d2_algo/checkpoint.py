"""Saved models and whole-run checkpoints, shared by r2d2.py, r2d2_mp.py and evaluate.py.

- A *saved model* (``saved_models/{run_name}/model.pt``) holds the online network's weights
  and everything needed to rebuild it: env id, observation space, action count, core type and
  sizes, and the training arguments. ``load_model`` needs no other input.
- A *checkpoint* (``saved_checkpoints/{run_name}/checkpoint.pt``) holds a whole run: online
  and target weights, optimizer, counters, RNG states, arguments, the actors' env state where
  it can be saved and, by default, the replay with its priorities. It is written to a
  temporary file that replaces the previous checkpoint in one ``os.replace``: a crash while
  writing leaves the previous checkpoint intact.

Both are ``torch.save`` dicts of tensors and plain Python values (numpy arrays are stored as
tensors), tagged with a ``format`` string so that another file is refused with one line.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import gymnasium as gym
import numpy as np
import torch

from r2d2_algo.model import RNNQNetwork
from r2d2_algo.stopping import StopRun

MODEL_FORMAT = "r2d2-model-v2"  # v2: the core sees tanh(previous reward)
CHECKPOINT_FORMAT = "r2d2-checkpoint-v2"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A model or checkpoint file that cannot be used; the message is one line naming why."""


# ---------------------------------------------------------------------- files
class SaveError(StopRun, OSError):
    """A model or checkpoint that could not be written (full disk, read-only or missing folder);
    the message is one line naming the path and the operating system's reason. A StopRun (and an
    OSError): the training scripts stop cleanly on it (exit 1)."""


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and one ``os.replace``: readers see
    the old file or the new one, never a partial one.

    Raises:
        SaveError: the file could not be written; no partial file is left.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save wraps a failed write in RuntimeError ("unexpected pos")
        cause = e
        while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
            cause = cause.__cause__ or cause.__context__
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0] if cause is None else \
            cause.strerror if cause.filename in (None, path, tmp) else f"{cause.filename}: {cause.strerror}"
        raise SaveError(f"cannot write {path}: {reason}") from None
    finally:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass


def _load(path: str, expected_format: str, what: str) -> dict:
    if os.path.isdir(path):
        candidate = os.path.join(path, CHECKPOINT_FILE if expected_format == CHECKPOINT_FORMAT else "model.pt")
        if not os.path.exists(candidate):
            raise CheckpointError(f"{what} {path!r} is a directory without {os.path.basename(candidate)}")
        path = candidate
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises anything on garbage (IndexError, KeyError, UnicodeDecodeError, ...)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{what} {path!r} is truncated or not a torch file ({first_line[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path!r} is not an R2D2 {what} (format {found!r}, expected {expected_format!r})")
    return payload


# ---------------------------------------------------------------------- saved models
def _space_to_dict(space: gym.spaces.Box) -> dict:
    return {"shape": list(space.shape), "dtype": np.dtype(space.dtype).name,
            "low": torch.from_numpy(np.ascontiguousarray(space.low)), "high": torch.from_numpy(np.ascontiguousarray(space.high))}


def _space_from_dict(d: dict) -> gym.spaces.Box:
    return gym.spaces.Box(d["low"].numpy(), d["high"].numpy(), shape=tuple(d["shape"]), dtype=np.dtype(d["dtype"]))


NETWORK_FIELDS = ("rnn_type", "hidden_size", "torso_size", "head_hidden_size")


def model_payload(q_network: RNNQNetwork, args, observation_space: gym.spaces.Box, n_actions: int) -> dict:
    """The saved-model dict: weights + env id, spaces, core type and sizes, training args."""
    args_dict = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    return {
        "format": MODEL_FORMAT,
        "model": {k: v.detach().cpu() for k, v in q_network.state_dict().items()},
        "env_id": args_dict["env_id"],
        "observation_space": _space_to_dict(observation_space),
        "n_actions": int(n_actions),
        "network": {name: args_dict[name] for name in NETWORK_FIELDS},
        "args": args_dict,
    }


def save_model(path: str, q_network: RNNQNetwork, args, observation_space: gym.spaces.Box, n_actions: int) -> None:
    """Write a saved model (see module docstring) atomically to ``path``."""
    atomic_save(model_payload(q_network, args, observation_space, n_actions), path)


def load_model(path: str, device: torch.device | str = "cpu") -> tuple[RNNQNetwork, dict]:
    """Rebuild the network of a saved model.

    Returns:
        q_network: RNNQNetwork on ``device``, in eval mode.
        info: the file's dict (env_id, observation_space, n_actions, network, args, ...).
    Raises:
        CheckpointError: missing path, truncated or foreign file, weights that do not fit.
    """
    payload = _load(path, MODEL_FORMAT, "model")
    try:
        observation_space = _space_from_dict(payload["observation_space"])
        q_network = RNNQNetwork(observation_space, payload["n_actions"], **payload["network"])
        q_network.load_state_dict(payload["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"model {path!r} is damaged: {first_line[:160]}") from None
    payload["observation_space"] = observation_space
    return q_network.to(device).eval(), payload


# ---------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str) -> dict:
    """Read a checkpoint file (or the ``checkpoint.pt`` of a run's checkpoint directory).

    Raises:
        CheckpointError: missing path, truncated or foreign file.
    """
    return _load(path, CHECKPOINT_FORMAT, "checkpoint")


def learner_state(q_network: torch.nn.Module, target_network: torch.nn.Module, optimizer,
                  rng: np.random.Generator | None, progress: dict, recent_returns, replay,
                  include_replay: bool = True) -> dict:
    """What every variant's checkpoint holds of its learner: online and target weights, the
    optimizer, the RNG states, the loop's counters (``progress``), the recent episodic returns
    and, if ``include_replay``, the replay's contents and priorities (r2d2_ray.py keeps its
    replay in the shards: ``replay`` None, ``include_replay`` False)."""
    return {"q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng_states(rng, _device_of(q_network)), "progress": dict(progress),
            "recent_returns": list(recent_returns),
            "replay": _numpy_to_torch(replay.state_dict()) if include_replay else None}


def load_learner_state(checkpoint: dict, q_network: torch.nn.Module, target_network: torch.nn.Module, optimizer,
                       rng: np.random.Generator | None, progress: dict, recent_returns, replay, learning_starts: int) -> None:
    """Inverse of ``learner_state``, onto the networks' device whichever device wrote the
    checkpoint (tensors are read onto the CPU and copied into the networks' parameters; Adam's
    state follows its parameters). Without a saved replay, learning starts again after
    ``learning_starts`` new steps (``progress``'s learn_from and updates_base); with ``replay``
    None (r2d2_ray.py's shards) the caller loads the replay and decides that itself. Prints one
    line for an RNG state that could not be restored on this device (``restore_rng_states``).

    Raises:
        KeyError, RuntimeError, ValueError, TypeError: a checkpoint that does not fit these objects.
    """
    q_network.load_state_dict(checkpoint["q_network"])
    target_network.load_state_dict(checkpoint["target_network"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    progress.update(checkpoint["progress"])
    recent_returns.extend(checkpoint["recent_returns"])
    if checkpoint["replay"] is not None:
        replay.load_state_dict(_torch_to_numpy(checkpoint["replay"]))
    elif replay is not None:  # an empty replay: learning starts again after learning_starts new steps
        progress.update(learn_from=progress["global_step"] + learning_starts, updates_base=progress["updates"])
    notice = restore_rng_states(checkpoint["rng"], rng, _device_of(q_network))
    if notice:
        print(f"resuming: {notice}", flush=True)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def rng_states(rng: np.random.Generator | None, device: torch.device | str = "cpu") -> dict:
    """Python, numpy (global and ``rng``, if any) and torch RNG states, to put in a checkpoint; on
    a CUDA ``device`` (the learner's) also that device's CUDA RNG state. No other device is
    touched: a CPU run creates no CUDA context, a run under CUDA_VISIBLE_DEVICES saves one state."""
    import random

    device = torch.device(device)
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if rng is not None:
        states["generator"] = rng.bit_generator.state
    if device.type == "cuda":
        states["torch_cuda"] = [torch.cuda.get_rng_state(device)]
    return _numpy_to_torch(states)


def restore_rng_states(states: dict, rng: np.random.Generator | None, device: torch.device | str = "cpu") -> str | None:
    """Inverse of ``rng_states`` on ``device`` (the resumed learner's, which may differ from the
    saved one's). A checkpoint written on a GPU (its first saved CUDA state, as older checkpoints
    held one per visible GPU) resumes on the CPU and the other way round; returns a one-line
    notice of the RNG state that could not be restored, or None."""
    import random

    device = torch.device(device)
    states = _torch_to_numpy(states)
    random.setstate(_tuples(states["python"]))
    np.random.set_state(_tuples(states["numpy"]))
    if rng is not None:
        rng.bit_generator.state = states["generator"]
    torch.set_rng_state(torch.as_tensor(states["torch"], dtype=torch.uint8))
    saved_cuda = states.get("torch_cuda") or []
    if device.type == "cuda" and saved_cuda:
        torch.cuda.set_rng_state(torch.as_tensor(saved_cuda[0], dtype=torch.uint8), device)
    elif saved_cuda:
        return "the checkpoint's CUDA RNG state is not restored (this run is on the CPU)"
    elif device.type == "cuda":
        return "the checkpoint holds no CUDA RNG state (it was written on the CPU): CUDA's RNG starts from --seed"
    return None


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def _numpy_to_torch(x):
    """numpy arrays -> tensors inside nested dicts/lists/tuples (``weights_only`` loading)."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))} if x.dtype != np.bool_ else \
            {"__ndarray_bool__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _numpy_to_torch(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_numpy_to_torch(v) for v in x)
    return x


def _torch_to_numpy(x):
    if isinstance(x, dict):
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        if set(x) == {"__ndarray_bool__"}:
            return x["__ndarray_bool__"].numpy().astype(bool)
        return {k: _torch_to_numpy(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_torch_to_numpy(v) for v in x)
    return x


to_storable, from_storable = _numpy_to_torch, _torch_to_numpy


def pickled_envs(envs) -> torch.Tensor | None:
    """The vector env pickled into a uint8 tensor, or None when it cannot be pickled (ale-py's
    C++ vector env): a resumed run then starts fresh episodes."""
    try:
        return torch.frombuffer(bytearray(pickle.dumps(envs)), dtype=torch.uint8)
    except Exception:  # noqa: BLE001 - any env that does not pickle is restarted instead
        return None


def unpickle_envs(data: torch.Tensor):
    """Inverse of ``pickled_envs`` (the bytes come from the user's own checkpoint)."""
    return pickle.loads(data.numpy().tobytes())


# ---------------------------------------------------------------------- resuming arguments
def resume_args(args, saved: dict, argv: list[str], may_change: tuple[str, ...]):
    """The arguments of a resumed run: ``argv`` parsed again by tyro with the checkpoint's
    arguments ``saved`` as the defaults, so that only what the command line gives differs from
    them, and only fields in ``may_change`` may differ.

    Raises:
        CheckpointError: the checkpoint lacks a field of ``args`` (another script or version), or
            the command line changes one that may not change (names every such field).
    """
    import tyro

    fields = [f.name for f in dataclasses.fields(args) if f.name != "resume"]
    # checkpoints from before presets (their arguments were complete), --tf32 (PyTorch's default
    # then: TF32 off for matrix products) and --role-nodes (Ray's placement); both may change on resume
    saved = {"preset": "none", "tf32": False, "role_nodes": None, **saved}
    missing = sorted(set(fields) - set(saved))
    if missing:
        raise CheckpointError(f"checkpoint lacks arguments {', '.join(missing)} (saved by another script or version)")
    resumed = tyro.cli(type(args), args=argv, default=dataclasses.replace(args, **{f: saved[f] for f in fields}))
    conflicts = [f"--{name.replace('_', '-')} {getattr(resumed, name)!r} (checkpoint: {saved[name]!r})"
                 for name in fields if name not in may_change and getattr(resumed, name) != saved[name]]
    if conflicts:
        raise CheckpointError("arguments conflict with the checkpoint's: " + "; ".join(conflicts))
    return resumed


def resume_run(args, argv: list[str], may_change: tuple[str, ...]):
    """``(args, checkpoint)`` of a run started with ``--resume``: the checkpoint read, the
    arguments merged (``resume_args``); ``(args, None)`` when ``args.resume`` is None.

    Raises:
        CheckpointError: as ``load_checkpoint`` and ``resume_args``, or a ``--total-timesteps`` the
            checkpoint has already reached.
    """
    if args.resume is None:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    args = resume_args(args, checkpoint["args"], argv, may_change)
    step = checkpoint.get("progress", {}).get("global_step", 0)
    if args.total_timesteps <= step:
        raise CheckpointError(f"--total-timesteps {args.total_timesteps:,} is not beyond the checkpoint's step "
                              f"{step:,}: nothing to do (give a larger one)")
    return args, checkpoint
