"""A stand-in for r2d2.py in scheduler and notebook tests: same run folder and tags, no learning.

Writes runs/{env_id}__{exp_name}__{seed}__{unix_time}/ with charts/episodic_return,
eval/episodic_return and charts/SPS every --log-interval steps (return grows with the step, more
with a longer --sequence-length) and the "hyperparameters" text, sleeping --step-seconds per log.
Imports no torch, so it starts in half a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, fields

import tyro
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter


@dataclass
class Args:
    exp_name: str = "fake_train"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed"""
    env_id: str = "CartPole-v1"
    """environment id (only names the run folder)"""
    total_timesteps: int = 1000
    """steps to log"""
    log_interval: int = 100
    """steps between logs"""
    sequence_length: int = 8
    """scales the fake return"""
    burn_in_length: int = 0
    """adds to the fake return"""
    progress_bar: bool = True
    """unused (r2d2.py has it)"""
    step_seconds: float = 0.0
    """seconds slept per log (a slow run)"""
    exit_code: int = 0
    """exit with this code at the end (a failing run)"""
    fail_seed: int = -1
    """this seed fails with exit code 3 (before writing anything)"""
    num_actors: int | None = None
    """unused (makes the scheduler count num_actors + 1 slots, like r2d2_mp.py)"""


def text_summary(tag: str, text: str) -> Summary:
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary(value=[Summary.Value(tag=f"{tag}/text_summary", metadata=metadata, tensor=tensor)])


def main(args: Args) -> int:
    if args.seed == args.fail_seed:
        print(f"fake_train.py: error: seed {args.seed} fails", file=sys.stderr)
        return 3
    run_name = f"{args.env_id.replace(':', '_').replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = EventFileWriter(f"runs/{run_name}")
    print(f"run {run_name} pid {os.getpid()} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{f.name}|{getattr(args, f.name)}|" for f in fields(args))
    writer.add_event(Event(wall_time=time.time(), step=0, summary=text_summary("hyperparameters", table)))
    with open(f"runs/{run_name}/args.json", "w") as f:  # as the training scripts
        json.dump(vars(args), f)
    start = time.time()
    for step in range(args.log_interval, args.total_timesteps + 1, args.log_interval):
        time.sleep(args.step_seconds)
        value = (step / args.total_timesteps) * (10 * args.sequence_length + args.burn_in_length) + args.seed
        scalars = {"charts/episodic_return": value - 1, "eval/episodic_return": value,
                   "charts/SPS": step / max(time.time() - start, 1e-3)}
        for tag, v in scalars.items():
            writer.add_event(Event(wall_time=time.time(), step=step,
                                   summary=Summary(value=[Summary.Value(tag=tag, simple_value=v)])))
        writer.flush()
    writer.close()
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
