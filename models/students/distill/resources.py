"""What a run may use on this machine, read the way the kernel enforces it: the memory limit of the process's
cgroup (a Docker or Kubernetes container, a Slurm job, a systemd slice), the free memory of the process's own
GPU, and the processes of one run that share this machine's RAM.

``psutil`` (``/proc/meminfo``) reports the host's memory; inside a container the limit that kills the process
is the cgroup's. The cgroup is found as the kernel describes it: the process's own cgroup path in
``/proc/self/cgroup`` (``0::/path`` for v2; ``N:memory:/path`` for v1), the hierarchy's mount point and the
mount's own root in ``/proc/self/mountinfo`` (so a container's namespaced view maps right). Every level from
the process's cgroup up to the mount point can carry a limit: the one that leaves the least counts. Usage is
the working set, as the kernel reclaims before it kills: ``memory.current`` (v2) or ``memory.usage_in_bytes``
(v1) less the inactive file cache (``inactive_file`` / ``total_inactive_file`` of ``memory.stat``).

Every reader takes ``root`` (default :data:`ROOT`, ``/``), the folder under which ``proc/self/...`` and the
cgroup mounts are looked up, so a test can lay out a fake machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1024 ** 3
#: where ``proc/self/...`` and the cgroup mounts are looked up (a test lays out a fake machine there)
ROOT = "/"
#: a v1 limit at or above this is "no limit" (the kernel's PAGE_COUNTER_MAX, rounded to pages)
NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit of the process's cgroup hierarchy."""

    version: int          # 1 or 2
    directory: str        # the cgroup folder whose limit leaves the least
    limit: int            # bytes
    usage: int            # bytes in use (working set: less the inactive file cache)

    @property
    def available(self) -> int:
        return max(0, self.limit - self.usage)

    def describe(self) -> str:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return (f"the process's cgroup v{self.version} limit ({name} {self.limit / GIB:.2f} GiB at "
                f"{self.directory}, {self.usage / GIB:.2f} GiB in use)")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: str) -> int | None:
    raw = _read(path)
    try:
        return int(raw) if raw is not None else None  # "max" (v2: no limit) is not a number
    except ValueError:
        return None


def _stat(path: str, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return 0
    return 0


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _own_cgroups(root: str) -> list[tuple[int, str]]:
    """(version, path inside the hierarchy) of the process's memory cgroups, from /proc/self/cgroup."""
    out = []
    for line in (_read(_under(root, "proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            out.append((2, path))
        elif "memory" in controllers.split(","):
            out.append((1, path))
    return out


def _mounts(root: str) -> list[tuple[int, str, str]]:
    """(version, mount point, the mount's root inside its hierarchy) of the memory cgroup mounts."""
    out = []
    for line in (_read(_under(root, "proc/self/mountinfo")) or "").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 1:
            continue
        mount_root, mount_point = fields[3], fields[4].replace("\\040", " ")
        fstype = tail[0]
        options = tail[2].split(",") if len(tail) > 2 else []
        if fstype == "cgroup2":
            out.append((2, mount_point, mount_root))
        elif fstype == "cgroup" and "memory" in options:
            out.append((1, mount_point, mount_root))
    return out


def _lineage(mount_point: str, mount_root: str, path: str) -> list[str]:
    """The cgroup folders from the process's own up to the mount point, under the mount point."""
    rel = path
    if mount_root not in ("", "/"):
        if path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
            rel = path[len(mount_root.rstrip("/")):]
        else:  # the path is outside what this mount shows (another namespace's view): only the mount's top
            rel = "/"
    parts = [p for p in rel.split("/") if p and p not in (".", "..")]
    dirs = [mount_point]
    for p in parts:
        dirs.append(os.path.join(dirs[-1], p))
    return dirs[::-1]


def _level(version: int, directory: str) -> CgroupMemory | None:
    if version == 2:
        limit = _read_int(os.path.join(directory, "memory.max"))
        usage = _read_int(os.path.join(directory, "memory.current"))
        inactive = _stat(os.path.join(directory, "memory.stat"), "inactive_file")
    else:
        limit = _read_int(os.path.join(directory, "memory.limit_in_bytes"))
        usage = _read_int(os.path.join(directory, "memory.usage_in_bytes"))
        inactive = _stat(os.path.join(directory, "memory.stat"), "total_inactive_file")
    if limit is None or limit <= 0 or limit >= NO_LIMIT:
        return None
    used = max(0, (usage or 0) - inactive)
    return CgroupMemory(version, directory, limit, used)


def cgroup_memory(root: str | None = None) -> CgroupMemory | None:
    """The limit of the process's cgroups (v1 and v2, every level up to the mount point) that leaves the least
    memory, or None where no level has one (or this is not Linux)."""
    root = ROOT if root is None else root
    found: list[CgroupMemory] = []
    mounts = _mounts(root)
    for version, path in _own_cgroups(root):
        for v, point, mroot in mounts:
            if v != version:
                continue
            for directory in _lineage(_under(root, point), mroot, path):
                level = _level(version, directory)
                if level is not None:
                    found.append(level)
    return min(found, key=lambda c: c.available, default=None)


def host_available() -> int:
    """RAM the host reports as available (psutil; ``/proc/meminfo``'s figure without it)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def ram_available(root: str | None = None) -> tuple[int, str]:
    """(bytes of RAM this process may still use, what the figure is): the host's available memory, or the
    process's cgroup limit less its usage where that is lower."""
    host = host_available()
    cg = cgroup_memory(root)
    if cg is not None and cg.available < host:
        return cg.available, f"free under {cg.describe()}"
    return host, "available RAM" + (f" (the cgroup limit leaves {cg.available / GIB:.2f} GiB)" if cg else "")


def gpu_free(device: torch.device) -> int:
    """Free memory of the process's own GPU: what the driver reports free plus what torch holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def free_memory(device, host_free: int | None = None, *, root: str | None = None) -> tuple[int, str]:
    """(bytes free for training on ``device``, what the figure is). ``host_free``: the host's own figure (e.g.
    ComfyUI's ``get_free_memory``, which accounts for the models it keeps); the lower one counts."""
    device = torch.device(device)
    if device.type == "cuda":
        own, where = gpu_free(device), f"free on {device} ({torch.cuda.get_device_name(device)})"
    else:
        own, where = ram_available(root)
        where = f"{where} on this machine"
    if host_free is not None and int(host_free) < own:
        return int(host_free), f"free as the host counts it (its models kept; {where}: {own / GIB:.2f} GiB)"
    return own, where


def local_processes() -> int:
    """Processes of this run on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1
