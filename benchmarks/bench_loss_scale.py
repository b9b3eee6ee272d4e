"""How large Adam's steps are with the loss summed or averaged over a sequence's trained steps.

    python benchmarks/bench_loss_scale.py [--env-id PongNoFrameskip-v4]

Fills a small replay with ε = 0.5 play of the paper-size network at initialisation (r2d2.py's
EnvActor), samples one batch of 64 windows (burn-in 40, sequence 80, n-step 5) and takes the
gradient of r2d2.py's loss, which sums ½δ² over each sequence's valid trained steps (Acme, SEED
RL). Adam's first step for a gradient g is lr · g / (|g| + ε) per parameter (m̂ = g, v̂ = g²), so
with the paper's ε = 1e-3 a small gradient moves a weight by only a fraction |g| / (|g| + ε) of
lr. Printed for the sum and for the mean over the 80 steps (the sum ÷ 80): the
gradient-weighted mean of that fraction, and the median |g|. Writes JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from r2d2_algo.envs import check_env_id, make_vector_env
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.r2d2 import EnvActor, batch_to_torch, r2d2_loss
from r2d2_algo.storage import SequenceReplayBuffer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    env_id: str = "PongNoFrameskip-v4"
    """environment whose data fills the replay"""
    adam_eps: float = 1e-3
    """Adam's ε (paper: 1e-3)"""
    seed: int = 0
    """seed of the network, the envs and the sampling"""
    out: str = str(ROOT / "benchmarks" / "results" / "bench_loss_scale.json")
    """JSON output"""


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    space, n_actions = check_env_id(args.env_id)
    net, target = RNNQNetwork(space, n_actions), RNNQNetwork(space, n_actions)
    target.load_state_dict(net.state_dict())
    frame_stack, num_envs, l, m, n = (4 if len(space.shape) == 3 else 1), 8, 40, 80, 5
    replay = SequenceReplayBuffer(num_envs, num_envs * 400, space.shape, space.dtype, net.state_size, l, m, n, 40,
                                  frame_stack=frame_stack)
    envs = make_vector_env(args.env_id, num_envs, args.seed)
    actor = EnvActor(envs, net, replay, np.full(num_envs, 0.5), np.random.default_rng(args.seed), args.seed)
    while replay.num_valid_sequences < 16:
        actor.step()
    envs.close()
    batch = batch_to_torch(replay.sample(64, np.random.default_rng(args.seed)), "cpu", frame_stack)
    loss, _, _ = r2d2_loss(net, target, batch, l, m, 0.997, n, 1e-3, 0.9)
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in net.parameters()]).abs().double()
    results = {"env_id": args.env_id, "adam_eps": args.adam_eps, "parameters": int(g.numel())}
    print(f"| loss over a sequence's trained steps | gradient-weighted mean |Adam step| ÷ lr | median |g| |\n|---|---|---|")
    for name, grad in (("sum (r2d2.py)", g), (f"mean (sum ÷ {m})", g / m)):
        fraction = grad / (grad + args.adam_eps)
        row = {"weighted_step_over_lr": float((grad * fraction).sum() / grad.sum()), "median_abs_grad": float(grad.median())}
        results[name] = row
        print(f"| {name} | {row['weighted_step_over_lr']:.3f} | {row['median_abs_grad']:.2e} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
