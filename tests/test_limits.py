"""What a run may use (r2d2_algo/limits.py), read as containers and batch schedulers set it, and
followed by every script (CPU only).

- cgroup parsing against fixture trees of /proc and /sys/fs/cgroup: v2 (Kubernetes, Docker with
  and without a cgroup namespace) and v1 (Slurm, a limit on an ancestor), quotas and limits
  absent, a process outside the mount's subtree;
- the defaults that follow the limits (actors = usable CPUs − 1, the scheduler's slots, ale-py
  threads), in-process with the affinity mask and the quota replaced;
- real processes: an affinity mask set with ``os.sched_setaffinity`` (as taskset), a private
  mount namespace with a 64 MiB tmpfs on /dev/shm (Docker's default; ``unshare``, as root), and a
  real cgroup with a CPU quota and a memory limit where this machine lets the test create one;
- the Dockerfile installs and runs what the README's set-up command does.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tyro

from r2d2_algo import envs, limits
from r2d2_algo.limits import GIB

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def meminfo(root: Path, total=32 * GIB, available=20 * GIB) -> None:
    write(root, "/proc/meminfo", f"MemTotal: {total // 1024} kB\nMemFree: 1 kB\nMemAvailable: {available // 1024} kB\n")


def v2_tree(root: Path, cgroup_path: str, mount_root: str = "/") -> None:
    write(root, "/proc/self/cgroup", f"0::{cgroup_path}\n")
    write(root, "/proc/self/mountinfo",
          "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
          f"30 22 0:26 {mount_root} /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n")
    meminfo(root)


@pytest.fixture
def mask_of(monkeypatch):
    """Replace the affinity mask and the host's core count."""
    def set_mask(cores: int, host: int = 64):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(os, "cpu_count", lambda: host)
    return set_mask


def test_cgroup_v2_quota_and_limit_of_a_kubernetes_pod(tmp_path, mask_of):
    """The container's cpu.max (2.5 CPUs) is below its mask (8); the pod's memory.max (an
    ancestor: 4 GiB, 1 GiB used of which 256 MiB inactive page cache) leaves less than the
    container's own (none) and than MemAvailable (20 GiB)."""
    pod, ctr = "/sys/fs/cgroup/kubepods/pod1", "/sys/fs/cgroup/kubepods/pod1/ctr"
    v2_tree(tmp_path, "/kubepods/pod1/ctr")
    write(tmp_path, f"{ctr}/cpu.max", "250000 100000\n")
    write(tmp_path, f"{pod}/cpu.max", "max 100000\n")
    write(tmp_path, f"{ctr}/memory.max", "max\n")
    write(tmp_path, f"{pod}/memory.max", f"{4 * GIB}\n")
    write(tmp_path, f"{pod}/memory.current", f"{GIB}\n")
    write(tmp_path, f"{pod}/memory.stat", f"anon 1000\nfile 5000\ninactive_file {256 * MIB}\nactive_file 12\n")
    mask_of(8)
    root = str(tmp_path)
    assert [f for _, f in limits.cgroup_folders("cpu", root)] == [root + ctr, root + pod, root + "/sys/fs/cgroup/kubepods",
                                                                  root + "/sys/fs/cgroup"]
    assert limits.cgroup_cpu_quota(root) == (2.5, "cgroup v2 cpu.max")
    assert limits.usable_cpus(root) == (2, "cgroup CPU quota: 2.5 CPUs (cgroup v2 cpu.max), affinity mask: 8 of 64 cores")
    assert limits.cgroup_memory(root) == (4 * GIB, GIB - 256 * MIB, "cgroup v2 memory.max")
    available, where = limits.available_memory(root)
    assert available == 4 * GIB - 768 * MIB
    assert where == "cgroup memory limit 4.00 GiB less 0.75 GiB in use (cgroup v2 memory.max)"


@pytest.mark.parametrize("cgroup_path, mount_root", [("/", "/"),  # a cgroup namespace (Docker's default on v2)
                                                     ("/docker/abc", "/docker/abc")])  # none: the mount's root
def test_cgroup_v2_inside_a_docker_container(tmp_path, mask_of, cgroup_path, mount_root):
    """docker run --cpus 3 --memory 6g: the container's cgroup is the mount itself."""
    v2_tree(tmp_path, cgroup_path, mount_root)
    write(tmp_path, "/sys/fs/cgroup/cpu.max", "300000 100000\n")
    write(tmp_path, "/sys/fs/cgroup/memory.max", f"{6 * GIB}\n")
    write(tmp_path, "/sys/fs/cgroup/memory.current", f"{GIB}\n")
    mask_of(64)
    assert limits.cgroup_folders("memory", str(tmp_path)) == [(2, str(tmp_path) + "/sys/fs/cgroup")]
    assert limits.usable_cpus(str(tmp_path))[0] == 3
    assert limits.available_memory(str(tmp_path))[0] == 5 * GIB


