"""Recurrent cores and the Q-network against a step-by-step reference."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from r2d2_algo.model import FeedForwardCore, ResettingGRU, ResettingLSTM, RNNQNetwork, make_core

CORES = [ResettingLSTM, ResettingGRU]
STRATEGIES = ["auto", "chunked", "packed"]


def step_by_step(core, x, state, reset):
    """Reference: the plain torch RNN one step at a time, state zeroed by hand at resets."""
    outs = []
    for t in range(x.shape[0]):
        state = torch.where(reset[t].unsqueeze(-1), torch.zeros_like(state), state)
        if isinstance(core.rnn, torch.nn.LSTM):
            h, c = state.chunk(2, dim=-1)
            out, (h, c) = core.rnn(x[t : t + 1], (h[None].contiguous(), c[None].contiguous()))
            state = torch.cat([h[0], c[0]], dim=-1)
        else:
            out, h = core.rnn(x[t : t + 1], state[None].contiguous())
            state = h[0]
        outs.append(out)
    return torch.cat(outs), state


@pytest.mark.parametrize("core_cls", CORES)
@pytest.mark.parametrize("reset_first", [False, True])
def test_single_step_cell_matches_the_fused_call(core_cls, reset_first):
    """Acting unrolls one step with the cell equations; they must equal nn.LSTM / nn.GRU."""
    torch.manual_seed(4)
    core = core_cls(7, 9)
    x, state = torch.randn(1, 5, 7), torch.randn(5, core.state_size)
    reset = torch.full((1, 5), reset_first)
    out, final = core(x, state, reset)
    ref_out, ref_final = step_by_step(core, x, state, reset)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(final, ref_final, atol=1e-6, rtol=0)


@pytest.mark.parametrize("core_cls", CORES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reset_prob", [0.0, 0.05, 0.3, 1.0])
def test_core_matches_step_by_step_reference(core_cls, strategy, reset_prob):
    torch.manual_seed(0)
    core = core_cls(6, 8)
    T, B = 25, 7
    x = torch.randn(T, B, 6)
    state = torch.randn(B, core.state_size)
    reset = torch.rand(T, B) < reset_prob
    if 0 < reset_prob < 1:
        reset[0, 0] = True  # a reset at t=0 must ignore the given state
        reset[-1, 1] = True  # and one at the very last step
    out, final = core(x, state, reset, strategy=strategy)
    ref_out, ref_final = step_by_step(core, x, state, reset)
    assert out.shape == (T, B, 8) and final.shape == (B, core.state_size)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=0)


@pytest.mark.parametrize("core_cls", CORES)
@pytest.mark.parametrize("strategy", ["chunked", "packed"])
def test_state_carried_across_reset_is_exactly_zero(core_cls, strategy):
    """After a reset at t the outputs equal a fresh unroll of x[t:] from a zero state,
    bit for bit, whatever came before (even a non-finite state)."""
    torch.manual_seed(1)
    core = core_cls(5, 4)
    T, B, t_reset = 12, 3, 5
    x = torch.randn(T, B, 5)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[t_reset] = True
    fresh, fresh_final = core(x[t_reset:], torch.zeros(B, core.state_size), torch.zeros(T - t_reset, B, dtype=torch.bool))
    for state in (torch.randn(B, core.state_size) * 100, torch.full((B, core.state_size), float("inf"))):
        out, final = core(x, state, reset, strategy=strategy)
        assert torch.equal(out[t_reset:], fresh) if strategy == "chunked" else torch.allclose(out[t_reset:], fresh, atol=1e-6)
        assert torch.allclose(final, fresh_final, atol=1e-6)
        assert torch.isfinite(out[t_reset:]).all()


def test_reset_at_t0_ignores_given_state():
    core = ResettingLSTM(3, 4)
    x = torch.randn(6, 2, 3)
    reset = torch.zeros(6, 2, dtype=torch.bool)
    reset[0] = True
    a, _ = core(x, torch.randn(2, 8), reset)
    b, _ = core(x, torch.zeros(2, 8), torch.zeros(6, 2, dtype=torch.bool))
    assert torch.equal(a, b)


@pytest.mark.parametrize("core_cls", CORES)
def test_gradients_equal_between_strategies(core_cls):
    torch.manual_seed(2)
    core = core_cls(4, 6)
    x = torch.randn(10, 5, 4)
    reset = torch.rand(10, 5) < 0.3
    state = torch.randn(5, core.state_size)
    grads = []
    for strategy in ("chunked", "packed"):
        core.zero_grad()
        out, final = core(x, state, reset, strategy=strategy)
        (out.pow(2).sum() + final.sum()).backward()
        grads.append([p.grad.clone() for p in core.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_feed_forward_core_has_no_state():
    core = FeedForwardCore(3, 4)
    state = torch.zeros(2, 0)
    out, new_state = core(torch.randn(5, 2, 3), state, torch.zeros(5, 2, dtype=torch.bool))
    assert out.shape == (5, 2, 4) and new_state.shape == (2, 0)


def test_make_core_rejects_unknown_type():
    with pytest.raises(ValueError, match="rnn_type"):
        make_core("transformer", 3, 4)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "none"])
@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Box(-1, 1, (4,), np.float32),
        gym.spaces.Box(0, 255, (4, 84, 84), np.uint8),
        gym.spaces.Box(0, 255, (64, 48, 3), np.uint8),
    ],
    ids=["vector", "chw-image", "hwc-image"],
)
def test_q_network_shapes(rnn_type, space):
    T, B, A = 3, 2, 5
    net = RNNQNetwork(space, A, rnn_type, hidden_size=16, torso_size=12, head_hidden_size=8)
    expected_state = {"lstm": 32, "gru": 16, "none": 0}[rnn_type]
    assert net.state_size == expected_state
    state = net.initial_state(B)
    assert state.shape == (B, expected_state) and state.dtype == torch.float32 and not state.any()
    obs = torch.as_tensor(np.stack([[space.sample() for _ in range(B)] for _ in range(T)]))
    prev_action = torch.tensor([[-1, 0], [1, 4], [2, -1]])
    prev_reward = torch.zeros(T, B)
    reset = torch.zeros(T, B, dtype=torch.bool)
    q, new_state = net(obs, prev_action, prev_reward, reset, state)
    assert q.shape == (T, B, A) and q.dtype == torch.float32
    assert new_state.shape == (B, expected_state)


def test_q_network_rejects_2d_observations():
    with pytest.raises(ValueError, match="1-D vectors or 3-D images"):
        RNNQNetwork(gym.spaces.Box(0, 1, (3, 3)), 2)


def test_uint8_images_are_scaled_inside_the_network():
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    net = RNNQNetwork(space, 3, "none", 8, 8, 8)
    obs = torch.randint(0, 256, (1, 1, 4, 84, 84), dtype=torch.uint8)
    args = (torch.tensor([[-1]]), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool), net.initial_state(1))
    q_uint8, _ = net(obs, *args)
    q_float, _ = net(obs.float() / 255.0, *args)
    torch.testing.assert_close(q_uint8, q_float)


def test_dueling_head_combines_value_and_mean_centred_advantage():
    """Q = V + A − mean_a A (Wang et al. 2016, eq. 9), checked on the core's actual output."""
    torch.manual_seed(3)
    net = RNNQNetwork(gym.spaces.Box(-1, 1, (3,)), 4, "gru", 8, 8, 8)
    captured = {}
    net.core.register_forward_hook(lambda module, inputs, output: captured.update(out=output[0]))
    T, B = 4, 3
    q, _ = net(torch.randn(T, B, 3), torch.zeros(T, B, dtype=torch.long), torch.zeros(T, B),
               torch.zeros(T, B, dtype=torch.bool), net.initial_state(B))
    value, advantage = net.value(captured["out"]), net.advantage(captured["out"])
    torch.testing.assert_close(q, value + advantage - advantage.mean(-1, keepdim=True))
    torch.testing.assert_close(q.mean(-1, keepdim=True), value)


