"""What a daemon tells about itself, end to end: /metrics scraped over HTTP while real clients
snapshot and restore, the standard gRPC health service on both servers, and one-line logs."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import shardguard.client as sg
from shardguard.daemon.service import cluster
from shardguard.daemon.base.config import Config
from shardguard.daemon.errors import ConfigError
from shardguard.daemon.service.observe import AGENT_SERVICE, PEER_SERVICE
from shardguard.daemon.service.server import Daemon
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target
from _support import finish, run_trainer, trainer_log

SHM = "/dev/shm"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Samples = dict[tuple[str, frozenset], float]


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; a series not (yet) exported counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` that carry ``labels`` (and any others)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def metrics_address(log: Path, timeout_s: float = 30.0) -> str:
    """The address a daemon logged for its metrics (it picked a free port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(r"metrics on http://(\S+?)/metrics", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no metrics address in {log}")


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


# --------------------------------------------------------------- one node


def test_metrics_follow_snapshots_and_restores(daemon_factory) -> None:
    d = daemon_factory(["--metrics-port", "0", "--memory-budget-bytes", "256MiB"])
    address = metrics_address(d.log_path)
    before = scrape(address)
    state = {"w": torch.arange(50_000, dtype=torch.float32), "step": 0}
    with sg.connect(d.socket, "obs") as c:
        for step in range(3):
            state["step"] = step
            c.snapshot(step, state).wait()
        step, got = c.restore()
        assert step == 2 and torch.equal(got["w"], state["w"])
        with pytest.raises(sg.ShardguardError):
            c.snapshot(1, state).wait()  # not after the restorable step: Begin refuses it
        with grpc.insecure_channel(grpc_target(d.socket)) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.AgentStub(ch).Latest(pb.LatestRequest(job="made-up"), timeout=10)
        after = scrape(address)

    delta = {name: value(after, name, job="obs") - value(before, name, job="obs") for name in (
        "shardguard_snapshots_sealed_total", "shardguard_restore_seconds_count",
        "shardguard_snapshot_to_restorable_seconds_count")}
    assert delta == {"shardguard_snapshots_sealed_total": 3,
                     "shardguard_restore_seconds_count": 1,
                     # one node holds the whole job: each step is restorable at its seal
                     "shardguard_snapshot_to_restorable_seconds_count": 3}
    assert value(after, "shardguard_restorable_step", job="obs") == 2
    used = value(after, "shardguard_memory_used_bytes")
    budget = value(after, "shardguard_memory_budget_bytes")
    assert 0 < used <= budget == 256 << 20
    assert value(after, "shardguard_held_bytes", job="obs", kind="arena") == used
    assert value(after, "shardguard_rpc_refused_total", job="obs", method="Begin",
                 error="StepOrderError") == 1
    assert value(after, "shardguard_rpc_requests_total", service="Agent", method="Seal",
                 code="OK") == 3
    # A job the daemon does not hold gets no series of its own.
    assert value(after, "shardguard_rpc_refused_total", job="", method="Latest",
                 error="UnknownJobError") == 1
    assert not [k for k in after if ("job", "made-up") in k[1]]
    assert value(after, "shardguard_peers", job="obs") == 0  # one node: no peer gauges
    assert value(after, "process_resident_memory_bytes") > 0

    # The daemon's log lines name the job and rank as fields, one line per record.
    log = d.log_path.read_text()
    assert re.search(r"^ts=\S+ level=info logger=shardguard\.daemon\.storage\.jobs pid=\d+ job=obs "
                     r'rank=0 msg="registered: ', log, re.MULTILINE), log[-2000:]
    assert re.search(r"job=obs step=1 rank=0 msg=\"Begin refused: StepOrderError: ", log)


def test_metrics_of_a_dropped_job_go_away(daemon_factory) -> None:
    d = daemon_factory(["--metrics-port", "0"])
    address = metrics_address(d.log_path)
    with sg.connect(d.socket, "short") as c:
        c.snapshot(0, {"x": torch.ones(10)}).wait()
    assert value(scrape(address), "shardguard_snapshots_sealed_total", job="short") == 1
    with grpc.insecure_channel(grpc_target(d.socket)) as ch:
        pb_grpc.AgentStub(ch).Drop(pb.DropRequest(job="short"), timeout=10)
    after = scrape(address)
    assert not [k for k in after if ("job", "short") in k[1]], "series of a dropped job remain"


def test_json_logs_are_one_object_per_line(daemon_factory) -> None:
    d = daemon_factory(["--log-format", "json"])
    with sg.connect(d.socket, "js") as c:
        c.snapshot(0, {"x": torch.ones(3)}).wait()
    records = [json.loads(line) for line in d.log_path.read_text().splitlines()
               if line.startswith("{")]
    registered = [r for r in records if r["msg"].startswith("registered")]
    assert registered and (registered[0]["job"], registered[0]["rank"]) == ("js", 0)
    assert {"ts", "level", "logger", "pid"} <= set(registered[0])


def test_health_is_serving_on_the_socket_and_on_tcp(daemon_factory) -> None:
    d = daemon_factory()
    sock = grpc_target(d.socket)
    assert health(sock) == health(sock, AGENT_SERVICE) == SERVING
    control = d.status().address.control
    assert health(control) == health(control, PEER_SERVICE) == SERVING
    with pytest.raises(grpc.RpcError) as err:
        health(control, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Daemons inside the test process (several may share it, each with its own registry)."""
    made: list[Daemon] = []

    def make(**overrides: object) -> Daemon:
        conf = Config(socket=str(tmp_path / f"d{len(made)}" / "agent.sock"),
                      shm_prefix=f"shardguard-t{uuid.uuid4().hex[:10]}",
                      memory_budget_bytes=64 << 20, **overrides)  # type: ignore[arg-type]
        d = Daemon(conf)
        made.append(d)
        return d

    yield make
    for d in made:
        d.shutdown(grace_s=1.0)
        for path in Path(SHM).glob(d.config.shm_prefix + ".*"):
            path.unlink()


def test_health_turns_not_serving_on_shutdown(in_process) -> None:
    d = in_process(metrics_port=0)
    d.start()
    with grpc.insecure_channel(grpc_target(d.config.socket)) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=AGENT_SERVICE))
        assert next(watch).status == SERVING
        stopping = threading.Thread(target=d.shutdown)
        stopping.start()
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        stopping.join(60)
    assert not stopping.is_alive()
    with pytest.raises(OSError):
        scrape(d.metrics_address)  # the endpoint went with the daemon


def test_a_metrics_port_in_use_fails_the_start_clearly(in_process) -> None:
    first = in_process(metrics_port=0)
    first.start()
    port = int(first.metrics_address.rsplit(":", 1)[1])
    second = in_process(metrics_port=port)
    with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
        second.start()
    assert second.metrics_address == ""
    assert value(scrape(first.metrics_address), "shardguard_memory_budget_bytes") == 64 << 20


def test_metrics_are_off_by_default(in_process) -> None:
    d = in_process()
    d.start()
    assert d.metrics_address == ""


# ------------------------------------------------------------- four nodes


@pytest.fixture
def observed_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Four local nodes (group 4, parity 1) with metrics on free ports and a fast peer probe."""
    monkeypatch.setenv("SHARDGUARD_METRICS_PORT", "0")
    monkeypatch.setenv("SHARDGUARD_PEER_PROBE_INTERVAL_S", "0.2")
    root = tmp_path / "cluster"
    try:
        cluster.up(str(root), 4, 4, 1)
        yield root
    finally:
        if (root / "cluster.json").exists():
            cluster.down(str(root))


def test_cluster_metrics_show_protection_traffic_and_peers(observed_cluster: Path,
                                                           tmp_path: Path) -> None:
    root = observed_cluster
    addresses = [metrics_address(root / f"node-{i}" / "daemon.log") for i in range(4)]
    out = tmp_path / "run"
    proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 4)
    assert finish(proc) == 0, trainer_log(out)

    def protected_everywhere() -> bool:
        return all(value(scrape(a), "shardguard_snapshot_to_restorable_seconds_count",
                         job="job") > 0 for a in addresses)

    wait_for(protected_everywhere, "a step restorable on every node")
    wait_for(lambda: all(value(scrape(a), "shardguard_peers_up", job="job") == 3
                         for a in addresses), "every node to see its 3 peers up")
    encoded = 0.0
    for i, address in enumerate(addresses):
        s = scrape(address)
        assert value(s, "shardguard_peers", job="job") == 3, i
        assert total(s, "shardguard_data_sent_bytes_total", job="job") > 0, i
        assert total(s, "shardguard_data_received_bytes_total", job="job") > 0, i
        assert value(s, "shardguard_held_bytes", job="job", kind="parity") > 0, i
        assert value(s, "shardguard_snapshots_sealed_total", job="job") >= 1, i
        assert value(s, "shardguard_restorable_step", job="job") >= 0, i
        encoded += value(s, "shardguard_encode_bytes_total", job="job")
    assert encoded > 0
    log = (root / "node-0" / "daemon.log").read_text()
    assert re.search(r" job=job rank=0 msg=\"registered: ", log), log[-2000:]

    # A lost node stops answering: its peers count it down within a few probes.
    cluster.kill(str(root), 3)
    wait_for(lambda: value(scrape(addresses[0]), "shardguard_peers_up", job="job") == 2,
             "node 0 to count node 3 down")
    assert value(scrape(addresses[0]), "shardguard_peers", job="job") == 3


def test_skipped_snapshots_are_counted(daemon_factory) -> None:
    """A snapshot asked for while the previous one is still copying is skipped; the rank
    reports it at its next snapshot and the daemon counts it."""
    d = daemon_factory(["--metrics-port", "0", "--memory-budget-bytes", "1GiB"])
    address = metrics_address(d.log_path)
    big = {"w": torch.ones(48 << 20, dtype=torch.uint8)}  # copied on the background thread
    with sg.connect(d.socket, "skips") as c:
        first = c.snapshot(0, big)
        second = c.snapshot(1, big)  # the first is still being copied
        assert not first.skipped and second.skipped
        c.wait()  # takes the skipped step 1 (the last snapshot), reporting one skip
        assert c.latest() == 1
        c.snapshot(2, big).wait()
    samples = scrape(address)
    assert value(samples, "shardguard_snapshots_skipped_total", job="skips") == 1
    assert value(samples, "shardguard_snapshots_sealed_total", job="skips") == 3
