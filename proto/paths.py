"""Where the local daemon's socket lives: the daemon binds and the client finds it the same way."""

from __future__ import annotations

import os

SOCKET_ENV = "SHARDGUARD_SOCKET"


def default_socket_path() -> str:
    """``$SHARDGUARD_SOCKET``, else ``$XDG_RUNTIME_DIR/shardguard/agent.sock``,
    else ``/run/shardguard/agent.sock`` as root, else a per-user path in /tmp."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "shardguard", "agent.sock")
    if os.geteuid() == 0:
        return "/run/shardguard/agent.sock"
    return f"/tmp/shardguard-{os.geteuid()}/agent.sock"


def grpc_target(socket_path: str) -> str:
    return f"unix:{os.path.abspath(socket_path)}"
