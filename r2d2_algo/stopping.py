"""Stopping a training run cleanly on Ctrl-C, SIGTERM or SIGHUP: one mechanism for every variant.

- ``StopRequest`` installs handlers for SIGINT, SIGTERM and SIGHUP (a closed terminal, a dropped
  ssh connection) that only record the signal; the
  training loop calls ``check()`` at its own boundaries (once per iteration, and while it
  waits), which raises ``StopRun`` there. An exception raised asynchronously inside library
  code (tensorboard's writer, a queue) could leave it blocked in its clean-up; a recorded one
  cannot.
- ``interruptible(*networks)`` is the one exception, around the forward and backward pass of an
  update: an Atari update on a CPU takes seconds, so inside it the request is checked at every
  module call and every parameter gradient, and ``StopRun`` abandons the update midway. It is
  raised before ``optimizer.step``, so the weights stay as the last finished update left them.
- A second Ctrl-C raises ``KeyboardInterrupt`` at once.
- A hangup whose terminal is gone (``quiet_if_hung_up``): the process's stdout and stderr,
  where they were that terminal, now go to /dev/null, so the stop's last lines (the final
  checkpoint's) do not fail with EIO.

The exit code of a stopped run is ``128 + signal`` (130 for Ctrl-C, 143 for SIGTERM, 129 for
SIGHUP).
"""

from __future__ import annotations

import contextlib
import signal

import torch

from r2d2_algo.processes import quiet_if_hung_up

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
SIGNAL_NAMES = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "SIGTERM",
                signal.SIGHUP: "SIGHUP (the terminal closed or the connection dropped)"}


class StopRun(Exception):
    """Stops a run cleanly: a stop request (``signum`` set), or a failure named in the message.
    ``checkpoint``: a failure after which the run should still write its final checkpoint (as
    a stop request does, when checkpoints are on)."""

    def __init__(self, message: str, signum: int = 0, checkpoint: bool = False):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = bool(signum) or checkpoint

    @property
    def exit_code(self) -> int:
        """128 + the signal for a stop request, else 1."""
        return 128 + self.signum if self.signum else 1


class StopRequest:
    """Records Ctrl-C / SIGTERM / SIGHUP (handlers installed on construction, the previous ones
    restored by ``restore``); ``check`` turns a recorded signal into ``StopRun``."""

    def __init__(self):
        self.signum = 0
        self.previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            quiet_if_hung_up()
        if self.signum == signal.SIGINT and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def check(self) -> None:
        """Raise StopRun if Ctrl-C, SIGTERM or SIGHUP has arrived."""
        if self.signum:
            raise StopRun(SIGNAL_NAMES[self.signum], self.signum)

    @contextlib.contextmanager
    def interruptible(self, *networks: torch.nn.Module):
        """Within the block, check at every module call of ``networks`` and at every gradient of
        their parameters (see the module docstring)."""
        handles = []
        for network in networks:
            handles += [module.register_forward_pre_hook(lambda *_: self.check()) for module in network.modules()]
            handles += [p.register_hook(lambda grad: self.check()) for p in network.parameters() if p.requires_grad]
        try:
            self.check()
            yield
        finally:
            for handle in handles:
                handle.remove()

    def restore(self) -> None:
        """Put back the signal handlers that were there before."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
