"""The daemon's Prometheus metrics: one registry per daemon, and its HTTP endpoint.

Events (a seal, an encoded frame, bytes sent) are counted where they happen, by
the store, the protection layer and the rebuild calling the methods of
:class:`Metrics`. Gauges (memory, the restorable step, peers up) are read from
the node's state at each scrape (:class:`StateCollector`), so none goes stale.
Every gRPC call is counted at the server boundary (:class:`RpcInterceptor`).
A dropped job's series are removed (:meth:`Metrics.forget`).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shardguard.proto.errors import ERROR_METADATA_KEY

PREFIX = "shardguard_"
# From a local seal (milliseconds) to a cross-node protection over a slow network (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)
REBUILD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# The services whose calls are counted (not grpc.health.v1).
_OWN_SERVICES = "/shardguard."


class Metrics:
    """Every event metric of one daemon, in its own registry (several daemons may share a process).

    Args:
        process: also export the process's CPU, memory and file descriptors.
    """

    def __init__(self, process: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sealed = Counter(
            PREFIX + "snapshots_sealed", "Rank snapshots sealed (one per rank per step).",
            ["job"], registry=r)
        self.skipped_snapshots = Counter(
            PREFIX + "snapshots_skipped",
            "Rank snapshots the trainers skipped (all ranks skip together while the previous "
            "step is still copied or not yet protected), as each rank reports at its next "
            "snapshot.", ["job"], registry=r)
        self.to_restorable = Histogram(
            PREFIX + "snapshot_to_restorable_seconds",
            "From the seal of a step by every local rank to the step being restorable here.",
            ["job"], buckets=LATENCY_BUCKETS, registry=r)
        self.restore = Histogram(
            PREFIX + "restore_seconds",
            "From a rank's OpenForRestore call to its Release (the client's copy included).",
            ["job"], buckets=LATENCY_BUCKETS, registry=r)
        self.encode_bytes = Counter(
            PREFIX + "encode_bytes", "Data bytes folded into parity by this node's encoders.",
            ["job"], registry=r)
        self.encode_seconds = Counter(
            PREFIX + "encode_seconds", "Seconds spent folding data bytes into parity.",
            ["job"], registry=r)
        self.sent = Counter(
            PREFIX + "data_sent_bytes",
            "Bytes sent over the data plane (kind: data, parity, fetch = pieces served).",
            ["job", "kind"], registry=r)
        self.received = Counter(
            PREFIX + "data_received_bytes",
            "Bytes received over the data plane (kind: data, parity, fetch = pieces fetched).",
            ["job", "kind"], registry=r)
        self.rebuild_bytes = Counter(
            PREFIX + "rebuild_bytes",
            "Bytes rebuilt on this node: rank snapshots and parity pieces of a lost node.",
            ["job"], registry=r)
        self.rebuild = Histogram(
            PREFIX + "rebuild_seconds", "Rebuild passes that rebuilt something on this node.",
            ["job"], buckets=REBUILD_BUCKETS, registry=r)
        self.rpcs = Counter(
            PREFIX + "rpc_requests", "gRPC calls handled, by final status code.",
            ["service", "method", "code"], registry=r)
        self.rpc_seconds = Histogram(
            PREFIX + "rpc_seconds", "Time to handle a gRPC call.", ["service", "method"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter(
            PREFIX + "rpc_refused",
            "Calls refused with a shardguard error (method Begin: a snapshot the daemon refused).",
            ["job", "method", "error"], registry=r)
        if process:
            ProcessCollector(namespace="", registry=r)
        self._lock = threading.Lock()
        self._sealed_at: dict[str, tuple[int, float]] = {}
        self._opened_at: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------- events

    def rank_sealed(self, job: str, step: int, node_sealed: bool) -> None:
        """A rank sealed ``step``; ``node_sealed``: it was the last local rank to."""
        self.sealed.labels(job).inc()
        if node_sealed:
            with self._lock:
                self._sealed_at[job] = (step, time.monotonic())

    def skipped(self, job: str, count: int) -> None:
        """A rank reported ``count`` snapshots skipped since its last one."""
        self.skipped_snapshots.labels(job).inc(count)

    def restorable(self, job: str, step: int) -> None:
        """``step`` became restorable on this node."""
        with self._lock:
            sealed = self._sealed_at.get(job)
            if sealed is None or sealed[0] > step:
                return
            del self._sealed_at[job]
        if sealed[0] == step:
            self.to_restorable.labels(job).observe(time.monotonic() - sealed[1])

    def restore_opened(self, job: str, rank: int, started: float) -> None:
        with self._lock:
            self._opened_at[(job, rank)] = started

    def restore_released(self, job: str, rank: int) -> None:
        with self._lock:
            started = self._opened_at.pop((job, rank), None)
        if started is not None:
            self.restore.labels(job).observe(time.monotonic() - started)

    @contextlib.contextmanager
    def encoding(self, job: str, nbytes: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.encode_seconds.labels(job).inc(time.perf_counter() - start)
        self.encode_bytes.labels(job).inc(nbytes)

    def bytes_sent(self, job: str, kind: str, nbytes: int) -> None:
        self.sent.labels(job, kind).inc(nbytes)

    def bytes_received(self, job: str, kind: str, nbytes: int) -> None:
        self.received.labels(job, kind).inc(nbytes)

    def rebuilt(self, job: str, nbytes: int) -> None:
        self.rebuild_bytes.labels(job).inc(nbytes)

    def rebuild_pass(self, job: str, seconds: float) -> None:
        self.rebuild.labels(job).observe(seconds)

    def forget(self, job: str) -> None:
        """Remove a dropped job's series, so a long-lived daemon does not keep them all."""
        with self._lock:
            self._sealed_at.pop(job, None)
            for key in [k for k in self._opened_at if k[0] == job]:
                del self._opened_at[key]
        for metric in (self.sealed, self.skipped_snapshots, self.to_restorable, self.restore, self.encode_bytes,
                       self.encode_seconds, self.sent, self.received, self.rebuild_bytes,
                       self.rebuild, self.refused):
            metric.remove_by_labels({"job": job})

    def interceptor(self, job_known: Callable[[str], bool]) -> "RpcInterceptor":
        return RpcInterceptor(self, job_known)


