"""Where a run computes, and in which precision (README, "On a GPU machine").

- ``set_float32_precision(tf32)``: float32 matrix products, convolutions and cuDNN LSTM/GRU on
  CUDA in TF32 (a 10-bit mantissa; Ampere and later) or in IEEE float32. PyTorch's own default
  differs per kind (cuDNN convolutions and RNNs TF32, matrix products IEEE), and
  ``--torch-deterministic`` does not touch it; every training script calls this once per
  process that computes on the learner's device, with its ``--tf32`` flag (default off, so that
  float32 is float32 on every device).
- ``precision_summary(device, amp, tf32)``: the run line's words for the above.
- ``compute_dtypes(network)``: the dtype each part of an ``RNNQNetwork`` (torso, core, head)
  actually computed in during a block, read from forward hooks; what tests and
  ``benchmarks/gpu_check.py`` check ``--amp`` with.

Under ``--amp`` the learner's torso and dueling head run in bfloat16 autocast while the
recurrent core runs in float32 (``RNNQNetwork.forward``), on the CPU and on CUDA alike; targets,
loss and priorities are float32. Actors, central inference and evaluation run in float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# the fp32_precision switches (torch >= 2.9) of float32 work on CUDA; the legacy allow_tf32 flags
# must not be mixed with them (torch raises when both were used)
_PRECISION_SWITCHES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn")


def _switch(path: str):
    module = torch.backends
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def set_float32_precision(tf32: bool) -> None:
    """Run float32 matrix products, convolutions and cuDNN RNNs on CUDA in TF32 (``tf32``) or in
    IEEE float32, in this process. No effect on CPU computations; torch < 2.9 (without the
    ``fp32_precision`` switches) uses the legacy ``allow_tf32`` flags."""
    value = "tf32" if tf32 else "ieee"
    switches = [_switch(path) for path in _PRECISION_SWITCHES]
    if all(s is not None and hasattr(s, "fp32_precision") for s in switches):
        for s in switches:
            s.fp32_precision = value
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def float32_precision() -> dict[str, str]:
    """The current setting of each switch ('tf32', 'ieee', or torch's 'none': inherited)."""
    out = {}
    for path in _PRECISION_SWITCHES:
        s = _switch(path)
        out[path] = getattr(s, "fp32_precision", "unknown") if s is not None else "unknown"
    return out


def precision_summary(device: torch.device, amp: bool, tf32: bool) -> str:
    """What the learner on ``device`` computes in, for the run line, e.g. 'float32' or
    'bfloat16 torso and head, float32 core (--amp); float32 as TF32 (--tf32)'."""
    words = "bfloat16 torso and head, float32 core (--amp)" if amp else "float32"
    if device.type == "cuda":
        words += "; float32 as TF32 (--tf32)" if tf32 else "; TF32 off"
    return words


PARTS = ("torso", "core", "head")


@contextlib.contextmanager
def compute_dtypes(network: nn.Module):
    """Record, within the block, the dtype of every output of the torso, the core and the dueling
    head of ``network`` (an RNNQNetwork: ``torso``, ``core``, ``value`` and ``advantage``) and of
    each of their layers: the precision the part computed in, autocast included.

    Yields a dict {part: sorted list of dtype names}, filled as the network runs, e.g.
    {'torso': ['bfloat16'], 'core': ['float32'], 'head': ['bfloat16']} under --amp.
    """
    seen: dict[str, set[str]] = {part: set() for part in PARTS}
    result: dict[str, list[str]] = {part: [] for part in PARTS}
    handles = []

    def hook_for(part: str):
        def hook(module, inputs, output):
            pending = [output]
            while pending:  # tensors, and tuples of them (an LSTM's (out, (h, c)))
                out = pending.pop()
                if isinstance(out, tuple | list):
                    pending.extend(out)
                elif isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() > 0:
                    seen[part].add(str(out.dtype).removeprefix("torch."))
            result[part] = sorted(seen[part])
        return hook

    modules = {"torso": [network.torso], "core": [network.core], "head": [network.value, network.advantage]}
    try:
        for part, roots in modules.items():
            for root in roots:
                for module in root.modules():
                    if module is root or any(True for _ in module.parameters(recurse=False)):
                        handles.append(module.register_forward_hook(hook_for(part)))
        yield result
    finally:
        for handle in handles:
            handle.remove()
