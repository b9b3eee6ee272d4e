"""Devices and precision (r2d2_algo/devices.py): the dtype each part of the network computes in
under --amp, TF32, and the run line that states them; each on the CPU and, where present, CUDA."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from r2d2_algo import r2d2, r2d2_mp, r2d2_ray
from r2d2_algo.arguments import RESUMABLE_ARGS
from r2d2_algo.devices import compute_dtypes, float32_precision, precision_summary, set_float32_precision
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.stopping import StopRequest

SCRIPTS = [r2d2, r2d2_mp, r2d2_ray]


def atari_batch(rng, W, B, n_actions, state_size, device):
    """A time-major batch of 84×84 uint8 frame stacks (W, B, 4, 84, 84), as the learner trains on."""
    batch = {
        "obs": torch.tensor(rng.integers(0, 255, (W, B, 4, 84, 84), dtype=np.uint8)),
        "action": torch.tensor(rng.integers(0, n_actions, (W, B))),
        "reward": torch.tensor(rng.normal(size=(W, B)) * 5, dtype=torch.float32),
        "first": torch.tensor(rng.random((W, B)) < 0.1),
        "terminated": torch.zeros(W, B, dtype=torch.bool),
        "truncated": torch.zeros(W, B, dtype=torch.bool),
        "prev_action": torch.tensor(rng.integers(-1, n_actions, (W, B))),
        "prev_reward": torch.tensor(rng.normal(size=(W, B)), dtype=torch.float32),
        "initial_state": torch.tensor(rng.normal(size=(B, state_size)), dtype=torch.float32),
        "weights": torch.tensor(rng.uniform(0.1, 1.0, B), dtype=torch.float32),
    }
    return {name: value.to(device) for name, value in batch.items()}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_each_part_of_the_learners_update_computes_in_its_stated_dtype(device, script, amp):
    """The learner's update() as each script runs it: without --amp every part computes in
    float32; with --amp the torso and the dueling head in bfloat16 and the recurrent core in
    float32, on the CPU and on CUDA alike (autocast would run cuDNN's LSTM in float16 and the
    CPU's in bfloat16). Loss, priorities and gradients stay finite, the priorities float32."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    l, m, n, B, A = 4, 6, 2, 3, 6
    online = RNNQNetwork(space, A, "lstm", 32, 32, 32).to(device)
    target = RNNQNetwork(space, A, "lstm", 32, 32, 32).to(device)
    target.load_state_dict(online.state_dict())
    batch = atari_batch(rng, l + m + n, B, A, online.state_size, device)
    args = script.Args(amp=amp, burn_in_length=l, sequence_length=m, n_step=n)
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-4, eps=1e-3)
    stop = StopRequest()
    try:
        with compute_dtypes(online) as online_dtypes, compute_dtypes(target) as target_dtypes:
            priorities, stats = script.update(online, target, optimizer, batch, args, 1, stop)
    finally:
        stop.restore()
    low = "bfloat16" if amp else "float32"
    expected = {"torso": [low], "core": ["float32"], "head": [low]}
    assert online_dtypes == expected and target_dtypes == expected
    assert priorities.dtype == np.float32 and np.isfinite(priorities).all() and np.isfinite(stats["grad_norm"])
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in online.parameters())


def test_acting_computes_in_float32(device):
    """Actors, central inference and evaluation: one step of the network, no autocast: float32 throughout."""
    space = gym.spaces.Box(-1, 1, (4,), np.float32)
    net = RNNQNetwork(space, 2, "lstm", 8, 8, 8).to(device)
    with compute_dtypes(net) as dtypes, torch.no_grad():
        q, state = net(torch.zeros(1, 3, 4, device=device), torch.full((1, 3), -1, device=device),
                       torch.zeros(1, 3, device=device), torch.ones(1, 3, dtype=torch.bool, device=device),
                       net.initial_state(3, device))
    assert dtypes == {"torso": ["float32"], "core": ["float32"], "head": ["float32"]}
    assert q.dtype == state.dtype == torch.float32


def test_tf32_switch_sets_every_float32_kind_and_the_run_line_says_it():
    """--tf32 turns TF32 on for matrix products, convolutions and cuDNN RNNs together (PyTorch's
    default has convolutions and RNNs in TF32, matrix products not); off is IEEE for all three."""
    before = float32_precision()
    try:
        set_float32_precision(True)
        assert set(float32_precision().values()) == {"tf32"}
        set_float32_precision(False)
        assert set(float32_precision().values()) == {"ieee"}
    finally:
        for path, value in before.items():
            module = torch.backends
            for name in path.split("."):
                module = getattr(module, name)
            module.fp32_precision = value
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision_summary(cpu, False, True) == "float32"
    assert precision_summary(cuda, False, False) == "float32; TF32 off"
    assert precision_summary(cuda, True, True) == "bfloat16 torso and head, float32 core (--amp); float32 as TF32 (--tf32)"


def test_every_script_has_the_tf32_flag_off_by_default():
    for script in SCRIPTS:
        assert script.Args().tf32 is False and "tf32" in RESUMABLE_ARGS