# ------------------------------------------------------------------ gauges


@dataclass(frozen=True)
class JobState:
    job: str
    restorable_step: int | None
    arena_bytes: int
    parity_bytes: int
    # Of the nodes this node works with (its group and the coordinator): how many, how
    # many answered the last health probe. None: a one-node job, or probing is off.
    peers: int | None = None
    peers_up: int | None = None
    # Why protection is stalled here ("": it is not), daemon/stalls.py.
    stall_cause: str = ""


@dataclass(frozen=True)
class NodeState:
    budget_bytes: int
    used_bytes: int
    jobs: list[JobState]


class StateCollector(Collector):
    """Gauges read from the node at each scrape: memory, held bytes, restorable steps, peers."""

    def __init__(self, read: Callable[[], NodeState]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self._read()
        yield GaugeMetricFamily(PREFIX + "memory_budget_bytes",
                                "Most arena bytes this daemon may hold.", value=st.budget_bytes)
        yield GaugeMetricFamily(PREFIX + "memory_used_bytes",
                                "Arena bytes held (what the budget counts).", value=st.used_bytes)
        held = GaugeMetricFamily(
            PREFIX + "held_bytes", "Shared-memory bytes held per job (kind: arena; parity = "
            "parity pieces, their reuse pool and step metadata).", labels=["job", "kind"])
        step = GaugeMetricFamily(PREFIX + "restorable_step",
                                 "The job's newest restorable step on this node.", labels=["job"])
        peers = GaugeMetricFamily(
            PREFIX + "peers", "Nodes this node exchanges the job's pieces with (its group and "
            "the coordinator).", labels=["job"])
        up = GaugeMetricFamily(
            PREFIX + "peers_up", "Of those, how many answered the last health probe SERVING.",
            labels=["job"])
        stalled = GaugeMetricFamily(
            PREFIX + "protection_stalled", "1 while the job's protection is stalled on this "
            "node, labelled with the cause (clock_skew, auth_failed, peer_unreachable, "
            "data_unreachable, config_mismatch, too_slow, no_space).", labels=["job", "cause"])
        for j in st.jobs:
            held.add_metric([j.job, "arena"], j.arena_bytes)
            held.add_metric([j.job, "parity"], j.parity_bytes)
            if j.restorable_step is not None:
                step.add_metric([j.job], j.restorable_step)
            if j.peers is not None and j.peers_up is not None:
                peers.add_metric([j.job], j.peers)
                up.add_metric([j.job], j.peers_up)
            if j.stall_cause:
                stalled.add_metric([j.job, j.stall_cause], 1)
        yield from (held, step, peers, up, stalled)


# -------------------------------------------------------------------- gRPC


class RpcInterceptor(grpc.ServerInterceptor):
    """Counts and times every call of the shardguard services; restore latency comes from here.

    A refused call is labelled with its job only if ``job_known(job)``: a caller
    (an unauthenticated peer, say) must not make a series per name it invents.
    """

    def __init__(self, metrics: Metrics, job_known: Callable[[str], bool]) -> None:
        self.m = metrics
        self.job_known = job_known

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None \
                or not details.method.startswith(_OWN_SERVICES):
            return handler
        service, method = details.method[1:].rsplit("/", 1)
        service = service.rsplit(".", 1)[-1]
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            try:
                return inner(request, context)
            finally:
                self._observe(service, method, request, context, start)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _observe(self, service: str, method: str, request: Any,
                 context: grpc.ServicerContext, start: float) -> None:
        code = context.code() or grpc.StatusCode.OK
        self.m.rpcs.labels(service, method, code.name).inc()
        self.m.rpc_seconds.labels(service, method).observe(time.monotonic() - start)
        job = getattr(request, "job", "")
        error = dict(context.trailing_metadata() or ()).get(
            ERROR_METADATA_KEY)
        if error:
            self.m.refused.labels(job if job and self.job_known(job) else "", method, error).inc()
        if method == "OpenForRestore" and code == grpc.StatusCode.OK:
            self.m.restore_opened(job, request.rank, start)
        elif method == "Release":
            self.m.restore_released(job, request.rank)


# -------------------------------------------------------------------- HTTP


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a scrape every few seconds is not worth a log line


class MetricsServer:
    """``/metrics`` over HTTP on a thread; :meth:`close` stops it.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server_class = type("_Server", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._httpd = make_server(host, port, make_wsgi_app(registry), server_class,
                                  handler_class=_QuietHandler)
        bound = self._httpd.server_address[1]
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sg-metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
