"""``shardguard doctor``'s local checks, on fakes of the machine (no daemon)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardguard.daemon.roles import doctor
from shardguard.daemon.base.cgroup import CgroupRoom


def test_a_budget_larger_than_the_cgroup_leaves_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    room = CgroupRoom(where="/sys/fs/cgroup/memory/job", limit_bytes=320 << 20,
                      used_bytes=20 << 20)
    monkeypatch.setattr(doctor.cgroup, "memory_room", lambda: room)
    [f] = doctor._budget(1 << 30, "memory_budget_bytes")
    assert f.level == doctor.FAIL and "cgroup /sys/fs/cgroup/memory/job" in f.detail
    [f] = doctor._budget(100 << 20, "memory_budget_bytes")
    assert f.level == doctor.OK


def test_a_directory_another_user_may_write_fails(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    found = doctor._directories(str(shared / "agent.sock"), str(tmp_path))
    assert [f.level for f in found] == [doctor.FAIL, doctor.OK], found
    os.chmod(shared, 0o700)
    found = doctor._directories(str(shared / "agent.sock"), str(tmp_path))
    assert [f.level for f in found] == [doctor.OK, doctor.OK], found
