"""What the daemon tells about itself besides its logs: the standard gRPC health service of
each of its servers, a probe of the job's peer nodes, and the node state the gauges read."""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardguard.daemon.transport.auth import peer_channel
from shardguard.daemon.base.metrics import JobState, NodeState
from shardguard.daemon.coding.placement import peers_of
from shardguard.daemon.storage.store import Store
from shardguard.proto import arena as fmt
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import Topology

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["Agent"].full_name
PEER_SERVICE = ppb.DESCRIPTOR.services_by_name["Peer"].full_name


class Health:
    """grpc.health.v1 on one server, for the whole server ("") and its service.

    NOT_SERVING until :meth:`serving`, and again from :meth:`stopping` on.
    """

    def __init__(self, server: grpc.Server, service: str) -> None:
        self._servicer = health.HealthServicer()
        self._names = ("", service)
        for name in self._names:
            self._servicer.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def serving(self) -> None:
        for name in self._names:
            self._servicer.set(name, SERVING)

    def stopping(self) -> None:
        self._servicer.enter_graceful_shutdown()


class PeerProbe:
    """Every ``interval_s``, health-checks the peers of every multi-node job on a thread.

    A peer is up when its peer server answered the last check SERVING in time:
    within ``peer_timeout_s``, and within the interval (at least a second), so
    that rounds do not pile up; and when its data port answered a ping (``ping``,
    the data plane's): a control port that answers says nothing of the data
    port. Each distinct address is checked once per round, the checks of a
    round in parallel.
    """

    def __init__(self, store: Store, interval_s: float, peer_timeout_s: float,
                 tls: tuple[bytes, bytes, bytes] | None = None,
                 ping: Callable[[str, float], bool] | None = None) -> None:
        self.store = store
        self.tls = tls
        self.ping = ping
        self.interval_s = interval_s
        self.timeout_s = min(peer_timeout_s, max(1.0, interval_s))
        self._up: dict[str, bool] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sg-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s + 5)
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def counts(self, topology: Topology | None) -> tuple[int, int]:
        """(peers, peers up) of a job; a peer not yet checked counts as down."""
        addresses = peers_of(topology)
        with self._lock:
            return len(addresses), sum(self._up.get(c, False) and self._up.get(d, False)
                                       for c, d in addresses)

    def down(self, topology: Topology | None) -> list[str]:
        """The ports of a job's peers that did not answer the last check, in words (a peer
        not checked yet is not listed)."""
        out = []
        with self._lock:
            for control, data in peers_of(topology):
                if self._up.get(control) is False:
                    out.append(f"{control} (control port)")
                if self._up.get(data) is False:
                    out.append(f"{data} (data port)")
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_once()
            except Exception:  # noqa: BLE001 - the probe must outlive one bad round
                logger.exception("peer probe failed")
            self._stop.wait(self.interval_s)

    def probe_once(self) -> None:
        wanted: set[str] = set()
        datas: set[str] = set()
        for rec in self.store.jobs():
            for control, data in peers_of(rec.topology):
                wanted.add(control)
                datas.add(data)
        for address in set(self._channels) - wanted:
            self._channels.pop(address).close()
        request = health_pb2.HealthCheckRequest(service=PEER_SERVICE)
        calls = {a: health_pb2_grpc.HealthStub(self._channel(a)).Check.future(
            request, timeout=self.timeout_s) for a in sorted(wanted)}
        pings: dict[str, threading.Thread] = {}
        pinged: dict[str, bool] = {}
        for data in sorted(datas):
            if self.ping is None:
                pinged[data] = True
                continue
            t = pings[data] = threading.Thread(
                target=lambda d=data: pinged.__setitem__(d, self.ping(d, self.timeout_s)),
                daemon=True)
            t.start()
        up = {}
        for address, call in calls.items():
            try:
                up[address] = call.result().status == SERVING
            except grpc.RpcError:
                up[address] = False
        for data, t in pings.items():
            t.join(self.timeout_s + 1)
        up.update({d: pinged.get(d, False) for d in datas})
        with self._lock:
            before, self._up = self._up, up
        for address, ok in up.items():
            if ok != before.get(address, True):
                log = logger.info if ok else logger.warning
                log("peer %s %s", address, "answers again" if ok else "does not answer",
                    extra={"peer": address})

    def _channel(self, address: str) -> grpc.Channel:
        ch = self._channels.get(address)
        if ch is None:
            # A peer that comes back is seen within a round, not after gRPC's default
            # reconnect backoff of up to two minutes.
            backoff_ms = int(max(1.0, self.interval_s) * 1000)
            ch = self._channels[address] = peer_channel(address, self.tls, options=[
                ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                ("grpc.min_reconnect_backoff_ms", backoff_ms),
                ("grpc.max_reconnect_backoff_ms", backoff_ms)])
        return ch


def node_state(store: Store, probe: PeerProbe | None,
               stalls: Callable[[str], str] | None = None) -> NodeState:
    """What the gauges show, read now (``stalls``: a job's stall cause, "" for none)."""
    jobs, known = [], set()
    records = store.jobs()
    for rec in records:
        known.update(rr.arena.path for rr in list(rec.ranks.values()))
        known.add(os.path.join(store.shm_dir, fmt.meta_name(store.prefix, rec.job)))
    other = _other_shm_bytes(store, known)
    for rec in records:
        peers = up = None
        if probe is not None and rec.topology:
            peers, up = probe.counts(rec.topology)
        jobs.append(JobState(rec.job, rec.restorable_step,
                             sum(rr.arena.size for rr in list(rec.ranks.values())),
                             other.get(rec.job, 0), peers, up,
                             stalls(rec.job) if stalls is not None else ""))
    return NodeState(store.budget_bytes, store.used_bytes(), jobs)


def _other_shm_bytes(store: Store, known: set[str]) -> dict[str, int]:
    """Bytes of this daemon's shm files per job, besides the arenas and meta files the store
    knows: parity pieces, their reuse pool and step metadata."""
    head = store.prefix + "."  # a prefix has no '.', so this is no other daemon's
    out: dict[str, int] = {}
    with os.scandir(store.shm_dir) as entries:
        for entry in entries:
            if not entry.name.startswith(head) or entry.path in known:
                continue
            job = entry.name[len(head):].split(".", 1)[0]
            try:
                out[job] = out.get(job, 0) + entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # released meanwhile
    return out
