"""sd_notify(3) without libsystemd: tell the service manager (``Type=notify``) that the
daemon is ready or stopping. Outside systemd every call is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines, e.g. ``"READY=1"``).

    Args:
        state: the assignments to send, as sd_notify(3) documents them.
        env: where to read ``$NOTIFY_SOCKET`` (default: the process environment).

    Returns:
        True when the message was sent; False when not started by systemd (no
        ``$NOTIFY_SOCKET``), when the address is of a kind this client does not
        speak (``vsock:``), or when sending failed (logged: a failed notification
        must not take the daemon down, systemd's start timeout will report it).
    """
    addr = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV, "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket, in the kernel's spelling
    elif not addr.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        logger.warning("sd_notify to %s failed: %s", addr.replace("\0", "@"), exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """The daemon serves: ``READY=1``, with an optional ``STATUS=`` line."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def stopping() -> bool:
    """The daemon is shutting down: ``STOPPING=1``."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A free-form line that ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def _one_line(text: str) -> str:
    # A newline would start a new assignment.
    return " ".join(text.split())
