"""Calling other daemons: one authenticated gRPC channel per peer, errors as the project's own.

Every peer call goes through :meth:`PeerClients.stub`: the channel (TLS when configured)
carries a token made with the job's secret for that peer's address
(transport/auth.py), and a failed call comes out as a typed error:
:class:`PeerUnavailableError` for a peer that cannot be reached or did not answer in
time, else the class the peer raised. This is the one place peer errors are translated.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc

from shardguard.daemon.errors import PeerUnavailableError
from shardguard.daemon.transport.auth import Authenticator, ClientInterceptor, peer_channel
from shardguard.proto import peer_pb2_grpc as ppb_grpc
from shardguard.proto.errors import error_from_rpc


class PeerClients:
    """Stubs for the peers' gRPC service, one channel per address, kept for the daemon's life."""

    def __init__(self, auth: Authenticator, tls: tuple[bytes, bytes, bytes] | None) -> None:
        self.auth, self.tls = auth, tls
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, address: str) -> Any:
        """The Peer service at ``address`` (its control port); calls raise typed errors."""
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = grpc.intercept_channel(
                    peer_channel(address, self.tls), ClientInterceptor(self.auth, address))
        return _Translating(ppb_grpc.PeerStub(ch))

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


class _Translating:
    """A peer stub whose failures come out as the project's errors."""

    def __init__(self, stub: ppb_grpc.PeerStub) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
                if isinstance(err, ConnectionError) or exc.code() in (
                        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise PeerUnavailableError(f"peer call {name} failed: {err}") from None
                raise err from None

        return call
