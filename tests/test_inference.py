"""Central inference (r2d2_mp.py --inference central): the inference process acts exactly as
each actor's own copy of the network would, batching the requests of several actors at once."""

import multiprocessing as std_mp
import os
import threading

import numpy as np
import torch

from r2d2_algo import r2d2_mp
from r2d2_algo.envs import check_env_id, make_vector_env
from r2d2_algo.shared import SharedArrays
from r2d2_algo.storage import SequenceReplayBuffer

NUM_ACTORS, NUM_ENVS, STEPS = 2, 4, 300


def small_args(**overrides):
    return r2d2_mp.Args(env_id="CartPole-v1", num_actors=NUM_ACTORS, num_envs_per_actor=NUM_ENVS, hidden_size=16,
                        torso_size=16, head_hidden_size=16, burn_in_length=2, sequence_length=4, overlap=2,
                        buffer_size=NUM_ACTORS * NUM_ENVS * 400, inference="central", **overrides)


def act(actor_id, net, inference=None):
    """STEPS acting steps of actor ``actor_id``'s envs; returns the episodes and what was written to replay."""
    envs = make_vector_env("CartPole-v1", NUM_ENVS, seed=10 + actor_id)
    replay = SequenceReplayBuffer(NUM_ENVS, NUM_ENVS * 400, (4,), np.float32, net.state_size, 2, 4, 2, 2)
    actor = r2d2_mp.EnvActor(envs, net, replay, np.array([1.0, 0.3, 0.05, 0.0]), np.random.default_rng(actor_id),
                             seed=10 + actor_id, inference=inference)
    episodes = [actor.step() for _ in range(STEPS)]
    envs.close()
    return episodes, {name: getattr(replay, name).copy() for name in SequenceReplayBuffer.SHARED_ARRAYS}


def test_central_and_local_inference_choose_the_same_actions_and_store_the_same_states(device):
    """Two actors in two threads request actions at the same time, so the inference process
    (serving on ``device``: the learner's, a GPU by default where there is one) batches their envs
    together; each actor must write what its own CPU network would have written."""
    args = small_args()
    observation_space, n_actions = check_env_id(args.env_id)
    torch.manual_seed(3)
    net = r2d2_mp.make_network(args, observation_space, n_actions)
    local = [act(actor_id, net) for actor_id in range(NUM_ACTORS)]

    ctx = std_mp.get_context("spawn")
    arrays = SharedArrays()
    try:
        replay_kwargs = r2d2_mp.replay_arguments(args, observation_space, net.state_size, 1)
        r2d2_mp.create_shared_memory(arrays, replay_kwargs, sum(p.numel() for p in net.parameters()), NUM_ACTORS)
        r2d2_mp.create_inference_memory(arrays, NUM_ACTORS, NUM_ENVS, observation_space, net.state_size)
        lock, stop, errors = ctx.Lock(), ctx.Event(), ctx.Queue()
        requests, responses = ctx.Semaphore(0), [ctx.Semaphore(0) for _ in range(NUM_ACTORS)]
        r2d2_mp.publish(net, arrays["weights"], arrays["weights_version"], lock, 0)
        server = ctx.Process(target=r2d2_mp.inference_server, args=(
            args, arrays.layout, lock, requests, responses, stop, errors, observation_space, n_actions, os.getpid(),
            device))
        server.start()
        central, batches = [None] * NUM_ACTORS, []
        unused = r2d2_mp.make_network(args, observation_space, n_actions)  # central: only its sizes are used

        def run(actor_id):
            client = r2d2_mp.InferenceClient(arrays, actor_id, NUM_ENVS, requests, responses[actor_id], stop,
                                             os.getppid())  # an actor's parent: here, this process's
            central[actor_id] = act(actor_id, unused, client)

        threads = [threading.Thread(target=run, args=(actor_id,)) for actor_id in range(NUM_ACTORS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stop.set()
        server.join(timeout=10)
        assert server.exitcode == 0 and all(result is not None for result in central), \
            errors.get(timeout=1) if not errors.empty() else server.exitcode
        assert arrays["actor_weights_version"][:NUM_ACTORS].tolist() == [0] * NUM_ACTORS
    finally:
        if server.is_alive():
            server.kill()
        arrays.close()
        arrays.unlink()

    for (episodes_local, written_local), (episodes_central, written_central) in zip(local, central):
        assert episodes_local == episodes_central and sum(map(len, episodes_local)) > 5
        for name in written_local:
            if name == "stored_state":  # batched with the other actor's envs (on another device): float rounding
                np.testing.assert_allclose(written_central[name], written_local[name], rtol=1e-5,
                                           atol=1e-6 if device == "cpu" else 1e-5)
            else:
                np.testing.assert_array_equal(written_central[name], written_local[name], err_msg=name)
        assert np.abs(written_local["stored_state"]).max() > 0.01  # states were stored, not zeros
