"""ray_start.py: the Ray arguments, the object store's bound, the check that a run fits before Ray
starts, an embedded Ray that leaves nothing behind, and what a Ray actor knows of its start."""

import glob
import os
import tempfile
import types

import gymnasium as gym
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from r2d2_algo.model import RNNQNetwork  # noqa: E402
from r2d2_algo.ray_start import (  # noqa: E402
    check_ray_args,
    check_resources,
    incarnation,
    object_store_bytes,
    ray_session,
    restarted,
)


def run_args(**changes):
    args = dict(ray_address=None, ray_plasma_directory=None, num_actors=2, num_replay_shards=1,
                num_envs_per_actor=4, actor_push_interval=10, samples_in_flight=2, batch_size=8, burn_in_length=2,
                sequence_length=4, n_step=1, buffer_size=1000, hidden_size=8, torso_size=8, head_hidden_size=8,
                rnn_type="lstm")
    return types.SimpleNamespace(**{**args, **changes})


@pytest.mark.parametrize("address, plasma, message", [
    ("nonsense", None, "--ray-address: expected HOST:PORT or auto, got 'nonsense'"),
    ("host:99999", None, "expected HOST:PORT or auto"),
    ("auto", "/tmp", "--ray-plasma-directory is for the embedded Ray"),
])
def test_bad_ray_arguments_are_one_line(address, plasma, message):
    with pytest.raises(ValueError, match=message):
        check_ray_args(run_args(ray_address=address, ray_plasma_directory=plasma))
    check_ray_args(run_args(ray_address="10.0.0.1:6379"))
    check_ray_args(run_args(ray_plasma_directory="/tmp"))


def test_the_object_store_bound_counts_pushes_batches_and_two_param_versions():
    """2 pushes per actor of 10 actor steps × 4 envs (one frame of 4 uint8 stacked 2 × 3 × 3 frames,
    a state of 5 floats, 16 bytes of the rest), 2 batches of 8 windows of 2 + 4 + 1 + 3 steps, and 2
    float32 copies of 100 params."""
    space = types.SimpleNamespace(shape=(4, 3, 3), dtype=np.uint8)
    frame = 9
    pushes = 2 * 2 * 10 * 4 * (frame + 4 * 5 + 16)
    samples = 2 * 8 * ((2 + 4 + 1 + 3) * (frame + 16) + 4 * 5 + 16)
    assert object_store_bytes(run_args(), space, 5, 4, 100) == pushes + samples + 2 * 4 * 100


def test_a_run_that_does_not_fit_is_refused_before_ray_starts():
    space = gym.spaces.Box(-1, 1, (4,), np.float32)
    network = RNNQNetwork(space, 2, "lstm", 8, 8, 8)
    shard = dict(num_streams=8, capacity=1000, obs_shape=(4,), obs_dtype=np.float32, state_size=network.state_size,
                 burn_in_length=2, sequence_length=4, n_step=1, overlap=2)
    in_flight, store_size, limits = check_resources(run_args(), space, network, 1, [shard])
    assert store_size == max(2 * in_flight, 256 * 2**20) and limits.cpus >= 1
    huge = dict(shard, capacity=10**13)
    with pytest.raises(ValueError, match=r"lower --buffer-size \(about [\d,]+ fit\), --batch-size or --num-actors"):
        check_resources(run_args(buffer_size=10**13), space, network, 1, [huge])
    check_resources(run_args(ray_address="auto", buffer_size=10**13), space, network, 1, [huge])  # a cluster's own
    with pytest.raises(ValueError, match="--ray-plasma-directory '/no/such' is not a writable folder"):
        check_resources(run_args(ray_plasma_directory="/no/such"), space, network, 1, [shard])


def test_an_embedded_ray_is_stopped_and_its_folder_removed(tmp_path, monkeypatch):
    """Within the block Ray runs, with its files under $RAY_TMPDIR; after it, however it ends (here
    an exception), Ray is shut down and the folder removed (and the reaper told so: it exits)."""
    with tempfile.TemporaryDirectory(prefix="rs_", dir="/tmp") as home:  # Ray's socket paths: short
        monkeypatch.setenv("RAY_TMPDIR", home)
        with pytest.raises(RuntimeError, match="the run failed"):
            with ray_session(run_args(num_actors=1), 80 * 2**20, 1):
                assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 1
                (folder,) = glob.glob(os.path.join(home, "r2d2_ray_*"))
                raise RuntimeError("the run failed")
        assert not ray.is_initialized() and not os.path.exists(folder)


def test_an_address_nothing_answers_at_is_one_line():
    with pytest.raises(SystemExit, match=r"r2d2_ray.py: error: cannot start or join Ray \(--ray-address "
                                         r"127.0.0.3:1\): nothing answers at 127.0.0.3:1"):
        with ray_session(run_args(ray_address="127.0.0.3:1"), 0, 1):
            raise AssertionError("the block ran")
    assert not ray.is_initialized()


def test_outside_a_ray_actor_nothing_was_restarted_and_each_incarnation_is_new():
    assert restarted() is False
    (node, first), (_, second) = incarnation(), incarnation()
    assert node and first != second
