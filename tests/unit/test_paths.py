"""The default socket path: explicit setting, a Slurm job's daemon, then the per-user defaults."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Iterator

import pytest

from shardguard.proto.errors import UnsafePathError
from shardguard.proto.paths import default_socket_path, prepare_socket_dir


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("SHARDGUARD_SOCKET", "SLURM_JOB_ID", "SHARDGUARD_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    return xdg


@pytest.fixture
def job_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A listening socket where the prolog puts job 4242's: RUN_DIR/job-4242/agent.sock."""
    run = tmp_path / "run"
    (run / "job-4242").mkdir(parents=True)
    path = run / "job-4242" / "agent.sock"
    monkeypatch.setenv("SHARDGUARD_RUN_DIR", str(run))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield path


def test_the_slurm_jobs_daemon_is_found(clean_env: Path, job_socket: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert default_socket_path() == str(job_socket)


def test_explicit_socket_wins_over_the_jobs(clean_env: Path, job_socket: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SHARDGUARD_SOCKET", "/elsewhere/agent.sock")
    assert default_socket_path() == "/elsewhere/agent.sock"


@pytest.mark.parametrize("job", ["4243", "", "../job-4242", "4242/.."])
def test_no_daemon_for_this_job_falls_back(clean_env: Path, job_socket: Path,
                                           monkeypatch: pytest.MonkeyPatch, job: str) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", job)
    assert default_socket_path() == str(clean_env / "shardguard" / "agent.sock")


def test_the_default_run_dir(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_exists = os.path.exists

    def exists(path: str) -> bool:
        calls.append(path)
        return path == "/run/shardguard/job-7/agent.sock" or real_exists(path)

    monkeypatch.setattr(os.path, "exists", exists)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert default_socket_path() == "/run/shardguard/job-7/agent.sock"
    assert calls == ["/run/shardguard/job-7/agent.sock"]


def test_without_slurm_the_order_is_unchanged(clean_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_socket_path() == str(clean_env / "shardguard" / "agent.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    want = ("/run/shardguard/agent.sock" if os.geteuid() == 0
            else f"/tmp/shardguard-{os.geteuid()}/agent.sock")
    assert default_socket_path() == want


# --------------------------------------------------------------------------
# a directory or socket of another user is never trusted (issue 15, item 3)
# --------------------------------------------------------------------------

OTHER = 65534  # nobody


def test_a_private_socket_directory_is_used(clean_env: Path) -> None:
    (clean_env / "shardguard").mkdir(parents=True, mode=0o700)
    assert default_socket_path() == str(clean_env / "shardguard" / "agent.sock")


def test_a_socket_directory_others_can_write_is_refused(clean_env: Path) -> None:
    d = clean_env / "shardguard"
    d.mkdir(parents=True)
    d.chmod(0o777)  # anyone could have swapped the socket
    with pytest.raises(UnsafePathError, match=rf"directory {d} is writable by other users"):
        default_socket_path()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a directory to another user needs root")
def test_a_socket_directory_of_another_user_is_refused(clean_env: Path) -> None:
    d = clean_env / "shardguard"
    d.mkdir(parents=True, mode=0o777)
    os.chown(d, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match=rf"directory {d} belongs to .*uid {OTHER}"):
        default_socket_path()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a socket to another user needs root")
def test_a_socket_of_another_user_is_refused(clean_env: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "planted.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        os.chown(path, OTHER, OTHER)
        monkeypatch.setenv("SHARDGUARD_SOCKET", str(path))
        with pytest.raises(UnsafePathError, match=rf"socket {path} belongs to .*uid {OTHER}"):
            default_socket_path()


def test_the_daemon_makes_its_socket_directory_private(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "sg" / "agent.sock"
    prepare_socket_dir(str(sock))
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    sock.parent.chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable by other users"):
        prepare_socket_dir(str(sock))
