"""Files where other users can reach (proto/safefile.py): nothing planted is followed or trusted.

Issue 15, item 4: a daemon that writes a predictable name with ``open(..., "w")`` writes
through a symlink another user planted there, into a file of the daemon's user (root's).
Every test here plants a real symlink and checks that its target is left as it was.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shardguard.proto import safefile
from shardguard.proto import tier as layout
from shardguard.proto.errors import UnsafePathError

OTHER = 65534  # nobody: another user, for the ownership checks (root may chown to it)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user "
                                "(chown) needs root")


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A file of this user that a planted symlink points at: it must never change."""
    victim = tmp_path / "victim" / "precious"
    victim.parent.mkdir()
    victim.write_bytes(b"do not touch\n")
    victim.chmod(0o644)
    return victim


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    return d


def unchanged(victim: Path) -> bool:
    return victim.read_bytes() == b"do not touch\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644


# --------------------------------------------------------------------------- writing


def test_write_atomic_replaces_a_symlink_at_the_name(shared: Path, precious: Path) -> None:
    target = shared / "job.meta"
    target.symlink_to(precious)
    safefile.write_atomic(str(target), b"{}", 0o600)
    assert unchanged(precious)
    assert not target.is_symlink() and target.read_bytes() == b"{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_atomic_sets_the_mode_whatever_the_umask(shared: Path) -> None:
    old = os.umask(0o000)
    try:
        safefile.write_atomic(str(shared / "f"), b"x", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((shared / "f").stat().st_mode) == 0o600


def test_tier_write_durably_never_writes_through_a_planted_temporary(shared: Path,
                                                                      precious: Path) -> None:
    """The tier's pointer was written through ``<path>.<pid>.part``: a name anyone can
    predict (the daemon's pid is public) and plant a symlink at."""
    pointer = shared / "latest"
    (shared / f"latest.{os.getpid()}.part").symlink_to(precious)
    layout.write_durably(str(pointer), b"7\n")
    assert unchanged(precious)
    assert pointer.read_bytes() == b"7\n"


def test_a_failed_write_leaves_no_temporary(shared: Path) -> None:
    with pytest.raises(TypeError):
        safefile.write_atomic(str(shared / "job.meta"), "not bytes")  # type: ignore[arg-type]
    assert os.listdir(shared) == []


def test_open_new_refuses_what_is_already_there(shared: Path, precious: Path) -> None:
    link = shared / "arena"
    link.symlink_to(precious)
    with pytest.raises(UnsafePathError, match=r"arena already exists \(a symlink of "):
        safefile.open_new(str(link))
    assert unchanged(precious)


def test_temporaries_are_cleaned_by_prefix(shared: Path) -> None:
    mine = safefile.temp_path(str(shared / "p.job.meta"))
    Path(mine).write_bytes(b"half")
    (shared / "p.job.meta").write_bytes(b"kept")
    (shared / "q.job.meta.0123456789abcdef.tmp").write_bytes(b"another prefix")
    assert safefile.clean_temps(str(shared), "p.") == [mine]
    assert sorted(os.listdir(shared)) == ["p.job.meta", "q.job.meta.0123456789abcdef.tmp"]


# --------------------------------------------------------------------------- reading


def test_open_owned_does_not_follow_a_symlink(shared: Path, precious: Path) -> None:
    (shared / "meta").symlink_to(precious)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        safefile.read_owned(str(shared / "meta"))


def test_open_owned_does_not_hang_on_a_fifo(shared: Path) -> None:
    os.mkfifo(shared / "meta")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        safefile.read_owned(str(shared / "meta"))


@needs_root
def test_open_owned_refuses_another_users_file(shared: Path) -> None:
    planted = shared / "meta"
    planted.write_text('{"version": 1}')
    os.chown(planted, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match=r"belongs to .*uid 65534.*not trusted"):
        safefile.read_owned(str(planted))


def test_open_owned_creates_a_lock_file(shared: Path) -> None:
    fd = safefile.open_owned(str(shared / "x.lock"), os.O_RDWR, create=True)
    os.close(fd)
    assert stat.S_IMODE((shared / "x.lock").stat().st_mode) == 0o600


# ----------------------------------------------------------------------- directories


def test_a_private_directory_is_trusted(shared: Path) -> None:
    safefile.ensure_dir(str(shared / "run" / "sg"))
    assert stat.S_IMODE((shared / "run" / "sg").stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_directory_others_can_write_is_not_trusted(shared: Path, mode: int) -> None:
    d = shared / "d"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(UnsafePathError, match=rf"{d} is writable by other users \(mode "):
        safefile.check_dir(str(d))


def test_a_root_owned_sticky_directory_is_trusted() -> None:
    if os.stat("/tmp").st_uid != 0 or not os.stat("/tmp").st_mode & stat.S_ISVTX:
        pytest.skip("/tmp is not a root-owned sticky directory here")
    safefile.check_dir("/tmp")


@needs_root
def test_another_users_directory_is_not_trusted(shared: Path) -> None:
    d = shared / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match=rf"directory {d} belongs to .*uid 65534"):
        safefile.ensure_dir(str(d))


@needs_root
def test_a_symlink_made_by_another_user_is_not_followed(shared: Path) -> None:
    mine = shared / "mine"
    mine.mkdir(mode=0o700)
    link = shared / "link"
    link.symlink_to(mine)
    os.lchown(link, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match="is a symlink made by .*uid 65534"):
        safefile.check_dir(str(link))


@needs_root
def test_a_socket_of_another_user_is_refused(shared: Path) -> None:
    import socket

    path = shared / "agent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        safefile.check_socket(str(path))  # ours: fine
        os.chown(path, OTHER, OTHER)
        with pytest.raises(UnsafePathError, match=rf"socket {path} belongs to .*uid 65534"):
            safefile.check_socket(str(path))
    safefile.check_socket(str(shared / "absent.sock"))  # nothing there: connecting fails later
