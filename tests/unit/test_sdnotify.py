"""sd_notify client: real datagram sockets standing in for systemd's notification socket."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from shardguard.daemon.base import sdnotify


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket, announced in $NOTIFY_SOCKET as systemd does."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_ready_sends_ready_and_a_one_line_status(listener: socket.socket) -> None:
    assert sdnotify.ready("serving on /run/x.sock\npeers 10.0.0.1:1")
    assert listener.recv(4096) == b"READY=1\nSTATUS=serving on /run/x.sock peers 10.0.0.1:1"


def test_stopping_status_and_raw_notify(listener: socket.socket) -> None:
    assert sdnotify.stopping()
    assert listener.recv(4096) == b"STOPPING=1"
    assert sdnotify.status("adopting 3 jobs")
    assert listener.recv(4096) == b"STATUS=adopting 3 jobs"
    assert sdnotify.notify("WATCHDOG=1")
    assert listener.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.ready()
    assert listener.recv(4096) == b"READY=1"


def test_abstract_socket() -> None:
    name = f"shardguard-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/notify.sock"])
def test_not_under_systemd_is_a_no_op(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert sdnotify.notify("READY=1", env=env) is False


def test_no_notify_socket_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    assert sdnotify.stopping() is False


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    gone = tmp_path / "gone.sock"
    assert not os.path.exists(gone)
    with caplog.at_level(logging.WARNING, logger=sdnotify.__name__):
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(gone)}) is False
    assert "sd_notify to" in caplog.text and str(gone) in caplog.text
