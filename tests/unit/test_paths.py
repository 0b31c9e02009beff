"""The default socket path: explicit setting, a Slurm job's daemon, then the per-user defaults."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from shardguard.proto.paths import default_socket_path


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
