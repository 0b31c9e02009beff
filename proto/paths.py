"""Where the local daemon's socket lives: the daemon binds and the client finds it the same way.

A socket directory is trusted only when this user (or root) owns it and no one else can
write to it (proto/safefile.py): the per-user default in /tmp is a predictable name that
another user could create first and fill with a socket of their own.
"""

from __future__ import annotations

import os

from shardguard.proto import safefile

SOCKET_ENV = "SHARDGUARD_SOCKET"
# The Slurm prolog (deploy/slurm/prolog.sh) runs one daemon per job in
# $SHARDGUARD_RUN_DIR/job-$SLURM_JOB_ID/ (default /run/shardguard/job-<id>/).
RUN_DIR_ENV = "SHARDGUARD_RUN_DIR"
DEFAULT_RUN_DIR = "/run/shardguard"


def default_socket_path() -> str:
    """``$SHARDGUARD_SOCKET``, else the socket of this Slurm job's daemon if there is
    one, else ``$XDG_RUNTIME_DIR/shardguard/agent.sock``, else
    ``/run/shardguard/agent.sock`` as root, else a per-user path in /tmp.

    Raises:
        UnsafePathError: the socket, or its directory, belongs to another user (not root)
            or can be written by others: it may lead to someone else's process.
    """
    path = _default_socket_path()
    safefile.check_socket(path)
    return path


def _default_socket_path() -> str:
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    job_socket = slurm_job_socket()
    if job_socket:
        return job_socket
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "shardguard", "agent.sock")
    if os.geteuid() == 0:
        return os.path.join(DEFAULT_RUN_DIR, "agent.sock")
    return f"/tmp/shardguard-{os.geteuid()}/agent.sock"


def slurm_job_socket() -> str | None:
    """The per-job daemon's socket when ``$SLURM_JOB_ID`` names a job whose socket exists."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        return None
    run_dir = os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR
    path = os.path.join(run_dir, f"job-{job}", "agent.sock")
    return path if os.path.exists(path) else None


def prepare_socket_dir(socket_path: str) -> None:
    """The daemon's side: create the socket's directory 0700 if missing, and refuse one that
    cannot be trusted (another user's, or writable by others).

    Raises:
        UnsafePathError: see :func:`shardguard.proto.safefile.check_dir`.
    """
    safefile.ensure_dir(os.path.dirname(os.path.abspath(socket_path)))


def grpc_target(socket_path: str) -> str:
    return f"unix:{os.path.abspath(socket_path)}"
