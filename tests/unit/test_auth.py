"""Peer authentication tokens (daemon/transport/auth.py): fake clock, no sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardguard.daemon.transport.auth import (WINDOW_S, Authenticator, grpc_context, read_secret, reply_from,
                                   zmq_context)
from shardguard.daemon.errors import ConfigError
from shardguard.proto.errors import AuthenticationError

SECRET = b"0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def pair(clock: Clock | None = None) -> tuple[Authenticator, Authenticator]:
    clock = clock or Clock()
    return Authenticator(SECRET, clock), Authenticator(SECRET, clock)


def test_a_signed_context_is_accepted_once() -> None:
    a, b = pair()
    token = a.sign(b"ctx")
    b.check(token, b"ctx")
    with pytest.raises(AuthenticationError, match="replayed"):
        b.check(token, b"ctx")


@pytest.mark.parametrize("other", [b"ctx2", b"", b"ct"])
def test_a_token_for_another_context_is_refused(other: bytes) -> None:
    a, b = pair()
    with pytest.raises(AuthenticationError, match="wrong secret or altered"):
        b.check(a.sign(b"ctx"), other)


def test_another_secret_is_refused() -> None:
    clock = Clock()
    a, b = Authenticator(b"x" * 32, clock), Authenticator(SECRET, clock)
    with pytest.raises(AuthenticationError, match="wrong secret"):
        b.check(a.sign(b"ctx"), b"ctx")


@pytest.mark.parametrize("token", [None, "", b"", "v1", "v1.x.y.z", "v2.1.a.b", "v1.12.ab",
                                   "v1.-5.ab.cd", "\x00" * 20])
def test_missing_or_malformed_tokens_are_refused(token: object) -> None:
    _, b = pair()
    with pytest.raises(AuthenticationError):
        b.check(token, b"ctx")  # type: ignore[arg-type]


@pytest.mark.parametrize("skew", [WINDOW_S + 1, -(WINDOW_S + 1)])
def test_stale_or_future_tokens_are_refused(skew: float) -> None:
    clock = Clock()
    a, b = pair(clock)
    token = a.sign(b"ctx")
    clock.t += skew
    with pytest.raises(AuthenticationError, match="old"):
        b.check(token, b"ctx")


def test_remembered_nonces_are_pruned_after_the_window() -> None:
    clock = Clock()
    a, b = pair(clock)
    for _ in range(100):
        b.check(a.sign(b"c"), b"c")
    clock.t += WINDOW_S * 2
    b.check(a.sign(b"c"), b"c")
    assert len(b._seen) == 1


def test_without_a_secret_nothing_is_signed_or_checked() -> None:
    off = Authenticator(None)
    assert off.sign(b"ctx") == ""
    off.check(None, b"ctx")
    on = Authenticator(SECRET)
    with pytest.raises(AuthenticationError, match="without authentication"):
        on.check(off.sign(b"ctx"), b"ctx")


def secret_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "secret"
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_read_secret(tmp_path: Path) -> None:
    assert read_secret(secret_file(tmp_path, SECRET + b"\n")) == SECRET


@pytest.mark.parametrize("data,mode,message", [
    (SECRET, 0o644, "readable by others"),
    (SECRET, 0o640, "readable by others"),
    (b"short\n", 0o600, "at least 16"),
])
def test_unsafe_secrets_are_refused(tmp_path: Path, data: bytes, mode: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_secret(secret_file(tmp_path, data, mode))


def test_missing_secret_file_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secret_file"):
        read_secret(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(str(tmp_path))


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    real = secret_file(tmp_path, SECRET)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError):
        read_secret(str(link))


def test_a_token_names_its_receiver() -> None:
    a, b = pair()
    for make in (lambda to: grpc_context(to, "/shardguard.v1.Peer/StepInfo", b"\n\x03job"),
                 lambda to: zmq_context(to, b"fetch", b"{}")):
        token = a.sign(make("10.0.0.1:7000"))
        with pytest.raises(AuthenticationError, match="wrong secret or altered message"):
            b.check(token, make("10.0.0.2:7000"))  # replayed to another node of the job
        b.check(token, make("10.0.0.1:7000"))
    assert zmq_context(reply_from("h:1"), b"chunk", b"{}") != zmq_context("h:1", b"chunk", b"{}")
