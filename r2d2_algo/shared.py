"""Numpy arrays in POSIX shared memory (/dev/shm): created and unlinked by the learner,
attached by name by the actors.

Every segment (and every semaphore of multiprocessing's locks and queues) is registered with
Python's resource tracker, a process of its own, so even a learner killed with SIGKILL (the OOM
killer) has them unlinked once its children have exited. ``start_resource_tracker`` starts that
tracker so that it survives a stop signal sent to the whole process group (a closed terminal's
SIGHUP) and cleans up silently.
"""

from __future__ import annotations

import os
import secrets
import signal
from multiprocessing import resource_tracker, shared_memory

import numpy as np


class SharedArrays:
    """A named set of shared numpy arrays.

    ``allocate`` (creator side) and ``get`` (attached side) both have the signature
    ``(name, shape, dtype) -> ndarray`` that SequenceReplayBuffer takes as ``allocate``.
    ``layout`` is the picklable description an actor needs to ``attach``.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"r2d2_{os.getpid()}_{secrets.token_hex(4)}"
        self.layout: dict[str, tuple[str, tuple[int, ...], str]] = {}
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._owner = True

    def allocate(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Create a zero-filled shared array (pages are mapped lazily: untouched ones cost no RAM)."""
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        shm = shared_memory.SharedMemory(name=f"{self.prefix}_{name}", create=True, size=nbytes)
        self._segments[name] = shm
        self.layout[name] = (shm.name, tuple(shape), dtype.str)
        self._arrays[name] = np.ndarray(shape, dtype=dtype, buffer=shm.buf)
        return self._arrays[name]

    @classmethod
    def attach(cls, layout: dict[str, tuple[str, tuple[int, ...], str]]) -> "SharedArrays":
        """Map the segments of another process's SharedArrays (does not own them)."""
        self = cls.__new__(cls)
        self.prefix, self.layout, self._owner = None, dict(layout), False
        self._segments, self._arrays = {}, {}
        for name, (segment, shape, dtype) in layout.items():
            shm = shared_memory.SharedMemory(name=segment, track=False) if _HAS_TRACK else shared_memory.SharedMemory(name=segment)
            self._segments[name] = shm
            self._arrays[name] = np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf)
        return self

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The attached array ``name``; ValueError if its shape or dtype differ."""
        array = self._arrays[name]
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise ValueError(f"shared array {name!r} is {array.shape} {array.dtype}, expected {tuple(shape)} {dtype}")
        return array

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def close(self) -> None:
        """Unmap this process's views (arrays still referenced elsewhere stay mapped until exit)."""
        self._arrays.clear()
        for shm in self._segments.values():
            try:
                shm.close()
            except BufferError:
                pass  # a numpy view is still alive somewhere; the mapping goes with the process

    def unlink(self) -> None:
        """Remove the segments from /dev/shm (creator only); safe to call twice."""
        if not self._owner:
            return
        for shm in self._segments.values():
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self._owner = False


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, before this process creates shared memory or
    semaphores (it starts on first use otherwise), so that:

    - it ignores SIGHUP (inherited as ignored; it ignores SIGINT and SIGTERM itself): a hangup
      sent to the run's process group leaves it running, for the learner's own clean stop;
    - it does not warn about "leaked shared_memory objects" when it cleans up after a learner
      killed with SIGKILL: in this design that is a killed learner, not a leak, and the tracker's
      cleanup is the run's (its warnings are filtered by module, for the tracker process only).

    A tracker that is running already (a second run in one process, a test) is kept as it is.
    """
    warnings_before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warnings_before,
                                                          "ignore::UserWarning:multiprocessing.resource_tracker"]))
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, hangup)
        if warnings_before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = warnings_before


_HAS_TRACK = "track" in shared_memory.SharedMemory.__init__.__code__.co_varnames  # Python >= 3.13
