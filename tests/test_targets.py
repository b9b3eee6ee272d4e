"""Value rescaling, n-step double-Q targets and the R2D2 loss against brute force."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from r2d2_algo.model import RNNQNetwork
from r2d2_algo.r2d2 import inverse_value_rescale, n_step_targets, r2d2_loss, value_rescale
from r2d2_algo.storage import sequence_priorities


def h_ref(x, eps):
    return math.copysign(math.sqrt(abs(x) + 1) - 1, x) + eps * x


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.0])
def test_value_rescale_matches_definition_and_inverts_exactly(eps):
    x = torch.tensor([-1e6, -5000.0, -21.0, -1.0, -1e-4, 0.0, 1e-4, 0.5, 1.0, 21.0, 333.0, 5000.0, 1e6],
                     dtype=torch.float64)
    hx = value_rescale(x, eps)
    np.testing.assert_allclose(hx.numpy(), [h_ref(v, eps) for v in x.tolist()], rtol=1e-12)
    np.testing.assert_allclose(inverse_value_rescale(hx, eps).numpy(), x.numpy(), rtol=1e-9, atol=1e-9)
    y = torch.linspace(-300, 300, 1001, dtype=torch.float64)
    np.testing.assert_allclose(value_rescale(inverse_value_rescale(y, eps), eps).numpy(), y.numpy(), atol=1e-9)


def test_value_rescale_known_values():
    assert value_rescale(torch.tensor(3.0), 1e-3).item() == pytest.approx(1.0 + 3e-3)
    assert value_rescale(torch.tensor(-8.0), 0.0).item() == pytest.approx(-2.0)
    assert inverse_value_rescale(torch.tensor(2.0), 0.0).item() == pytest.approx(8.0)


def brute_force_targets(reward, terminated, truncated, bootstrap_q, gamma, n, eps):
    """Per-element loop written straight from the definition (docs/algorithm.md, piece 3)."""
    L, B = reward.shape
    T = L - n
    targets = np.zeros((T, B))
    mask = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            if terminated[t, b] or truncated[t, b]:
                continue  # a final observation has no action, no target
            mask[t, b] = 1
            g, boot = 0.0, 0.0
            for k in range(n):
                g += gamma**k * reward[t + k, b]
                j = t + k + 1
                if terminated[j, b]:
                    break
                if truncated[j, b]:
                    boot = gamma ** (k + 1) * h_inv_ref(bootstrap_q[j, b], eps)
                    break
                if k == n - 1:
                    boot = gamma**n * h_inv_ref(bootstrap_q[j, b], eps)
            targets[t, b] = h_ref(g + boot, eps)
    return targets, mask


def h_inv_ref(y, eps):
    # invert h by bisection: independent of the closed form under test
    lo, hi = -1e9, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        if h_ref(mid, eps) < y:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("end_prob", [0.0, 0.15, 0.5])
def test_n_step_targets_match_brute_force(n, end_prob):
    rng = np.random.default_rng(n)
    L, B, gamma, eps = 20, 6, 0.97, 1e-3
    reward = rng.normal(size=(L, B)) * 3
    end = rng.random((L, B)) < end_prob
    kind = rng.random((L, B))
    terminated = end & (kind < 0.6)
    truncated = end & (kind > 0.3)  # both at once too: TimeLimit's last step that also failed
    bootstrap_q = rng.normal(size=(L, B)) * 5
    got, mask = n_step_targets(torch.tensor(reward), torch.tensor(terminated), torch.tensor(truncated),
                               torch.tensor(bootstrap_q), gamma, n, eps)
    expected, expected_mask = brute_force_targets(reward, terminated, truncated, bootstrap_q, gamma, n, eps)
    np.testing.assert_array_equal(mask.numpy(), expected_mask)
    np.testing.assert_allclose(got.numpy() * expected_mask, expected * expected_mask, rtol=1e-7, atol=1e-7)


def test_terminal_stops_bootstrap_and_truncation_bootstraps():
    """Hand-computed: one reward then a terminal vs. a truncated final observation."""
    gamma, eps = 0.5, 0.0
    reward = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    bootstrap_q = torch.full((4, 1), value_rescale(torch.tensor(8.0), eps).item())
    end = torch.tensor([[False], [True], [False], [False]])
    no = torch.zeros(4, 1, dtype=torch.bool)
    y_term, _ = n_step_targets(reward, end, no, bootstrap_q, gamma, 2, eps)
    y_trunc, _ = n_step_targets(reward, no, end, bootstrap_q, gamma, 2, eps)
    assert inverse_value_rescale(y_term[0], eps).item() == pytest.approx(1.0)
    assert inverse_value_rescale(y_trunc[0], eps).item() == pytest.approx(1.0 + 0.5 * 8.0)


def test_terminated_and_truncated_at_once_is_terminal():
    """Reward 1, then an observation both terminated and truncated (gymnasium's TimeLimit sets
    both when the last allowed step is also a failure), Q = 5 everywhere: the target is h(1),
    nothing bootstrapped."""
    eps = 1e-3
    reward = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    both = torch.tensor([[False], [True], [False], [False]])
    bootstrap_q = torch.full((4, 1), 5.0)
    for n in (1, 2, 3):
        y, mask = n_step_targets(reward, both, both, bootstrap_q, 0.9, n, eps)
        assert mask[0].item() == 1.0
        assert y[0].item() == pytest.approx(value_rescale(torch.tensor(1.0), eps).item(), abs=1e-7)


def make_batch(rng, W, B, obs_dim, n_actions, state_size):
    return {
        "obs": torch.tensor(rng.normal(size=(W, B, obs_dim)), dtype=torch.float32),
        "action": torch.tensor(rng.integers(0, n_actions, (W, B))),
        "reward": torch.tensor(rng.normal(size=(W, B)), dtype=torch.float32),
        "first": torch.tensor(rng.random((W, B)) < 0.1),
        "terminated": torch.tensor(rng.random((W, B)) < 0.05),
        "truncated": torch.tensor(rng.random((W, B)) < 0.05),
        "prev_action": torch.tensor(rng.integers(-1, n_actions, (W, B))),
        "prev_reward": torch.tensor(rng.normal(size=(W, B)), dtype=torch.float32),
        "initial_state": torch.tensor(rng.normal(size=(B, state_size)), dtype=torch.float32),
        "weights": torch.tensor(rng.uniform(0.1, 1.0, B), dtype=torch.float32),
    }


def test_r2d2_loss_matches_a_brute_force_unroll():
    """Loss and priorities from an independent computation: full unrolls of both networks,
    online state after burn-in, double-Q bootstrap, per-sequence sum of ½δ² over the valid
    trained steps (Acme's and SEED RL's reduction), importance-weighted mean over the batch."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    l, m, n, gamma, eps, eta = 3, 5, 2, 0.9, 1e-3, 0.9
    W, B, A = l + m + n, 4, 3
    space = gym.spaces.Box(-1, 1, (2,))
    online, target = RNNQNetwork(space, A, "lstm", 8, 8, 8), RNNQNetwork(space, A, "lstm", 8, 8, 8)
    batch = make_batch(rng, W, B, 2, A, online.state_size)
    loss, priorities, _ = r2d2_loss(online, target, batch, l, m, gamma, n, eps, eta)

    with torch.no_grad():
        args = (batch["obs"], batch["prev_action"], batch["prev_reward"], batch["first"], batch["initial_state"])
        q_online, _ = online(*args)  # same weights: burning in then continuing == one full unroll
        q_target, _ = target(*args)
    bootstrap = q_target.gather(-1, q_online.argmax(-1, keepdim=True)).squeeze(-1)
    expected_targets, mask = brute_force_targets(batch["reward"].numpy(), batch["terminated"].numpy(),
                                                 batch["truncated"].numpy(), bootstrap.numpy(), gamma, n, eps)
    expected_targets, mask = expected_targets[l : l + m], mask[l : l + m]
    q_taken = q_online.gather(-1, batch["action"].unsqueeze(-1)).squeeze(-1).numpy()[l : l + m]
    td = expected_targets - q_taken
    expected_loss = sum(batch["weights"][b].item() * sum(0.5 * td[t, b] ** 2 for t in range(m) if mask[t, b])
                        for b in range(B)) / B
    assert loss.item() == pytest.approx(expected_loss, rel=1e-4)
    np.testing.assert_allclose(priorities, sequence_priorities(np.abs(td), mask, eta), rtol=1e-4, atol=1e-6)