def test_cgroup_v1_limits_set_on_a_slurm_job_above_the_step(tmp_path, mask_of):
    """Slurm (cgroup v1, no namespace): the limits are on the job, the process is in its step."""
    job = "/slurm/uid_1000/job_5"
    write(tmp_path, "/proc/self/cgroup", f"5:memory:{job}/step_0\n4:cpu,cpuacct:{job}/step_0\n3:cpuset:{job}/step_0\n"
                                         "1:name=systemd:/user.slice\n0::/user.slice\n")
    write(tmp_path, "/proc/self/mountinfo",
          "25 22 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755\n"
          "26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
          "30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory\n"
          "31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu,cpuacct\n")
    meminfo(tmp_path, total=256 * GIB, available=200 * GIB)
    mem, cpu = "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu,cpuacct"
    write(tmp_path, f"{mem}{job}/step_0/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(tmp_path, f"{mem}{job}/step_0/memory.usage_in_bytes", f"{GIB}\n")
    write(tmp_path, f"{mem}{job}/memory.limit_in_bytes", f"{8 * GIB}\n")
    write(tmp_path, f"{mem}{job}/memory.usage_in_bytes", f"{3 * GIB}\n")
    write(tmp_path, f"{mem}{job}/memory.stat", f"inactive_file {GIB // 2}\ntotal_inactive_file {GIB}\n")
    write(tmp_path, f"{cpu}{job}/step_0/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, f"{cpu}{job}/step_0/cpu.cfs_period_us", "100000\n")
    write(tmp_path, f"{cpu}{job}/cpu.cfs_quota_us", "400000\n")
    write(tmp_path, f"{cpu}{job}/cpu.cfs_period_us", "100000\n")
    mask_of(16, host=128)
    root = str(tmp_path)
    assert limits.cgroup_cpu_quota(root) == (4.0, "cgroup v1 cpu.cfs_quota_us")
    assert limits.usable_cpus(root)[0] == 4
    assert limits.cgroup_memory(root) == (8 * GIB, 2 * GIB, "cgroup v1 memory.limit_in_bytes")
    assert limits.available_memory(root)[0] == 6 * GIB


def test_no_quota_and_no_limit_leave_the_mask_and_memavailable(tmp_path, mask_of):
    write(tmp_path, "/proc/self/cgroup", "4:memory:/\n2:cpu,cpuacct:/\n0::/\n")
    write(tmp_path, "/proc/self/mountinfo",
          "30 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
          "31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
          "32 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    meminfo(tmp_path, total=32 * GIB, available=20 * GIB)
    write(tmp_path, "/sys/fs/cgroup/memory/memory.limit_in_bytes", f"{64 * GIB}\n")  # above the machine: none
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    write(tmp_path, "/sys/fs/cgroup/unified/cpu.max", "max 100000\n")
    mask_of(6, host=8)
    assert limits.cgroup_cpu_quota(str(tmp_path)) is None and limits.cgroup_memory(str(tmp_path)) is None
    assert limits.usable_cpus(str(tmp_path)) == (6, "affinity mask: 6 of 8 cores")
    assert limits.available_memory(str(tmp_path)) == (20 * GIB, "MemAvailable of /proc/meminfo")
    # a quota above the mask leaves the mask; unreadable /proc leaves no limit at all
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "1000000\n")
    assert limits.usable_cpus(str(tmp_path))[0] == 6
    assert limits.cgroup_folders("cpu", str(tmp_path / "nothing")) == []


def test_a_quota_below_one_cpu_is_one_cpu(tmp_path, mask_of):
    v2_tree(tmp_path, "/")
    write(tmp_path, "/sys/fs/cgroup/cpu.max", "50000 100000\n")
    mask_of(4)
    assert limits.usable_cpus(str(tmp_path))[0] == 1


def test_defaults_follow_the_usable_cpus(monkeypatch, mask_of):
    """actors = usable CPUs − 1 in both multi-process scripts, the scheduler's slots and the
    bench's processes, ale-py threads shared among the actors: from the mask (4 of 64 cores), then
    from a quota (2.5 CPUs). Computed when the arguments are parsed, not when the module was
    imported (the old defaults counted os.cpu_count() at import)."""
    sys.path.insert(0, str(ROOT))
    try:
        import scheduler
    finally:
        sys.path.remove(str(ROOT))
    from r2d2_algo import r2d2_mp, r2d2_ray
    mask_of(4)
    monkeypatch.setattr(limits, "cgroup_cpu_quota", lambda root="": None)
    assert tyro.cli(r2d2_mp.Args, args=[]).num_actors == 3
    assert tyro.cli(r2d2_ray.Args, args=[]).num_actors == 3
    assert tyro.cli(scheduler.Args, args=[]).max_parallel == 4
    assert envs.default_env_threads(3) == 1 and envs.default_env_threads(1) == 4
    monkeypatch.setattr(limits, "cgroup_cpu_quota", lambda root="": (2.5, "cgroup v2 cpu.max"))
    assert tyro.cli(r2d2_mp.Args, args=[]).num_actors == 1
    assert envs.default_env_threads(1) == 2


def test_memory_and_shared_memory_messages_say_what_they_count():
    small = limits.Limits(4, "affinity mask: 4 of 4 cores", 3 * GIB, "cgroup memory limit 4.00 GiB less 1.00 GiB "
                          "in use (cgroup v2 memory.max)", 64 * MIB, "free in /dev/shm, a tmpfs of 64.0 MiB")
    with pytest.raises(ValueError) as e:
        limits.check_shared_memory(int(6.69 * GIB), "the replay", "or lower --buffer-size", small)
    assert str(e.value) == ("the replay needs 6.69 GiB of shared memory, but /dev/shm has 64.0 MiB free (a tmpfs of "
                            "64.0 MiB): in Docker, run with --shm-size=8g (or --ipc=host); or lower --buffer-size")
    with pytest.raises(ValueError) as e:
        limits.check_memory({"replay": 2 * GIB, "batches": GIB + GIB // 2, "unused": 0}, small, "lower --buffer-size")
    assert str(e.value) == ("the run needs at least 3.50 GiB of memory (replay 2.00 GiB, batches 1.50 GiB), but "
                            "3.00 GiB is available (cgroup memory limit 4.00 GiB less 1.00 GiB in use (cgroup v2 "
                            "memory.max)); lower --buffer-size")
    limits.check_memory({"replay": 2 * GIB}, small, "")  # fits: nothing said
    limits.check_shared_memory(32 * MIB, "x", "", small)
    assert limits.size(12 * 1024) == "12 KiB"


def run(argv, cwd, preexec_fn=None, timeout=120, prefix=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([*prefix, sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, preexec_fn=preexec_fn)


def test_an_affinity_mask_of_one_core_sets_the_run_line(tmp_path):
    """As `taskset -c 0 python r2d2_algo/r2d2_mp.py`: the run line says 1 usable CPU, from the
    mask, and the learner's torch threads (1) are set from it."""
    proc = run([str(ROOT / "r2d2_algo" / "r2d2_mp.py"), "--env-id", "CartPole-v1", "--total-timesteps", "600",
                "--learning-starts", "300", "--eval-episodes", "0", "--no-progress-bar"], tmp_path,
               preexec_fn=lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("run "))
    assert f"1 usable CPU (affinity mask: 1 of {os.cpu_count()} cores): actors = CPUs - 1, learner 1 torch thread" in line
    assert "1 actor ×" in line


def private_shm_prefix(size: str) -> tuple[str, ...]:
    """A command prefix that runs the command in a private mount namespace whose /dev/shm is a tmpfs
    of ``size`` (as Docker's default of 64 MiB), or pytest.skip where that is not permitted."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here (unshare -m: {probe.stderr.strip()[:120]})")
    return ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh")


def test_docker_default_shm_of_64_mib(tmp_path):
    """Docker's 64 MiB /dev/shm: r2d2_mp.py's default replay (6.7 GiB in /dev/shm) is refused
    before anything starts, in one line naming the need, the free space and the fixes; r2d2_ray.py
    names its object store and --ray-plasma-directory.
    The old check took the smaller of MemAvailable and /dev/shm as "memory" and blamed the networks."""
    prefix = private_shm_prefix("64m")
    for script, words in [("r2d2_mp.py", ["the replay (1,000,000 observations) with the weights needs 6.6",
                                          "GiB of shared memory, but /dev/shm has 64.0 MiB free",
                                          "--shm-size=8g", "--ipc=host", "lower --buffer-size (about "]),
                          ("r2d2_ray.py", ["Ray's object store", "of shared memory, but /dev/shm has 64.0 MiB free",
                                           "--shm-size=", "--ray-plasma-directory /tmp"])]:
        proc = run([str(ROOT / "r2d2_algo" / script)], tmp_path, prefix=prefix)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[-1].startswith(f"{script}: error: "), lines[-1]
        assert all(word in lines[-1] for word in words), lines[-1]
        assert not (tmp_path / "runs").exists()


def make_cgroup(tmp_name: str, cpu_quota: float, memory_limit: int):
    """A real child cgroup with a CPU quota and a memory limit (v1 or v2), or pytest.skip where this
    machine does not let the test make one. Returns (the folders, a preexec_fn that moves the child there)."""
    folders = []
    try:
        v1_cpu, v1_mem = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"
        if os.path.isfile(f"{v1_cpu}/cpu.cfs_quota_us") and os.path.isfile(f"{v1_mem}/memory.limit_in_bytes"):
            for base in (v1_cpu, v1_mem):
                os.mkdir(f"{base}/{tmp_name}")
                folders.append(f"{base}/{tmp_name}")
            Path(f"{v1_cpu}/{tmp_name}/cpu.cfs_quota_us").write_text(str(int(cpu_quota * 100000)))
            Path(f"{v1_cpu}/{tmp_name}/cpu.cfs_period_us").write_text("100000")
            Path(f"{v1_mem}/{tmp_name}/memory.limit_in_bytes").write_text(str(memory_limit))
        elif os.path.isfile("/sys/fs/cgroup/cgroup.controllers") and open("/proc/self/cgroup").read().strip() == "0::/":
            Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+cpu +memory")
            os.mkdir(f"/sys/fs/cgroup/{tmp_name}")
            folders.append(f"/sys/fs/cgroup/{tmp_name}")
            Path(f"/sys/fs/cgroup/{tmp_name}/cpu.max").write_text(f"{int(cpu_quota * 100000)} 100000")
            Path(f"/sys/fs/cgroup/{tmp_name}/memory.max").write_text(str(memory_limit))
        else:
            pytest.skip("no writable cgroup v1 cpu+memory hierarchy or v2 root cgroup here")
    except OSError as e:
        for folder in reversed(folders):
            os.rmdir(folder)
        pytest.skip(f"cannot make a cgroup here: {e}")

    def enter():
        for folder in folders:
            with open(f"{folder}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
    return folders, enter


def test_a_real_cgroup_quota_and_memory_limit(tmp_path):
    """A CPU quota of 1.5 CPUs and a 2 GiB memory limit, as `docker run --cpus 1.5 --memory 2g`:
    read as 1 CPU and ~2 GiB, and r2d2_mp.py's default run (a 6.7 GiB replay) is refused against
    the cgroup's limit, not MemAvailable, before anything starts."""
    folders, enter = make_cgroup(f"r2d2_test_{os.getpid()}", 1.5, 2 * GIB)
    try:
        proc = run(["-c", "from r2d2_algo.limits import read_limits; l = read_limits(); print(l.cpus, l.memory_bytes);"
                    "print(l.cpus_from); print(l.memory_from)"], tmp_path, preexec_fn=enter)
        cpus, memory = map(int, proc.stdout.split("\n")[0].split())
        assert cpus == 1 and 1.5 * GIB < memory <= 2 * GIB, proc.stdout + proc.stderr
        assert proc.stdout.split("\n")[1].startswith("cgroup CPU quota: 1.5 CPUs (cgroup v")
        assert proc.stdout.split("\n")[2].startswith("cgroup memory limit 2.00 GiB less ")
        proc = run([str(ROOT / "r2d2_algo" / "r2d2_mp.py")], tmp_path, preexec_fn=enter)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith("r2d2_mp.py: error: the run needs at least "), proc.stderr[-2000:]
        assert "replay in /dev/shm 6.6" in last and "is available (cgroup memory limit 2.00 GiB less" in last, last
        assert not (tmp_path / "runs").exists()
    finally:
        for folder in reversed(folders):
            for _ in range(50):  # the children have left once they exited; the kernel may lag a moment
                try:
                    os.rmdir(folder)
                    break
                except OSError:
                    import time
                    time.sleep(0.1)


def test_the_dockerfile_runs_the_readme_set_up_command():
    """The Dockerfile (which cannot be built here: no registry) installs with the README's install
    command and runs the README's main-job command, from the repository root."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", readme, re.S).group(1)
    first = block.splitlines()[0].split("#")[0].strip()
    install, main_job = (part.strip() for part in first.split("&&"))
    assert install == "pip install -r requirements.txt" and main_job == "python r2d2_algo/r2d2_mp.py"
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    instructions = [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]
    assert ("RUN", install) in instructions
    cmd = [value for name, value in instructions if name == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == main_job.split()
    assert ("COPY", ". .") in instructions and ("WORKDIR", "/r2d2") in instructions
    assert [name for name, _ in instructions].index("RUN") > [name for name, _ in instructions].index("COPY")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs", "saved_models", "saved_checkpoints", ".git"} <= set(ignored)
