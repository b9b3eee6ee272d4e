"""What a run may use of the machine: CPUs, memory and shared memory, read where containers and
batch schedulers set them (Docker, Kubernetes, Slurm), so that the scripts' defaults and checks
follow the limits of the run, not the host's size. One place answers all three (``read_limits``).

- **CPUs**: the affinity mask (``os.sched_getaffinity``: ``taskset``, Docker ``--cpuset-cpus``,
  Slurm's ``--cpus-per-task`` through its cpuset) and the CFS quota of the process's cgroup
  (v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: Docker ``--cpus``, Kubernetes
  CPU limits), the smallest over the cgroup and its ancestors. A quota of 2.5 CPUs is 2 whole
  CPUs (more busy processes than that are throttled by the quota). psutil reads no quota.
- **Memory** a new allocation can take: ``MemAvailable`` of /proc/meminfo, and, under a cgroup
  memory limit (Docker ``--memory``, Kubernetes memory limits, Slurm ``--mem``), the limit less
  what the cgroup uses (v2 ``memory.max`` - ``memory.current``; v1 ``memory.limit_in_bytes`` -
  ``memory.usage_in_bytes``; both less the inactive page cache the kernel reclaims first, as
  ``docker stats`` counts it), the smallest over the cgroup and its ancestors. Shared memory
  (/dev/shm) is charged to the cgroup like any other memory.
- **Shared memory**: the free space of /dev/shm (a tmpfs: Docker gives 64 MiB unless run with
  ``--shm-size`` or ``--ipc=host``), where r2d2_mp.py's replay and Ray's object store live.

Every path is read under ``root`` ("" on a live system; a folder of fixture files in tests).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

GIB = 2**30
PROCESS_BYTES = 200 * 2**20  # private memory of one more process that imports torch (measured: 180-290 MiB)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the run may use. ``cpus``: whole CPUs (>= 1); ``memory_bytes``: bytes a new
    allocation can take; ``shm_bytes``: free bytes in /dev/shm (None where there is none); each
    ``*_from``: where the figure comes from, in words, for the run line and error messages."""
    cpus: int
    cpus_from: str
    memory_bytes: int
    memory_from: str
    shm_bytes: int | None
    shm_from: str

    def cpus_phrase(self) -> str:
        """The run line's words: "2 usable CPUs (affinity mask: 2 of 2 cores)"."""
        return f"{self.cpus} usable CPU{'s' if self.cpus != 1 else ''} ({self.cpus_from})"


def read_limits(root: str = "") -> Limits:
    """The CPUs, memory and /dev/shm space this process may use (see the module docstring)."""
    cpus, cpus_from = usable_cpus(root)
    memory, memory_from = available_memory(root)
    shm, shm_from = shm_free(root)
    return Limits(cpus, cpus_from, memory, memory_from, shm, shm_from)


def usable_cpus(root: str = "") -> tuple[int, str]:
    """(whole CPUs this process may keep busy, where that comes from): the affinity mask, lowered
    to the floor of the cgroup CPU quota where one is set (at least 1)."""
    host = os.cpu_count() or 1
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else host
    cpus, where = mask, f"affinity mask: {mask} of {host} cores"
    quota = cgroup_cpu_quota(root)
    if quota is not None and math.floor(quota[0]) < mask:
        cpus, where = max(1, math.floor(quota[0])), f"cgroup CPU quota: {quota[0]:g} CPUs ({quota[1]}), {where}"
    return cpus, where


def available_memory(root: str = "") -> tuple[int, str]:
    """(bytes a new allocation of this process can take, where that comes from): MemAvailable,
    or a cgroup memory limit less its use where that leaves less."""
    available = _meminfo(root, "MemAvailable")
    where = "MemAvailable of /proc/meminfo" if available is not None else "no /proc/meminfo: unknown, not checked"
    limit = cgroup_memory(root)
    if limit is not None and (available is None or limit[0] - limit[1] < available):
        available = max(0, limit[0] - limit[1])
        where = f"cgroup memory limit {limit[0] / GIB:.2f} GiB less {limit[1] / GIB:.2f} GiB in use ({limit[2]})"
    return (available if available is not None else 1 << 62), where


def shm_free(root: str = "") -> tuple[int | None, str]:
    """(free bytes in /dev/shm, where that comes from); (None, ...) where there is no /dev/shm."""
    try:
        stat = os.statvfs(root + "/dev/shm")
    except OSError:
        return None, "no /dev/shm"
    return stat.f_bavail * stat.f_frsize, f"free in /dev/shm, a tmpfs of {size(stat.f_blocks * stat.f_frsize)}"


def size(nbytes: float) -> str:
    """Bytes in words: "6.67 GiB", "64.0 MiB", "12 KiB"."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:,.2f} GiB"
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def batch_bytes(batch_size: int, window_length: int, obs_shape: tuple, obs_dtype) -> int:
    """Bytes of one learner batch of ``batch_size`` windows of ``window_length`` steps: the
    observations as sampled (``obs_dtype``, frames stacked) and their float32 copy in the update."""
    return batch_size * window_length * int(np.prod(obs_shape)) * (np.dtype(obs_dtype).itemsize + 4)


def check_shared_memory(need: int, what: str, fixes: str, limits: Limits) -> None:
    """Refuse, with one ValueError line naming the need, the free /dev/shm space and the fixes,
    ``need`` bytes of shared memory (``what`` names them) that /dev/shm cannot hold. ``fixes``
    ends the line after Docker's own (``--shm-size``, ``--ipc=host``)."""
    if limits.shm_bytes is not None and need > limits.shm_bytes:
        raise ValueError(f"{what} needs {size(need)} of shared memory, but /dev/shm has {size(limits.shm_bytes)} "
                         f"free ({limits.shm_from.split(', ', 1)[-1]}): in Docker, run with "
                         f"--shm-size={math.ceil(1.1 * need / GIB)}g (or --ipc=host); {fixes}")


