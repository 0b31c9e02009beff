"""A local stand-in for N nodes: N real daemons on this machine, each with its own
socket, ports and shared-memory prefix (``shardguard cluster up|kill|start|down``).

Node i lives in ``DIR/node-<i>/``: ``agent.sock`` (point a rank at it with
SHARDGUARD_SOCKET), ``daemon.pid``, ``daemon.log``. ``kill`` loses a node as a
real failure would: SIGKILL, and its shared memory gone. The shared-memory directory is
the one a daemon would use (``SHARDGUARD_SHM_DIR``, the config file, else /dev/shm), fixed
at ``up`` in ``cluster.json`` and given to every daemon as a flag, so that ``kill`` and
``down`` free the files where the daemons made them.

With ``isolate`` (root only) each node is a machine of its own as far as the kernel
can make one: its daemon runs in a network namespace ``sg-<tag>-n<i>`` and listens on
its own address (``10.77.<k>.<i+1>``), reached over a veth pair whose other end is
a port of a bridge in the cluster's switch namespace ``sg-<tag>-sw``; and it keeps
its arenas in a tmpfs of its own mounted on ``node-<i>/shm``. Nothing is added to
the host's network namespace (no interface, route, address, qdisc or firewall rule),
so clusters side by side never collide, and a fault made on a node's link (``ip link``,
``tc``, nftables inside its namespace) touches that node only. Trainers stay on the
host and reach their node's daemon by its Unix socket in the node directory. Losing
an isolated node deletes its namespace and unmounts its tmpfs: its memory is gone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache

import grpc
import psutil

from shardguard.daemon.base import config as cfg
from shardguard.daemon.base import procs
from shardguard.daemon.storage.lock import DYING_WAIT_S
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ConfigError
from shardguard.proto.paths import grpc_target

SHM_DIR = "/dev/shm"
START_TIMEOUT_S = 30.0
# Isolated nodes: the interface a node sees inside its namespace, the bridge in the
# switch namespace, and the most nodes one /24 holds (.1 to .250).
NODE_IFACE = "eth0"
BRIDGE = "br0"
MAX_ISOLATED_NODES = 250
COMMAND_TIMEOUT_S = 30.0


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
    # Isolated nodes keep theirs in their own tmpfs instead: node_shm_dir().
    shm_dir: str = SHM_DIR
    # Isolated nodes (see the module docstring): their names derive from ``tag``, their
    # addresses from ``subnet`` (the /24's first three octets).
    isolate: bool = False
    tag: str = ""
    subnet: str = ""

    def node_dir(self, root: str, i: int) -> str:
        return os.path.join(root, f"node-{i}")

    def node_prefix(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def node_shm_dir(self, root: str, i: int) -> str:
        return os.path.join(self.node_dir(root, i), "shm") if self.isolate else self.shm_dir

    def address(self, i: int) -> str:
        """The address node i's daemon listens on."""
        return f"{self.subnet}.{i + 1}" if self.isolate else "127.0.0.1"

    def netns(self, i: int) -> str:
        """Node i's network namespace (isolated nodes); its interface there is NODE_IFACE."""
        return f"sg-{self.tag}-n{i}"

    @property
    def switch_netns(self) -> str:
        """The namespace of the bridge that links the isolated nodes."""
        return f"sg-{self.tag}-sw"

    def switch_port(self, i: int) -> str:
        """The switch's end of node i's veth pair (an interface in ``switch_netns``)."""
        return f"n{i}"


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


