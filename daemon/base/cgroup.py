"""How much memory this process's cgroup still lets it take (cgroup v2 and v1).

The daemon's default budget is a fraction of the memory it may use. Inside a container or
a systemd slice that is not the host's available memory: the cgroup's limit binds first,
and its OOM killer takes the daemon (whose RSS holds every arena) before anything else.
The room is the tightest ``limit - usage`` over the process's cgroup and its ancestors
(a parent's limit bounds its children), usage not counting inactive file cache, which the
kernel reclaims before it kills.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC_CGROUP = "/proc/self/cgroup"
MOUNTINFO = "/proc/self/mountinfo"
#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
_UNLIMITED = 1 << 60

#: (limit file, usage file, the memory.stat key of reclaimable file cache) per version.
_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
          "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


@dataclass(frozen=True)
class CgroupRoom:
    """The binding cgroup: its directory, limit and usage, and what is left under the limit."""

    where: str
    limit_bytes: int
    used_bytes: int

    @property
    def room_bytes(self) -> int:
        return max(0, self.limit_bytes - self.used_bytes)


def memory_room(proc_cgroup: str = PROC_CGROUP, mountinfo: str = MOUNTINFO) -> CgroupRoom | None:
    """The tightest memory limit over this process's cgroups (v2 and v1 memory), or None
    when no cgroup limits it (or none can be read)."""
    try:
        with open(proc_cgroup, encoding="utf-8") as fh:
            memberships = _memberships(fh.read())
        with open(mountinfo, encoding="utf-8") as fh:
            mounts = _mounts(fh.read())
    except OSError:
        return None
    rooms = []
    for version, path in memberships.items():
        mount = mounts.get(version)
        if mount is not None:
            rooms += _walk(version, _cgroup_dir(mount, path), mount[1])
    return min(rooms, key=lambda r: r.room_bytes, default=None)


def _memberships(text: str) -> dict[str, str]:
    """{"v2": path, "v1": path of the memory controller} from /proc/<pid>/cgroup."""
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            out["v2"] = path
        elif "memory" in controllers.split(","):
            out["v1"] = path
    return out


def _mounts(text: str) -> dict[str, tuple[str, str]]:
    """{"v2" | "v1": (mount root, mount point)} from /proc/<pid>/mountinfo."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if rest[0] == "cgroup2":
            out.setdefault("v2", (root, point))
        elif rest[0] == "cgroup" and "memory" in rest[2].split(","):
            out.setdefault("v1", (root, point))
    return out


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _cgroup_dir(mount: tuple[str, str], path: str) -> str:
    """The directory of cgroup ``path`` under a mount of the hierarchy's ``root``."""
    root, point = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]  # a container's mount shows its own cgroup as the root
    where = os.path.normpath(os.path.join(point, path.lstrip("/")))
    return where if os.path.isdir(where) else point


def _walk(version: str, where: str, top: str) -> list[CgroupRoom]:
    """The limited cgroups from ``where`` up to the mount point ``top``."""
    limit_file, usage_file, cache_key = _FILES[version]
    rooms = []
    while True:
        limit = _read_int(os.path.join(where, limit_file))
        if limit is not None and limit < _UNLIMITED:
            used = _read_int(os.path.join(where, usage_file)) or 0
            cache = _stat(os.path.join(where, "memory.stat")).get(cache_key, 0)
            rooms.append(CgroupRoom(where, limit, max(0, used - cache)))
        if os.path.normpath(where) == os.path.normpath(top) or where in ("/", ""):
            return rooms
        where = os.path.dirname(where)


def _read_int(path: str) -> int | None:
    """A number from a cgroup file; None when missing, unreadable or "max"."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out