def test_q_discrepancy_is_zero_on_the_learners_own_states_and_matches_a_brute_force_one():
    """The paper's ΔQ (R2D2 Sec. 3) in r2d2_loss's stats: 0 when the states inside the window are
    the ones the learner's own unroll passes through (a network that has not changed since it
    acted); otherwise ‖q(learner state) − q(actor state)‖₂ / max|Q| of the trained steps, each
    actor state stepped once through the network, averaged over the windows of weight > 0."""
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    l, m, n, offsets = 3, 6, 2, [4, 8]  # overlap 2: later starts every 4 steps (storage.later_state_offsets)
    W, B, A = l + m + n, 5, 3
    space = gym.spaces.Box(-1, 1, (2,))
    online, target = RNNQNetwork(space, A, "lstm", 8, 8, 8), RNNQNetwork(space, A, "lstm", 8, 8, 8)
    batch = make_batch(rng, W, B, 2, A, online.state_size)
    args = (batch["obs"], batch["prev_action"], batch["prev_reward"], batch["first"])
    with torch.no_grad():
        q_full, _ = online(*args, batch["initial_state"])
        states = [batch["initial_state"]]  # the state entering each step, unrolled one step at a time
        for t in range(W):
            states.append(online(*(x[t : t + 1] for x in args), states[-1])[1])
    batch["later_state_offsets"] = offsets
    batch["later_states"] = torch.stack([states[o] for o in offsets])
    _, _, stats = r2d2_loss(online, target, batch, l, m, 0.99, n, 1e-3, 0.9)
    assert stats["q_discrepancy_first"].item() < 1e-6 and stats["q_discrepancy_last"].item() < 1e-6

    batch["later_states"] = torch.tensor(rng.normal(size=(2, B, online.state_size)), dtype=torch.float32)
    batch["weights"][1] = 0.0  # a window overwritten while it was read: not counted
    _, _, stats = r2d2_loss(online, target, batch, l, m, 0.99, n, 1e-3, 0.9)
    for name, j in (("q_discrepancy_first", 0), ("q_discrepancy_last", 1)):
        o, values = offsets[j], []
        for b in [0, 2, 3, 4]:
            with torch.no_grad():
                q_acted, _ = online(*(x[o : o + 1, b : b + 1] for x in args), batch["later_states"][j, b : b + 1])
            scale = q_full[l : l + m, b].abs().max().item()
            values.append(float(np.linalg.norm(q_full[o, b].numpy() - q_acted[0, 0].numpy())) / scale)
        assert stats[name].item() == pytest.approx(np.mean(values), rel=1e-5)
    assert stats["q_discrepancy_first"].item() > 0.01


