"""Peer authentication: every daemon-to-daemon message carries an HMAC made with the job's secret.

DESIGN.md §6: peers authenticate every gRPC call and every ZeroMQ message
with a shared secret (``secret_file``). A token is
``v1.<unix-ms>.<nonce>.<hmac>`` with ``hmac = HMAC-SHA256(key, "v1|ms|nonce|" +
context)``, where the context names what is signed and for whom (the audience):

- gRPC: the receiver's control address (as the job's node list names it), the
  full method name and the serialized request (metadata ``sg-auth``);
- ZeroMQ: the receiver's data address, the message kind and its JSON header
  (an extra frame); a reply names the address it comes from instead. The bulk
  payload is not in the MAC, so that authentication costs nothing per byte.
  A piece's bytes are covered by its CRC32C, which the coordinator's
  (authenticated) metadata carries; an on-path attacker who rewrites bytes
  in flight is outside this model (use an encrypted network for that).

A token is accepted once (its nonce is remembered for the freshness window)
and only within ``WINDOW_S`` of the receiver's clock, so a captured message
cannot be replayed, neither to the daemon it was for nor (the audience is in
the MAC) to another daemon of the job. Without a secret (tests, one trusted host) nothing is
signed and everything is accepted; a daemon with a secret refuses peers
without one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from typing import Any, Callable

import grpc

from shardguard.daemon.errors import ConfigError
from shardguard.proto.errors import ERROR_METADATA_KEY, AuthenticationError

logger = logging.getLogger(__name__)

METADATA_KEY = "sg-auth"
VERSION = "v1"
#: How far a token's time may be from the receiver's clock (clock skew plus queueing).
WINDOW_S = 120.0
MIN_SECRET_BYTES = 16
#: Methods any caller may use: they reveal only whether the daemon serves.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def read_secret(path: str) -> bytes:
    """The secret in ``path``: at least 16 bytes, a regular file only its owner (us) can read.

    Raises:
        ConfigError: missing, too short, or readable by others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"secret_file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"secret_file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"secret_file {path} is readable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"secret_file {path} belongs to uid {st.st_uid}, not to the "
                              f"daemon's uid {os.geteuid()}")
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"secret_file {path} holds {len(secret)} bytes; at least "
                          f"{MIN_SECRET_BYTES} are needed")
    return secret


class Authenticator:
    """Signs and checks tokens with one secret; ``Authenticator(None)`` signs and checks nothing."""

    def __init__(self, secret: bytes | None, clock: Callable[[], float] = time.time) -> None:
        self.enabled = secret is not None
        self._key = hmac.new(secret or b"", b"shardguard-peer-v1", hashlib.sha256).digest()
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def fingerprint(self) -> str:
        """A short digest that is equal on two daemons exactly when their secrets are (""
        without one): comparable across nodes, useless to guess the secret from."""
        if not self.enabled:
            return ""
        return hmac.new(self._key, b"shardguard-fingerprint-v1", hashlib.sha256).hexdigest()[:16]

    def sign(self, context: bytes) -> str:
        if not self.enabled:
            return ""
        ms = str(int(self._clock() * 1000))
        nonce = secrets.token_hex(12)
        return f"{VERSION}.{ms}.{nonce}.{self._mac(ms, nonce, context)}"

    def check(self, token: str | bytes | None, context: bytes) -> None:
        """Accept a token once, or raise :class:`AuthenticationError` saying why."""
        if not self.enabled:
            return
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        if not token:
            raise AuthenticationError("peer message without authentication (no sg-auth token)")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit():
            raise AuthenticationError("malformed authentication token")
        ms, nonce, mac = parts[1], parts[2], parts[3]
        if not hmac.compare_digest(mac, self._mac(ms, nonce, context)):
            raise AuthenticationError("authentication failed: wrong secret or altered message")
        now = self._clock()
        sent = int(ms) / 1000
        if abs(now - sent) > WINDOW_S:
            raise AuthenticationError(f"authentication token {now - sent:+.0f}s old (window "
                                      f"{WINDOW_S:.0f}s): stale, or clocks disagree")
        with self._lock:
            if nonce in self._seen:
                raise AuthenticationError("authentication token replayed")
            self._seen[nonce] = sent
            if now >= self._next_prune:
                self._seen = {n: t for n, t in self._seen.items() if now - t <= WINDOW_S}
                self._next_prune = now + WINDOW_S / 4

    def _mac(self, ms: str, nonce: str, context: bytes) -> str:
        msg = f"{VERSION}|{ms}|{nonce}|".encode() + context
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()


def grpc_context(audience: str, method: str, request_bytes: bytes) -> bytes:
    """What a peer call's token signs: for ``audience`` (the callee's control address)."""
    return b"grpc\n" + audience.encode() + b"\n" + method.encode() + b"\n" + request_bytes


def zmq_context(audience: str, kind: bytes, header: bytes) -> bytes:
    """What a ZeroMQ message's token signs: for ``audience`` (the receiver's data address,
    or ``reply_from(address)`` for an answer)."""
    return b"zmq\n" + audience.encode() + b"\n" + kind + b"\n" + header


def reply_from(address: str) -> str:
    return "reply from " + address


class ClientInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds the ``sg-auth`` token to every call to the peer at ``audience``."""

    def __init__(self, auth: Authenticator, audience: str) -> None:
        self.auth = auth
        self.audience = audience

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if not self.auth.enabled:
            return continuation(details, request)
        token = self.auth.sign(grpc_context(self.audience, details.method,
                                            request.SerializeToString()))
        metadata = list(details.metadata or ()) + [(METADATA_KEY, token)]
        return continuation(_Details(details, metadata), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class ServerInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a valid token (UNAUTHENTICATED), before any handler runs.

    ``audience`` is this daemon's control address; it is known once the port is bound,
    and set before the server starts.
    """

    def __init__(self, auth: Authenticator, audience: str = "") -> None:
        self.auth = auth
        self.audience = audience

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if (not self.auth.enabled or handler is None or handler.unary_unary is None
                or details.method.startswith(OPEN_METHODS)):
            return handler
        token = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        inner, method, auth, audience = handler.unary_unary, details.method, self.auth, self.audience

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                auth.check(token, grpc_context(audience, method, request.SerializeToString()))
            except AuthenticationError as exc:
                logger.warning("refused %s from %s: %s", method, context.peer(), exc)
                context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


# Peers that come back (a restarted daemon) are reached again within seconds, not after
# gRPC's default reconnect backoff of up to two minutes.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 1000),
                     ("grpc.min_reconnect_backoff_ms", 1000),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None


def tls_files(config: Any) -> tuple[bytes, bytes, bytes] | None:
    """(cert, key, ca) PEM bytes when TLS is configured, else None."""
    if not config.tls_cert_file:
        return None
    return (_read(config.tls_cert_file, "tls_cert_file"), _read(config.tls_key_file, "tls_key_file"),
            _read(config.tls_ca_file, "tls_ca_file"))


def peer_channel(address: str, tls: tuple[bytes, bytes, bytes] | None,
                 options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A channel to a peer daemon: mutual TLS when configured, else plain TCP."""
    opts = list(options or RECONNECT_OPTIONS)
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    cert, key, ca = tls
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=opts)


def add_peer_port(server: grpc.Server, where: str,
                  tls: tuple[bytes, bytes, bytes] | None) -> int:
    """Listen for peers on ``where``; with TLS only clients with a certificate of our CA get in."""
    if tls is None:
        return server.add_insecure_port(where)
    cert, key, ca = tls
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                        require_client_auth=True)
    return server.add_secure_port(where, creds)
