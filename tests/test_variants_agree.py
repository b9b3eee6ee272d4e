"""The variant scripts carry their own copies of the algorithm (cleanrl's choice: a reader never
leaves the file). These tests keep the copies equal in behaviour: the same loss, priorities,
targets and update on the same batch, and the same steps written by the acting step."""

import dataclasses
import difflib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from r2d2_algo import r2d2, r2d2_mp, r2d2_ray
from r2d2_algo.envs import make_vector_env
from r2d2_algo.model import RNNQNetwork
from r2d2_algo.stopping import StopRequest
from r2d2_algo.storage import SequenceReplayBuffer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [r2d2_mp, r2d2_ray]  # each compared with r2d2.py


def random_batch(rng, W, B, obs_dim, n_actions, state_size):
    return {
        "obs": torch.tensor(rng.normal(size=(W, B, obs_dim)), dtype=torch.float32),
        "action": torch.tensor(rng.integers(0, n_actions, (W, B))),
        "reward": torch.tensor(rng.normal(size=(W, B)) * 3, dtype=torch.float32),
        "first": torch.tensor(rng.random((W, B)) < 0.1),
        "terminated": torch.tensor(rng.random((W, B)) < 0.05),
        "truncated": torch.tensor(rng.random((W, B)) < 0.05),
        "prev_action": torch.tensor(rng.integers(-1, n_actions, (W, B))),
        "prev_reward": torch.tensor(rng.normal(size=(W, B)), dtype=torch.float32),
        "initial_state": torch.tensor(rng.normal(size=(B, state_size)), dtype=torch.float32),
        "weights": torch.tensor(rng.uniform(0.1, 1.0, B), dtype=torch.float32),
        "later_states": torch.tensor(rng.normal(size=(2, B, state_size)), dtype=torch.float32),  # for ΔQ
        "later_state_offsets": [4, 8],  # burn-in 3, sequence 6, overlap 2
    }


def networks(seed, rnn_type="lstm"):
    torch.manual_seed(seed)
    space = gym.spaces.Box(-1, 1, (3,))
    return RNNQNetwork(space, 4, rnn_type, 16, 16, 16), RNNQNetwork(space, 4, rnn_type, 16, 16, 16)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "none"])
