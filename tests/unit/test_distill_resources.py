"""The memory a run may use as the kernel enforces it (models/students/distill/resources.py): the process's cgroup
limit found through /proc/self/cgroup and /proc/self/mountinfo, v1 and v2, every level of the hierarchy, on fake
machines laid out under tmp_path; and the engine's memory check seeing that limit and the processes that share
the machine's RAM."""

from __future__ import annotations

from distilled_unets.models.students.distill import resources as R

GIB = 1 << 30


def machine(root, *, cgroup: str, mountinfo: str, files: dict[str, str]):
    """A fake machine: proc/self/{cgroup,mountinfo} and cgroup files, all under ``root``."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo)
    for path, text in files.items():
        f = root / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(root)


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
             "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
             "36 31 0:33 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n")


def test_v2_a_container_limit_with_its_working_set(tmp_path):
    root = machine(tmp_path, cgroup="0::/docker/abc\n", mountinfo=V2_MOUNT, files={
        "/sys/fs/cgroup/docker/abc/memory.max": str(8 * GIB),
        "/sys/fs/cgroup/docker/abc/memory.current": str(3 * GIB),
        "/sys/fs/cgroup/docker/abc/memory.stat": f"anon {2 * GIB}\ninactive_file {GIB}\nactive_file 5\n",
        "/sys/fs/cgroup/docker/memory.max": "max", "/sys/fs/cgroup/memory.max": "max"})
    cg = R.cgroup_memory(root)
    assert (cg.version, cg.limit, cg.usage, cg.available) == (2, 8 * GIB, 2 * GIB, 6 * GIB)
    assert cg.directory.endswith("sys/fs/cgroup/docker/abc")
    assert "cgroup v2 limit (memory.max 8.00 GiB" in cg.describe() and "2.00 GiB in use" in cg.describe()


def test_v2_the_tightest_level_of_the_hierarchy_counts(tmp_path):
    # a Slurm job: the job's level carries the limit, the task's own level none
    root = machine(tmp_path, cgroup="0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n",
                   mountinfo=V2_MOUNT, files={
                       "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/memory.max": str(4 * GIB),
                       "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/memory.current": str(GIB),
                       "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/step_0/user/task_0/memory.max": "max",
                       "/sys/fs/cgroup/system.slice/memory.max": str(64 * GIB),
                       "/sys/fs/cgroup/system.slice/memory.current": str(10 * GIB)})
    cg = R.cgroup_memory(root)
    assert (cg.limit, cg.available) == (4 * GIB, 3 * GIB) and cg.directory.endswith("job_7")


def test_v2_a_namespaced_view_maps_through_the_mounts_root(tmp_path):
    # inside a container without a cgroup namespace: the mount's root is the container's own cgroup
    mount = "40 30 0:26 /kubepods/pod1/ctr /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"
    root = machine(tmp_path, cgroup="0::/kubepods/pod1/ctr\n", mountinfo=mount, files={
        "/sys/fs/cgroup/memory.max": str(2 * GIB), "/sys/fs/cgroup/memory.current": str(GIB // 2)})
    cg = R.cgroup_memory(root)
    assert cg.limit == 2 * GIB and cg.available == 2 * GIB - GIB // 2


def test_v1_memory_controller_and_no_limit(tmp_path):
    root = machine(tmp_path, cgroup="5:cpu,cpuacct:/\n4:memory:/process_api/x\n0::/\n", mountinfo=V1_MOUNTS, files={
        "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes": str(6 * GIB),
        "/sys/fs/cgroup/memory/process_api/x/memory.usage_in_bytes": str(5 * GIB),
        "/sys/fs/cgroup/memory/process_api/x/memory.stat": f"cache 7\ntotal_inactive_file {2 * GIB}\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712"})  # v1's "no limit"
    cg = R.cgroup_memory(root)
    assert (cg.version, cg.limit, cg.usage, cg.available) == (1, 6 * GIB, 3 * GIB, 3 * GIB)
    assert "memory.limit_in_bytes 6.00 GiB" in cg.describe()
    no_limit = machine(tmp_path / "free", cgroup="4:memory:/\n", mountinfo=V1_MOUNTS, files={
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712"})
    assert R.cgroup_memory(no_limit) is None
    assert R.cgroup_memory(str(tmp_path / "nothing")) is None  # no /proc at all (not Linux)


def test_ram_available_is_the_lower_of_the_host_and_the_container(tmp_path, monkeypatch):
    root = machine(tmp_path, cgroup="0::/c\n", mountinfo=V2_MOUNT, files={
        "/sys/fs/cgroup/c/memory.max": str(GIB), "/sys/fs/cgroup/c/memory.current": str(GIB // 4)})
    monkeypatch.setattr(R, "host_available", lambda: 100 * GIB)
    free, where = R.ram_available(root)
    assert free == GIB - GIB // 4 and "cgroup v2 limit" in where
    monkeypatch.setattr(R, "host_available", lambda: GIB // 8)
    assert R.ram_available(root)[0] == GIB // 8
    free, where = R.free_memory("cpu", host_free=GIB // 16, root=root)  # ComfyUI's own figure, when lower
    assert free == GIB // 16 and "as the host counts it" in where


def test_local_processes_from_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert R.local_processes() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert R.local_processes() == 1


def test_this_machine_reads_without_error():
    """Whatever this machine is, the reading is a limit or None, and the free figure is positive."""
    cg = R.cgroup_memory()
    assert cg is None or (cg.limit > 0 and cg.usage >= 0)
    free, where = R.ram_available()
    assert free > 0 and where