def check_memory(parts: dict[str, int], limits: Limits, fixes: str) -> None:
    """Refuse, with one ValueError line giving the total and each part, a run whose memory
    (``parts``: name -> bytes, a lower bound of what it will allocate from now on) exceeds what
    is available (MemAvailable, or a cgroup limit less its use, as ``limits.memory_from`` says)."""
    need = sum(parts.values())
    if need > limits.memory_bytes:
        raise ValueError(f"the run needs at least {size(need)} of memory ("
                         + ", ".join(f"{name} {size(n)}" for name, n in parts.items() if n)
                         + f"), but {size(limits.memory_bytes)} is available ({limits.memory_from}); {fixes}")


# ------------------------------------------------------------------------------------ cgroups


def cgroup_folders(controller: str, root: str = "") -> list[tuple[int, str]]:
    """(version, folder) of this process's cgroup for ``controller`` ("cpu" or "memory") and of
    each ancestor up to the hierarchy's mount, innermost first, in every hierarchy that can hold
    it: a v1 hierarchy with the controller, and the v2 one (on a hybrid system the v2 hierarchy
    holds no controller files, which is harmless: they are just absent). Read from
    /proc/self/cgroup (the process's path in each hierarchy) and /proc/self/mountinfo (where each
    is mounted, and the path of its mount's root: inside a container without a cgroup namespace
    the process's path starts with the container's own cgroup, which is the mount's root)."""
    try:
        with open(root + "/proc/self/cgroup") as f:
            membership = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
        with open(root + "/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return []
    folders = []
    for fields in mounts:
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 3:
            continue
        mount_root, mount_point, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2":
            version, paths = 2, [path for hier, names, path in membership if hier == "0" and names == ""]
        elif fstype == "cgroup" and controller in options.split(","):
            version = 1
            paths = [path for hier, names, path in membership if controller in names.split(",")]
        else:
            continue
        if not paths:
            continue
        path = paths[0]
        if mount_root != "/" and (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
            path = path[len(mount_root):]
        elif mount_root != "/":  # the process is outside this mount's subtree: the mount is its cgroup
            path = "/"
        base = root + mount_point.replace("\\040", " ")
        folder = os.path.normpath(base + "/" + path.strip("/")) if path.strip("/") else base
        if not os.path.isdir(folder):  # a path from another cgroup namespace: the mount is the process's cgroup
            folder = base
        while True:
            folders.append((version, folder))
            if os.path.normpath(folder) == os.path.normpath(base):
                break
            folder = os.path.dirname(folder)
    return folders


def _read(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: str = "") -> tuple[float, str] | None:
    """(CPUs the cgroup quota allows, the file that sets it), the smallest over the process's
    cgroup and its ancestors; None when no quota is set. v2 ``cpu.max`` is "QUOTA PERIOD" or
    "max PERIOD"; v1 ``cpu.cfs_quota_us`` is -1 when unlimited."""
    best = None
    for version, folder in cgroup_folders("cpu", root):
        if version == 2:
            text = _read(folder, "cpu.max")
            if not text or text.split()[0] == "max":
                continue
            parts = text.split()
            quota, period, name = parts[0], (parts[1] if len(parts) > 1 else "100000"), "cpu.max"
        else:
            quota, period, name = _read(folder, "cpu.cfs_quota_us"), _read(folder, "cpu.cfs_period_us"), \
                "cpu.cfs_quota_us"
        try:
            cpus = int(quota) / int(period)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if cpus > 0 and (best is None or cpus < best[0]):
            best = (cpus, f"cgroup v{version} {name}")
    return best


def cgroup_memory(root: str = "") -> tuple[int, int, str] | None:
    """(limit bytes, bytes in use, the file that sets the limit) of the cgroup level whose limit
    leaves the least (its own cgroup or an ancestor); None when no limit is set. In use: v2
    ``memory.current``, v1 ``memory.usage_in_bytes``, less the inactive page cache of
    ``memory.stat`` (v2 ``inactive_file``, v1 ``total_inactive_file``). v1 writes no limit as a
    number near 2**63; any limit above the machine's memory is no limit."""
    total = _meminfo(root, "MemTotal")
    best = None
    for version, folder in cgroup_folders("memory", root):
        names = ("memory.max", "memory.current", "inactive_file") if version == 2 else \
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        try:
            limit = int(_read(folder, names[0]) or "max")
        except ValueError:  # "max": no limit
            continue
        if total is not None and limit >= total:
            continue
        try:
            used = int(_read(folder, names[1]) or 0)
        except ValueError:
            used = 0
        for line in (_read(folder, "memory.stat") or "").splitlines():
            key, _, value = line.partition(" ")
            if key == names[2] and value.strip().isdigit():
                used = max(0, used - int(value))
        if best is None or limit - used < best[0] - best[1]:
            best = (limit, used, f"cgroup v{version} {names[0]}")
    return best


def _meminfo(root: str, key: str) -> int | None:
    """Bytes of field ``key`` of /proc/meminfo (e.g. "MemAvailable"); None where it cannot be read."""
    try:
        with open(root + "/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
