"""A local stand-in for N nodes: N real daemons on this machine, each with its own
socket, ports and shared-memory prefix (``shardguard cluster up|kill|start|down``).

Node i lives in ``DIR/node-<i>/``: ``agent.sock`` (point a rank at it with
SHARDGUARD_SOCKET), ``daemon.pid``, ``daemon.log``. ``kill`` loses a node as a
real failure would: SIGKILL, and its shared memory gone. The shared-memory directory is
the one a daemon would use (``SHARDGUARD_SHM_DIR``, the config file, else /dev/shm), fixed
at ``up`` in ``cluster.json`` and given to every daemon as a flag, so that ``kill`` and
``down`` free the files where the daemons made them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass

import grpc
import psutil

from shardguard.daemon import config as cfg
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ConfigError
from shardguard.proto.paths import grpc_target

SHM_DIR = "/dev/shm"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    group_size: int
    parity: int
    prefix: str
    memory_budget_bytes: int
    # 0: every daemon picks free ports. Else node i listens on base_port + 2i (control)
    # and base_port + 2i + 1 (data), as a production daemon does on fixed ports: a
    # daemon restarted in its slot is found where the job's node list says.
    base_port: int = 0
    # Where the daemons keep their arenas (a spec written before this field: /dev/shm).
    shm_dir: str = SHM_DIR

    def node_dir(self, root: str, i: int) -> str:
        return os.path.join(root, f"node-{i}")

    def node_prefix(self, i: int) -> str:
        return f"{self.prefix}-n{i}"


def _spec_path(root: str) -> str:
    return os.path.join(root, "cluster.json")


def _secret_path(root: str) -> str:
    return os.path.join(root, "secret")


def load_spec(root: str) -> ClusterSpec:
    try:
        with open(_spec_path(root), encoding="utf-8") as fh:
            return ClusterSpec(**json.load(fh))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"no local cluster in {root}: {exc}") from None


def up(root: str, nodes: int, group_size: int, parity: int, base_port: int = 0) -> ClusterSpec:
    """Start ``nodes`` daemons under ``root``."""
    if nodes < 1:
        raise ConfigError("a cluster needs at least one node")
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    if os.path.exists(_spec_path(root)):
        raise ConfigError(f"{root} already holds a cluster: bring it down first")
    tag = hashlib.sha1(root.encode()).hexdigest()[:8]
    budget = int(psutil.virtual_memory().available * 0.6 / nodes)
    if base_port and not 1024 <= base_port <= 65535 - 2 * nodes:
        raise ConfigError(f"base port {base_port}: need 1024 <= port <= {65535 - 2 * nodes}")
    # What a daemon would resolve (env, config file); any socket will do for that.
    shm_dir = cfg.load(overrides={"socket": os.path.join(root, "agent.sock")}).shm_dir
    spec = ClusterSpec(nodes, group_size, parity, f"shardguard-c{tag}", budget, base_port,
                       shm_dir)
    # The nodes' shared secret, as the Slurm prolog makes one per job: peers authenticate.
    fd = os.open(_secret_path(root), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    with open(_spec_path(root), "w", encoding="utf-8") as fh:
        json.dump(asdict(spec), fh)
    for i in range(nodes):
        start(root, i, spec)
    return spec


def start(root: str, node: int, spec: ClusterSpec | None = None,
          extra_args: list[str] | None = None) -> int:
    """Start a fresh daemon in node slot ``node`` (a replacement node); returns its pid.

    ``extra_args`` are more daemon flags (they win over the cluster's).
    """
    root = os.path.abspath(root)
    spec = spec or load_spec(root)
    _check_node(spec, node)
    d = spec.node_dir(root, node)
    os.makedirs(d, exist_ok=True)
    if _alive(_pid(d)):
        raise ConfigError(f"node {node} is already running (pid {_pid(d)})")
    sock = os.path.join(d, "agent.sock")
    argv = [sys.executable, "-m", "shardguard.daemon", "--socket", sock,
             "--shm-prefix", spec.node_prefix(node), "--shm-dir", spec.shm_dir,
             "--host", "127.0.0.1",
             "--control-port", str(spec.base_port + 2 * node if spec.base_port else 0),
             "--data-port", str(spec.base_port + 2 * node + 1 if spec.base_port else 0),
             "--group-size", str(spec.group_size),
            "--parity", str(spec.parity), "--memory-budget-bytes",
            str(spec.memory_budget_bytes), "--log-level",
            os.environ.get("SHARDGUARD_LOG_LEVEL", "INFO")]
    if os.path.exists(_secret_path(root)):
        argv += ["--secret-file", _secret_path(root)]
    argv += extra_args or []
    # A detached daemon in its own session, as systemd or a prolog would start it;
    # no Popen object, since the daemon is meant to outlive whoever started it.
    log = os.path.join(d, "daemon.log")
    pid = os.posix_spawn(sys.executable, argv, os.environ, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2)])
    with open(os.path.join(d, "daemon.pid"), "w", encoding="utf-8") as fh:
        fh.write(str(pid))
    _wait_ready(sock, pid)
    return pid


def kill(root: str, node: int, keep_memory: bool = False) -> None:
    """Lose node ``node``: SIGKILL its daemon and free its shared memory.

    With ``keep_memory`` only the daemon dies (a crashed daemon that systemd
    restarts): its arenas stay for the next daemon in the slot to adopt.
    """
    root = os.path.abspath(root)
    spec = load_spec(root)
    _check_node(spec, node)
    d = spec.node_dir(root, node)
    pid = _pid(d)
    _signal(pid, signal.SIGKILL)
    _wait_dead(pid, 10.0)
    if not keep_memory:
        _wipe(spec.shm_dir, spec.node_prefix(node))


def down(root: str) -> None:
    """Stop every daemon and free all their memory."""
    root = os.path.abspath(root)
    spec = load_spec(root)
    for i in range(spec.nodes):
        d = spec.node_dir(root, i)
        _signal(_pid(d), signal.SIGTERM)
    for i in range(spec.nodes):
        d = spec.node_dir(root, i)
        pid = _pid(d)
        _wait_dead(pid, 10.0)
        _signal(pid, signal.SIGKILL)
        _wipe(spec.shm_dir, spec.node_prefix(i))
        for name in ("daemon.pid", "agent.sock", "agent.sock.lock"):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
    os.unlink(_spec_path(root))
    try:
        os.unlink(_secret_path(root))
    except FileNotFoundError:
        pass


def sockets(root: str) -> list[str]:
    spec = load_spec(root)
    return [os.path.join(spec.node_dir(os.path.abspath(root), i), "agent.sock")
            for i in range(spec.nodes)]


def _check_node(spec: ClusterSpec, node: int) -> None:
    if not 0 <= node < spec.nodes:
        raise ConfigError(f"node {node} outside the cluster's 0..{spec.nodes - 1}")


def _pid(d: str) -> int:
    try:
        with open(os.path.join(d, "daemon.pid"), encoding="utf-8") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: int) -> None:
    if _alive(pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL and pid > 0:
        _wait_dead(pid, 5.0)


def _wait_dead(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid):
            return
        time.sleep(0.01)


def _wipe(shm_dir: str, prefix: str) -> None:
    for path in glob.glob(os.path.join(shm_dir, glob.escape(prefix) + ".*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _reap(pid: int) -> None:
    """Collect a dead daemon that is our child, so no zombie is left."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_ready(sock: str, pid: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid):
            raise ConfigError(f"daemon for {sock} exited; see its daemon.log")
        if os.path.exists(sock):
            with grpc.insecure_channel(grpc_target(sock)) as ch:
                try:
                    pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise ConfigError(f"daemon for {sock} did not come up in {START_TIMEOUT_S}s")