def up(root: str, nodes: int, group_size: int, parity: int, base_port: int = 0,
       isolate: bool = False) -> ClusterSpec:
    """Start ``nodes`` daemons under ``root``; with ``isolate``, each in a namespace of its
    own with a tmpfs of its own (root only: :func:`isolation_unavailable` says why not).

    A cluster that fails to come up is brought down again: the daemons already started
    (and an isolated cluster's namespaces and mounts) would otherwise outlive the caller.
    """
    if nodes < 1:
        raise ConfigError("a cluster needs at least one node")
    if isolate:
        why = isolation_unavailable()
        if why is not None:
            raise ConfigError(f"isolated nodes: {why}")
        if nodes > MAX_ISOLATED_NODES:
            raise ConfigError(f"isolated nodes: at most {MAX_ISOLATED_NODES} (one /24)")
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
    # The subnet only names the nodes: each isolated cluster is a network of its own, so
    # two clusters on one subnet never meet.
    spec = ClusterSpec(nodes, group_size, parity, f"shardguard-c{tag}", budget, base_port,
                       shm_dir, isolate, tag if isolate else "",
                       f"10.77.{int(tag[:2], 16)}" if isolate else "")
    # The nodes' shared secret, as the Slurm prolog makes one per job: peers authenticate.
    fd = os.open(_secret_path(root), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    with open(_spec_path(root), "w", encoding="utf-8") as fh:
        json.dump(asdict(spec), fh)
    try:
        if isolate:
            _clear_stale(root, spec)
            _make_switch(spec)
        for i in range(nodes):
            start(root, i, spec)
    except BaseException:
        down(root)
        raise
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
    _check_slot_free(node, _pid(d))
    sock = os.path.join(d, "agent.sock")
    argv = [sys.executable, "-m", "shardguard.daemon", "--socket", sock,
             "--shm-prefix", spec.node_prefix(node), "--shm-dir", spec.node_shm_dir(root, node),
             "--host", spec.address(node),
             "--control-port", str(spec.base_port + 2 * node if spec.base_port else 0),
             "--data-port", str(spec.base_port + 2 * node + 1 if spec.base_port else 0),
             "--group-size", str(spec.group_size),
            "--parity", str(spec.parity), "--memory-budget-bytes",
            str(spec.memory_budget_bytes), "--log-level",
            os.environ.get("SHARDGUARD_LOG_LEVEL", "INFO")]
    if os.path.exists(_secret_path(root)):
        argv += ["--secret-file", _secret_path(root)]
    argv += extra_args or []
    exe = sys.executable
    if spec.isolate:
        _make_node(root, spec, node)
        # ip execs the daemon (same pid) in the node's network namespace, and in a mount
        # namespace of its own whose mounts do not reach the host.
        exe = _tool("ip")
        argv = [exe, "netns", "exec", spec.netns(node), *argv]
    # A detached daemon in its own session, as systemd or a prolog would start it;
    # no Popen object, since the daemon is meant to outlive whoever started it.
    log = os.path.join(d, "daemon.log")
    pid = os.posix_spawn(exe, argv, os.environ, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2)])
    with open(os.path.join(d, "daemon.pid"), "w", encoding="utf-8") as fh:
        fh.write(str(pid))
    _wait_ready(sock, pid)
    return pid


def kill(root: str, node: int, keep_memory: bool = False) -> None:
    """Lose node ``node``: SIGKILL its daemon and free its shared memory (an isolated
    node: its namespace deleted, its tmpfs unmounted; ``start`` makes them anew).

    With ``keep_memory`` only the daemon dies (a crashed daemon that systemd
    restarts): its arenas stay for the next daemon in the slot to adopt.
    """
    root = os.path.abspath(root)
    spec = load_spec(root)
    _check_node(spec, node)
    d = spec.node_dir(root, node)
    pid = _pid(d)
    _signal(pid, signal.SIGKILL)
    _wait_dead(pid, 30.0)
    if _alive(pid):
        raise ConfigError(f"node {node}'s daemon (pid {pid}) has not finished exiting 30 s "
                          "after SIGKILL; its memory was left in place")
    if keep_memory:
        return
    if spec.isolate:
        _remove_node(root, spec, node)
    else:
        _wipe(spec.shm_dir, spec.node_prefix(node))


def down(root: str) -> None:
    """Stop every daemon and free all their memory (and an isolated cluster's namespaces
    and mounts, whatever state a failure left them in)."""
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
        if spec.isolate:
            _remove_node(root, spec, i)
        else:
            _wipe(spec.shm_dir, spec.node_prefix(i))
        for name in ("daemon.pid", "agent.sock", "agent.sock.lock"):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
    if spec.isolate:
        _delete_netns(spec.switch_netns)
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


def _check_slot_free(node: int, pid: int) -> None:
    """Refuse a slot whose daemon runs; wait for one killed and still exiting.

    A SIGKILLed daemon stays a zombie with live threads while it unmaps its arenas (and
    holds its lock); a restart that comes at once (systemd's Restart=, a test) waits for
    it as the daemon's own lock would (storage/lock.py), rather than being refused.
    """
    if procs.running(pid):
        raise ConfigError(f"node {node} is already running (pid {pid})")
    if procs.exiting(pid):
        _wait_dead(pid, DYING_WAIT_S)
        if _alive(pid):
            raise ConfigError(f"node {node}'s daemon (pid {pid}) was killed but is still "
                              f"exiting after {DYING_WAIT_S:.0f}s; not starting another")


def _pid(d: str) -> int:
    try:
        with open(os.path.join(d, "daemon.pid"), encoding="utf-8") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """Running, or killed but still exiting: a SIGKILLed daemon's main thread is a zombie
    while its other threads unmap its arenas, and it holds its socket's lock until the
    last of them is done (a replacement started then is refused: base/procs.py)."""
    return procs.holds_resources(pid)


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


# ------------------------------------------------------------------ isolated nodes