def test_losses_priorities_and_gradients_agree(variant, rnn_type):
    l, m, n = 3, 6, 2
    online, target = networks(0, rnn_type)
    batch = random_batch(np.random.default_rng(1), l + m + n, 5, 3, 4, online.state_size)
    results = []
    for script in (r2d2, variant):
        online.zero_grad()
        loss, priorities, stats = script.r2d2_loss(online, target, batch, l, m, 0.99, n, 1e-3, 0.9)
        loss.backward()
        results.append((loss.item(), priorities, stats, [p.grad.clone() for p in online.parameters()]))
    (loss_a, prio_a, stats_a, grads_a), (loss_b, prio_b, stats_b, grads_b) = results
    assert loss_a == loss_b and stats_a == stats_b
    assert ("q_discrepancy_first" in stats_a) == (rnn_type != "none")  # ΔQ needs a recurrent state
    np.testing.assert_array_equal(prio_a, prio_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("variant", VARIANTS)
def test_targets_and_value_rescaling_agree(variant):
    rng = np.random.default_rng(2)
    L, B = 30, 7
    end = rng.random((L, B)) < 0.2
    flags = (torch.tensor(end & (rng.random((L, B)) < 0.6)), torch.tensor(end & (rng.random((L, B)) < 0.6)))
    args = (torch.tensor(rng.normal(size=(L, B))), *flags, torch.tensor(rng.normal(size=(L, B)) * 10), 0.97, 5, 1e-3)
    for a, b in zip(r2d2.n_step_targets(*args), variant.n_step_targets(*args)):
        assert torch.equal(a, b)
    x = torch.linspace(-500, 500, 1001, dtype=torch.float64)
    assert torch.equal(r2d2.value_rescale(x, 1e-3), variant.value_rescale(x, 1e-3))
    assert torch.equal(r2d2.inverse_value_rescale(x, 1e-3), variant.inverse_value_rescale(x, 1e-3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_updates_agree(variant):
    """Three updates from the same weights and batches: the same weights, target copies and priorities."""
    args = r2d2.Args(burn_in_length=3, sequence_length=6, n_step=2, target_network_update_period=2)
    rng = np.random.default_rng(3)
    batches = [random_batch(rng, 11, 5, 3, 4, 32) for _ in range(3)]
    final = []
    for script in (r2d2, variant):
        online, target = networks(4)
        optimizer = torch.optim.Adam(online.parameters(), lr=1e-3, eps=1e-3)
        stop = StopRequest()
        try:
            out = [script.update(online, target, optimizer, batch, args, i + 1, stop) for i, batch in enumerate(batches)]
        finally:
            stop.restore()
        final.append((out, online.state_dict(), target.state_dict()))
    (out_a, online_a, target_a), (out_b, online_b, target_b) = final
    for (prio_a, stats_a), (prio_b, stats_b) in zip(out_a, out_b):
        np.testing.assert_array_equal(prio_a, prio_b)
        assert stats_a == stats_b
    assert all(torch.equal(online_a[k], online_b[k]) and torch.equal(target_a[k], target_b[k]) for k in online_a)


@pytest.mark.parametrize("variant", VARIANTS)
def test_acting_steps_agree(variant):
    """The acting step of each script, on the same synchronous envs with the same network and
    seeds, writes the same steps to replay and reports the same episodes."""
    written = []
    for script in (r2d2, variant):
        envs = make_vector_env("CartPole-v1", 4, seed=9)
        torch.manual_seed(5)
        net = RNNQNetwork(envs.single_observation_space, 2, "lstm", 16, 16, 16)
        replay = SequenceReplayBuffer(4, 4 * 400, (4,), np.float32, net.state_size, 2, 4, 2, 2)
        actor = script.EnvActor(envs, net, replay, np.array([1.0, 0.4, 0.1, 0.0]), np.random.default_rng(6), seed=9)
        episodes = [actor.step() for _ in range(300)]
        envs.close()
        written.append((episodes, {name: getattr(replay, name).copy() for name in SequenceReplayBuffer.SHARED_ARRAYS}))
    (episodes_a, arrays_a), (episodes_b, arrays_b) = written
    assert episodes_a == episodes_b and sum(map(len, episodes_a)) > 10
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_the_diff_between_the_scripts_is_the_plumbing():
    """At least 70 % of r2d2.py's non-blank lines appear, in order, in r2d2_mp.py, and 65 % in
    r2d2_ray.py (the README's figures: 72 % and 70 % when written)."""
    assert shared_line_fraction(ROOT / "r2d2_algo" / "r2d2.py", ROOT / "r2d2_algo" / "r2d2_mp.py") >= 0.70
    assert shared_line_fraction(ROOT / "r2d2_algo" / "r2d2.py", ROOT / "r2d2_algo" / "r2d2_ray.py") >= 0.65


def test_the_scripts_share_their_flags():
    """A flag of r2d2.py means the same in r2d2_mp.py and r2d2_ray.py (same name and type), and
    every flag of r2d2_mp.py is in r2d2_ray.py: a sweep config or a habit carries over. Apart: the
    env count (--num-envs of one process is --num-envs-per-actor of each actor) and r2d2_mp.py's
    --inference (Ray workers always act on their own copy)."""
    fields = {m: {f.name: f.type for f in dataclasses.fields(m.Args)} for m in (r2d2, r2d2_mp, r2d2_ray)}
    for variant in VARIANTS:
        missing = {name for name in fields[r2d2] if fields[variant].get(name) != fields[r2d2][name]}
        assert missing == {"num_envs"}, (variant.__name__, missing)
    assert {name for name in fields[r2d2_mp] if fields[r2d2_ray].get(name) != fields[r2d2_mp][name]} == {"inference"}


def shared_line_fraction(a: Path, b: Path) -> float:
    """Fraction of a's non-blank stripped lines that appear, in order, in b's (difflib)."""
    lines_a = [line.strip() for line in a.read_text().splitlines() if line.strip()]
    lines_b = [line.strip() for line in b.read_text().splitlines() if line.strip()]
    matcher = difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(lines_a)


if __name__ == "__main__":  # the README's figure
    print(f"{shared_line_fraction(ROOT / 'r2d2_algo' / 'r2d2.py', ROOT / 'r2d2_algo' / 'r2d2_mp.py'):.1%} of r2d2.py's "
          f"non-blank lines appear, in order, in r2d2_mp.py")
