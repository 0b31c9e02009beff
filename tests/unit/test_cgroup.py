"""The memory a process's cgroup still allows (daemon/base/cgroup.py), on fake cgroup trees.

Issue 15, item 6: inside a 320 MiB cgroup the default budget was half the host's available
memory. tests/integration/test_hostile_local.py checks a real cgroup where one can be made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shardguard.daemon.base import cgroup
from shardguard.daemon.base.cgroup import CgroupRoom

MiB = 1 << 20


class Tree:
    """A fake /proc/self/cgroup, /proc/self/mountinfo and cgroup file system under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[str] = []
        self.cgroups: list[str] = []

    def mount(self, kind: str, where: str, mount_root: str = "/") -> Path:
        point = self.root / where
        point.mkdir(parents=True, exist_ok=True)
        opts = "rw,memory" if kind == "cgroup" else "rw"
        self.mounts.append(f"35 31 0:32 {mount_root} {point} rw,relatime - {kind} {kind} {opts}")
        return point

    def member(self, line: str) -> None:
        self.cgroups.append(line)

    def room(self) -> CgroupRoom | None:
        (self.root / "cgroup").write_text("\n".join(self.cgroups) + "\n")
        (self.root / "mountinfo").write_text("\n".join(self.mounts) + "\n")
        return cgroup.memory_room(str(self.root / "cgroup"), str(self.root / "mountinfo"))


def files(d: Path, **content: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in content.items():
        (d / name.replace("_", ".", 1)).write_text(text + "\n")
    return d


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


def test_v2_limit_of_the_own_cgroup(tree: Tree) -> None:
    top = tree.mount("cgroup2", "fs/cgroup")
    job = files(top / "slice" / "job", memory_max=str(320 * MiB), memory_current=str(50 * MiB))
    (job / "memory.stat").write_text(f"anon {40 * MiB}\ninactive_file {10 * MiB}\n")
    files(top / "slice", memory_max="max", memory_current=str(900 * MiB))
    tree.member("0::/slice/job")
    assert tree.room() == CgroupRoom(str(job), 320 * MiB, 40 * MiB)  # file cache reclaimable
    assert tree.room().room_bytes == 280 * MiB


def test_v2_a_tighter_ancestor_binds(tree: Tree) -> None:
    top = tree.mount("cgroup2", "fs/cgroup")
    files(top / "a" / "b", memory_max=str(8 << 30), memory_current=str(100 * MiB))
    files(top / "a", memory_max=str(1 << 30), memory_current=str(900 * MiB))
    tree.member("0::/a/b")
    room = tree.room()
    assert room is not None and room.where == str(top / "a") and room.room_bytes == 124 * MiB


def test_v1_memory_hierarchy(tree: Tree) -> None:
    top = tree.mount("cgroup", "fs/cgroup/memory")
    files(top, memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes="1")
    job = files(top / "job", memory_limit_in_bytes=str(320 * MiB),
                memory_usage_in_bytes=str(64 * MiB))
    (job / "memory.stat").write_text(f"inactive_file 1\ntotal_inactive_file {4 * MiB}\n")
    tree.member("4:memory:/job")
    tree.member("0::/")
    assert tree.room() == CgroupRoom(str(job), 320 * MiB, 60 * MiB)


def test_a_containers_mount_shows_its_cgroup_as_the_root(tree: Tree) -> None:
    top = tree.mount("cgroup2", "fs/cgroup", mount_root="/kubepods/pod1")
    files(top, memory_max=str(2 << 30), memory_current=str(1 << 30))
    tree.member("0::/kubepods/pod1")
    room = tree.room()
    assert room is not None and room.where == str(top) and room.room_bytes == 1 << 30


@pytest.mark.parametrize("limit", ["max", "9223372036854771712"])
def test_no_limit_is_none(tree: Tree, limit: str) -> None:
    top = tree.mount("cgroup2", "fs/cgroup")
    files(top / "a", memory_max=limit, memory_current="5")
    tree.member("0::/a")
    assert tree.room() is None


def test_a_hybrid_host_without_the_v2_memory_controller_uses_v1(tree: Tree) -> None:
    unified = tree.mount("cgroup2", "fs/cgroup/unified")
    (unified / "a").mkdir()  # no memory.* files: the controller lives in v1
    v1 = tree.mount("cgroup", "fs/cgroup/memory")
    files(v1 / "a", memory_limit_in_bytes=str(MiB * 100), memory_usage_in_bytes=str(MiB))
    tree.member("4:memory:/a")
    tree.member("0::/a")
    assert tree.room() == CgroupRoom(str(v1 / "a"), 100 * MiB, MiB)


def test_usage_over_the_limit_leaves_no_room(tree: Tree) -> None:
    top = tree.mount("cgroup2", "fs/cgroup")
    files(top / "a", memory_max=str(MiB), memory_current=str(2 * MiB))
    tree.member("0::/a")
    assert tree.room().room_bytes == 0


def test_nothing_readable_is_none(tmp_path: Path) -> None:
    assert cgroup.memory_room(str(tmp_path / "no"), str(tmp_path / "no")) is None
