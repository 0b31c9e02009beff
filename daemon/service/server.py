"""The node daemon: one object that owns the store and serves it; ``serve()`` runs until stopped."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc

from shardguard.daemon.base import sdnotify
from shardguard.daemon.base.config import Config
from shardguard.daemon.base.metrics import Metrics, MetricsServer, StateCollector
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.errors import ConfigError
from shardguard.daemon.roles.tier import Tier
from shardguard.daemon.service import wiring
from shardguard.daemon.service.agent import AgentService
from shardguard.daemon.service.boundary import DecodeGuard
from shardguard.daemon.service.observe import (
    AGENT_SERVICE,
    PEER_SERVICE,
    Health,
    PeerProbe,
    node_state,
)
from shardguard.daemon.service.peer_service import PeerService
from shardguard.daemon.storage.lock import PidLock
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.auth import ServerInterceptor, add_peer_port
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto import peer_pb2_grpc as ppb_grpc
from shardguard.proto import safefile
from shardguard.proto.paths import grpc_target, prepare_socket_dir

logger = logging.getLogger(__name__)

# gRPC caps messages at 4 MiB by default; ours are small, and a hostile client
# must not make the daemon buffer more than this.
MAX_MESSAGE_BYTES = 1 << 20


class Daemon:
    """A node's shardguard daemon.

    Args:
        config: validated configuration.
        logger: where to log (defaults to this module's logger).
    """

    def __init__(self, config: Config, logger: logging.Logger | None = None) -> None:
        self.config = config
        self.log = logger or globals()["logger"]
        if not os.path.isdir(config.shm_dir):
            raise ConfigError(f"shm_dir {config.shm_dir} is not a directory")
        safefile.check_dir(config.shm_dir)
        self.metrics = Metrics(process=True)
        budget, why = config.budget()
        self.budget_why = why
        self.log.info("memory budget %d bytes: %s", budget, why)
        self.store = Store(config.shm_dir, config.shm_prefix, budget,
                           verify_on_restore=config.verify_on_restore, metrics=self.metrics)
        self.tier = Tier(config, self.store)
        if self.tier.enabled:
            self.store.on_restorable = self.tier.on_restorable
        # "host:port" of the Prometheus endpoint once started; "" when metrics_port is -1.
        self.metrics_address = ""
        self._metrics_server: MetricsServer | None = None
        self._probe: PeerProbe | None = None
        self._health: list[Health] = []
        self._shut_down = False
        self.stalls = Stalls()
        self.roles: wiring.Roles | None = None
        self._peer_server: grpc.Server | None = None
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        sock = config.socket
        self._locks = [PidLock(sock + ".lock", f"socket {sock}"),
                       PidLock(os.path.join(config.shm_dir, f"{config.shm_prefix}.lock"),
                               f"shm prefix {config.shm_prefix!r} in {config.shm_dir}")]

    def start(self) -> None:
        """Take the socket and the prefix, adopt what a previous daemon left, then listen."""
        self._lock()  # before anything is touched: a second daemon must change nothing
        try:
            self._start()
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> None:
        """Own the socket and the shm prefix for the daemon's life (daemon/lock.py)."""
        prepare_socket_dir(self.config.socket)
        try:
            for lock in self._locks:
                lock.acquire()
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        for lock in reversed(self._locks):
            lock.release()

    def _start(self) -> None:
        self._start_metrics()  # first: a port it cannot bind fails the start before any serving
        adopted = self.store.adopt()
        sock = self.config.socket
        # Left by a daemon that died (we hold its lock now): we are its replacement.
        safefile.remove(sock)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.grpc_workers,
                                       thread_name_prefix="sg-agent"),
            interceptors=[DecodeGuard(), self.metrics.interceptor(self._job_known)],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", 64 << 20)])
        control = self._start_peers()
        pb_grpc.add_AgentServicer_to_server(
            AgentService(self.store, sock, self.roles, control,
                         (self.config.group_size, self.config.parity, self.config.placement),
                         metrics_address=self.metrics_address, probe=self._probe,
                         budget_why=self.budget_why), server)
        health = Health(server, AGENT_SERVICE)
        old_umask = os.umask(0o177)
        try:
            server.add_insecure_port(grpc_target(sock))
            server.start()
        finally:
            os.umask(old_umask)
        os.chmod(sock, 0o600)
        self._server = server
        self._serving(health)
        self.log.info("serving on %s (shm %s/%s.*, budget %d bytes, adopted %d jobs)", sock,
                      self.config.shm_dir, self.config.shm_prefix, self.store.budget_bytes,
                      adopted)
        if self.tier.enabled:
            self.log.info("persistent tier: every %d steps to %s, keeping %d",
                          self.config.tier_every, self.config.tier_dir, self.config.tier_keep)
        sdnotify.ready(f"serving on {sock}, peers on {control}")

    def _start_peers(self) -> str:
        """The peer gRPC service on TCP and the ZeroMQ data plane; returns the control address."""
        roles = self.roles = wiring.build(self.config, self.store, self.stalls,
                                          self.tier if self.tier.enabled else None)
        auth = ServerInterceptor(roles.auth)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="sg-peer"),
            interceptors=[DecodeGuard(), self.metrics.interceptor(self._job_known), auth],
            options=[("grpc.max_receive_message_length", 64 << 20),
                     ("grpc.max_send_message_length", 64 << 20)])
        ppb_grpc.add_PeerServicer_to_server(PeerService(roles), server)
        health = Health(server, PEER_SERVICE)
        where = f"{self.config.host}:{self.config.control_port}"
        try:
            port = add_peer_port(server, where, roles.tls)
        except RuntimeError as exc:  # grpc raises on a busy or foreign address
            raise ConfigError(f"cannot listen on {where} (host, control_port): {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {where} (host, control_port)")
        control = f"{self.config.host}:{port}"
        auth.audience = control  # tokens must name this address: none made for another node
        server.start()
        self._peer_server = server
        self._serving(health)
        if self.config.peer_probe_interval_s:
            self._probe = PeerProbe(self.store, self.config.peer_probe_interval_s,
                                    self.config.peer_timeout_s, tls=roles.tls,
                                    ping=roles.plane.ping)
            self._probe.start()
        self.log.info("peers: control %s, data %s", control, roles.plane.address)
        return control

    def _stall_cause(self, job: str) -> str:
        stall = self.stalls.get(job)
        return stall.cause.value if stall is not None else ""

    def _start_metrics(self) -> None:
        """The Prometheus endpoint unless ``metrics_port`` is -1; gauges read the node on scrape."""
        if self.config.metrics_port < 0 or self._metrics_server is not None:
            return
        host, port = self.config.metrics_host, self.config.metrics_port
        try:
            self._metrics_server = MetricsServer(self.metrics.registry, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} "
                              "(metrics_host, metrics_port; -1 turns metrics off)") from None
        self.metrics.registry.register(StateCollector(lambda: node_state(
            self.store, self._probe, self._stall_cause)))
        self.metrics_address = self._metrics_server.address
        self.log.info("metrics on http://%s/metrics", self.metrics_address)

    def _job_known(self, job: str) -> bool:
        return any(rec.job == job for rec in self.store.jobs())

    def _serving(self, health: Health) -> None:
        health.serving()
        self._health.append(health)

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT or :meth:`stop`; the arenas stay in shm for the next daemon."""
        if self._server is None:
            self.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        self._stop.wait()
        self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self, grace_s: float = 5.0) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        sdnotify.stopping()
        for health in self._health:
            health.stopping()  # NOT_SERVING while the calls in flight finish
        self._health.clear()
        if self.roles is not None and self.roles.exit_flush is not None:
            # Save the newest step on the way down, while the peer service still takes the
            # nodes' flush reports (a bounded wait: tier_exit_wait_s).
            self.roles.exit_flush.on_stop(self.config.tier_exit_wait_s)
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._peer_server is not None:
            self._peer_server.stop(grace_s).wait()
            self._peer_server = None
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self.roles is not None:
            self.roles.close()
        self.tier.close()
        self.store.close()
        if self._locks[0].held:  # never another daemon's socket
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass
        self._unlock()
        self.log.info("stopped")