def test_burn_in_gets_no_gradient():
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    l, m, n = 4, 5, 2
    space = gym.spaces.Box(-1, 1, (2,))
    online, target = RNNQNetwork(space, 3, "gru", 8, 8, 8), RNNQNetwork(space, 3, "gru", 8, 8, 8)
    batch = make_batch(rng, l + m + n, 3, 2, 3, online.state_size)
    batch["terminated"][:] = False
    batch["truncated"][:] = False
    batch["obs"].requires_grad_(True)
    loss, _, _ = r2d2_loss(online, target, batch, l, m, 0.99, n, 1e-3, 0.9)
    loss.backward()
    assert batch["obs"].grad[:l].abs().sum() == 0  # burn-in only unrolls
    assert batch["obs"].grad[l : l + m].abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


def test_bf16_autocast_loss_stays_within_tolerance_of_fp32():
    """--amp: the same fixed Atari-shaped batch and weights, forward passes under bfloat16 autocast,
    give the fp32 loss, priorities and gradient direction within tolerance (and do change them:
    autocast really ran)."""
    from r2d2_algo import r2d2, r2d2_mp
    from r2d2_algo.stopping import StopRequest

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    l, m, n, B, A = 6, 10, 3, 4, 6
    W = l + m + n
    online = RNNQNetwork(space, A, "lstm", 64, 64, 64)
    target = RNNQNetwork(space, A, "lstm", 64, 64, 64)
    target.load_state_dict(online.state_dict())
    batch = make_batch(rng, W, B, 1, A, online.state_size)
    batch["obs"] = torch.tensor(rng.integers(0, 255, (W, B, 4, 84, 84), dtype=np.uint8))
    batch["reward"] = batch["reward"] * 5
    results = []
    for amp in (False, True):
        online.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss, priorities, _ = r2d2_loss(online, target, batch, l, m, 0.997, n, 1e-3, 0.9)
        loss.backward()
        results.append((loss.item(), priorities.numpy(), torch.cat([p.grad.flatten() for p in online.parameters()])))
    (loss_fp32, prio_fp32, grad_fp32), (loss_amp, prio_amp, grad_amp) = results
    assert loss_amp != loss_fp32  # bfloat16 was used
    assert loss_amp == pytest.approx(loss_fp32, rel=1e-2)
    np.testing.assert_allclose(prio_amp, prio_fp32, rtol=2e-2)
    assert torch.nn.functional.cosine_similarity(grad_amp, grad_fp32, dim=0) > 0.99
    for script in (r2d2, r2d2_mp):  # and update() runs it behind --amp
        args = script.Args(amp=True, burn_in_length=l, sequence_length=m, n_step=n)
        optimizer = torch.optim.Adam(online.parameters(), lr=1e-4, eps=1e-3)
        stop = StopRequest()
        try:
            priorities, stats = script.update(online, target, optimizer, batch, args, 1, stop)
        finally:
            stop.restore()
        assert priorities.dtype == np.float32 and np.isfinite(priorities).all() and np.isfinite(stats["grad_norm"])
