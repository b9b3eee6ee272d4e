"""Numpy arrays in POSIX shared memory (/dev/shm): created and unlinked by the learner,
attached by name by the actors.

Every segment is registered with Python's resource tracker by the process that creates it,
so even a learner killed with SIGKILL has its segments unlinked when the tracker notices.
"""

from __future__ import annotations

import os
import secrets
import shutil
from multiprocessing import shared_memory

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


_HAS_TRACK = "track" in shared_memory.SharedMemory.__init__.__code__.co_varnames  # Python >= 3.13


def available_memory_bytes() -> int:
    """Memory a new shared segment can use: the smaller of MemAvailable and free /dev/shm space."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if os.path.isdir("/dev/shm"):
        shm_free = shutil.disk_usage("/dev/shm").free
        available = shm_free if available is None else min(available, shm_free)
    return available if available is not None else 1 << 62