@cache
def isolation_unavailable() -> str | None:
    """Why isolated nodes cannot be made on this machine (None: they can).

    Tried for real: a probe namespace with a bridge and a veth pair in it, as
    containers and sandboxes may refuse any of these to root too.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, tmpfs mounts)"
    for tool, package in (("ip", "iproute2"), ("mount", "util-linux"), ("umount", "util-linux")):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (Debian package {package}; `make tools`)"
    probe = f"sg-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "name", BRIDGE, "type", "bridge")
        _ip("-n", probe, "link", "add", "name", "probe0", "type", "veth", "peer", "name",
            "probe1")
    except ConfigError as exc:
        return f"this kernel or sandbox refuses network namespaces here: {exc}"
    finally:
        _delete_netns(probe)
    return None


def _clear_stale(root: str, spec: ClusterSpec) -> None:
    """What an earlier cluster in ``root`` left when its process died before ``down``:
    its namespaces (the same tag) and tmpfs mounts, with arenas nobody must adopt."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith(f"sg-{spec.tag}-n") and name[len(f"sg-{spec.tag}-n"):].isdigit():
            _remove_node(root, spec, int(name[len(f"sg-{spec.tag}-n"):]))
    for shm in glob.glob(os.path.join(glob.escape(root), "node-*", "shm")):
        if os.path.ismount(shm):
            _run(["umount", "--lazy", shm])
    _delete_netns(spec.switch_netns)


def _make_switch(spec: ClusterSpec) -> None:
    _ip("netns", "add", spec.switch_netns)
    _ip("-n", spec.switch_netns, "link", "add", "name", BRIDGE, "type", "bridge")
    _ip("-n", spec.switch_netns, "link", "set", BRIDGE, "up")


def _make_node(root: str, spec: ClusterSpec, i: int) -> None:
    """Node i's namespace, its link to the switch and its tmpfs, where they are missing
    (a node lost by ``kill`` gets new ones; a crashed daemon's are kept)."""
    ns = spec.netns(i)
    if not _netns_exists(ns):
        try:
            _remove_switch_port(spec, i)  # left by a half-made node
            _ip("netns", "add", ns)
            _ip("-n", spec.switch_netns, "link", "add", "name", spec.switch_port(i), "type", "veth",
                "peer", "name", NODE_IFACE, "netns", ns)
            _ip("-n", spec.switch_netns, "link", "set", spec.switch_port(i), "master", BRIDGE,
                "up")
            _ip("-n", ns, "addr", "add", f"{spec.address(i)}/24", "dev", NODE_IFACE)
            _ip("-n", ns, "link", "set", NODE_IFACE, "up")
            # The daemon's calls to its own address go over lo.
            _ip("-n", ns, "link", "set", "lo", "up")
        except ConfigError:
            _delete_netns(ns)  # half made: the next start begins afresh
            raise
    shm = spec.node_shm_dir(root, i)
    os.makedirs(shm, exist_ok=True)
    if not os.path.ismount(shm):
        # Mounted on the host, not only in the daemon's mount namespace: the node's
        # trainers map their arenas by path. No size: tmpfs's default, as /dev/shm has.
        _run(["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev",
              f"shardguard-{spec.tag}-n{i}", shm])


def _remove_node(root: str, spec: ClusterSpec, i: int) -> None:
    """Node i's link, namespace and tmpfs, whatever is left of them."""
    _remove_switch_port(spec, i)
    ns = spec.netns(i)
    if _netns_exists(ns):
        # Anything still running in the node (a daemon whose pid file was lost).
        pids = subprocess.run([_tool("ip"), "netns", "pids", ns], capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S).stdout.split()
        for pid in pids:
            _signal(int(pid), signal.SIGKILL)
        _delete_netns(ns)
    shm = spec.node_shm_dir(root, i)
    if os.path.ismount(shm):
        # Lazily: a rank of the node that still maps an arena keeps only its own pages,
        # until it exits; the directory is empty for whoever looks next.
        _run(["umount", "--lazy", shm])


def _remove_switch_port(spec: ClusterSpec, i: int) -> None:
    """Delete node i's veth pair from the switch's end, at once: a deleted namespace's
    interfaces go later, when the kernel gets round to freeing it."""
    if _netns_exists(spec.switch_netns):
        try:
            _ip("-n", spec.switch_netns, "link", "delete", spec.switch_port(i))
        except ConfigError:
            pass  # none: never made, or gone with the node's namespace


def _netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", name))


def _delete_netns(name: str) -> None:
    if _netns_exists(name):
        try:
            _ip("netns", "delete", name)
        except ConfigError:
            pass  # deleted meanwhile


def _ip(*args: str) -> None:
    _run([_tool("ip"), *args])


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"isolated nodes need the {name} command")
    return path


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True,
                       timeout=COMMAND_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"{' '.join(argv)}: {exc.stderr.strip() or exc}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{' '.join(argv)}: {exc}") from None