def test_previous_action_none_is_all_zero_one_hot():
    """prev_action = -1 (episode start) must not be encoded as action 0."""
    net = RNNQNetwork(gym.spaces.Box(-1, 1, (2,)), 3, "lstm", 8, 8, 8)
    with torch.no_grad():
        net.core.rnn.weight_ih_l0[:, 8] = 5.0  # column 8 = one-hot of action 0 (after 8 torso features)
    obs = torch.zeros(1, 1, 2)
    rest = (torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool), net.initial_state(1))
    q_none, _ = net(obs, torch.tensor([[-1]]), *rest)
    q_zero, _ = net(obs, torch.tensor([[0]]), *rest)
    assert not torch.allclose(q_none, q_zero)


def parameter_layout(net):
    """(device, dtype, storage pointer, shape) of every parameter, and the LSTM's flat weights."""
    return [(p.device, p.dtype, p.data_ptr(), tuple(p.shape)) for p in net.parameters()]


@pytest.mark.parametrize("vector_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_weight_load_keeps_each_parameters_device_dtype_and_storage(device, vector_dtype):
    """What the actors, the evaluator and central inference do with published weights: a CPU
    vector (of any float dtype) copied into a network on ``device`` leaves every parameter where
    it was (device, dtype, storage: an LSTM's stay in its flat weight buffer) and equal to the
    vector. torch's vector_to_parameters rebinds them to the CPU vector instead (a float64 vector
    makes them float64; on CUDA the next forward pass fails)."""
    from r2d2_algo.model import load_parameter_vector
    from torch.nn.utils import parameters_to_vector

    torch.manual_seed(5)
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    source = RNNQNetwork(space, 6, "lstm", 16, 16, 16)
    vector = parameters_to_vector(source.parameters()).detach().to(vector_dtype)  # (P,) on the CPU
    net = RNNQNetwork(space, 6, "lstm", 16, 16, 16).to(device)
    before = parameter_layout(net)
    load_parameter_vector(net, vector.numpy())
    assert parameter_layout(net) == before
    for p, q in zip(net.parameters(), source.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=0)
    rnn = net.core.rnn
    assert [w.data_ptr() for w in rnn._flat_weights] == [p.data_ptr() for p in rnn.parameters()]
    obs = torch.zeros(3, 2, 4, 84, 84, dtype=torch.uint8, device=device)
    q, _ = net(obs, torch.zeros(3, 2, dtype=torch.long, device=device), torch.zeros(3, 2, device=device),
               torch.zeros(3, 2, dtype=torch.bool, device=device), net.initial_state(2, device))
    assert q.device.type == torch.device(device).type and q.dtype == torch.float32
    with pytest.raises(ValueError, match="does not fit"):
        load_parameter_vector(net, vector[:-1].numpy())


def test_every_script_loads_published_weights_in_place(device, monkeypatch):
    """The weight loads of the scripts themselves: r2d2_mp.py's load_published_weights (actors,
    evaluator, central inference) and r2d2_ray.py's published params, as its actors
    (ray_param_store.ParamFetcher) and its evaluator (ray_param_store.load_params) load them (Ray's
    object store hands them a read-only array; ray.get is replaced by the identity here)."""
    import threading

    from r2d2_algo import r2d2_mp, ray_param_store
    from torch.nn.utils import parameters_to_vector

    torch.manual_seed(6)
    space = gym.spaces.Box(-1, 1, (4,), np.float32)
    source = RNNQNetwork(space, 2, "lstm", 8, 8, 8)
    vector = parameters_to_vector(source.parameters()).detach().double().numpy()  # (P,) float64

    net = RNNQNetwork(space, 2, "lstm", 8, 8, 8).to(device)
    before = parameter_layout(net)
    assert r2d2_mp.load_published_weights(net, vector, np.array([7]), threading.Lock()) == 7
    assert parameter_layout(net) == before
    torch.testing.assert_close(parameters_to_vector(net.parameters()).cpu(), torch.from_numpy(vector).float())

    monkeypatch.setattr(ray_param_store.ray, "get", lambda ref: ref)
    read_only = vector.copy()
    read_only.flags.writeable = False
    for role in ("actor", "evaluator"):
        net = RNNQNetwork(space, 2, "lstm", 8, 8, 8).to(device)  # the load alone, without Ray
        before = parameter_layout(net)
        if role == "actor":
            fetcher = ray_param_store.ParamFetcher(None, net)
            assert fetcher.load(3, [read_only]) and fetcher.version == 3
        else:
            ray_param_store.load_params(net, [read_only])
        assert parameter_layout(net) == before
        torch.testing.assert_close(parameters_to_vector(net.parameters()).cpu(), torch.from_numpy(vector).float())
