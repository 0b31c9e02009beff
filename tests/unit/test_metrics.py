"""Metrics bookkeeping (no daemon): what is observed when, series of a dropped job, options."""

from __future__ import annotations

import urllib.request

import pytest

from shardguard.daemon.base.config import Config, ConfigError, load
from shardguard.daemon.base.metrics import JobState, Metrics, MetricsServer, NodeState, StateCollector


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_snapshot_to_restorable_is_observed_from_the_node_seal_of_that_step() -> None:
    m = Metrics()
    m.rank_sealed("j", 4, node_sealed=False)  # another local rank still copies
    m.restorable("j", 3)  # an older step's announcement: not this one
    assert sample(m, "shardguard_snapshot_to_restorable_seconds_count", job="j") is None
    m.rank_sealed("j", 4, node_sealed=True)
    m.restorable("j", 3)
    m.restorable("j", 4)
    m.restorable("j", 4)  # announced twice (a rebuild): counted once
    assert sample(m, "shardguard_snapshot_to_restorable_seconds_count", job="j") == 1
    assert sample(m, "shardguard_snapshots_sealed_total", job="j") == 2


def test_a_sealed_step_overtaken_by_a_newer_restorable_one_is_not_observed() -> None:
    m = Metrics()
    m.rank_sealed("j", 4, node_sealed=True)
    m.restorable("j", 6)  # a rebuild brought a newer step
    m.restorable("j", 4)
    assert sample(m, "shardguard_snapshot_to_restorable_seconds_count", job="j") is None


def test_restore_latency_needs_an_open_then_a_release() -> None:
    m = Metrics()
    m.restore_released("j", 0)  # no open: nothing to time
    m.restore_opened("j", 0, started=0.0)
    m.restore_released("j", 0)
    m.restore_released("j", 0)
    assert sample(m, "shardguard_restore_seconds_count", job="j") == 1


def test_forget_removes_every_series_of_the_job_only() -> None:
    m = Metrics()
    for job in ("gone", "kept"):
        m.rank_sealed(job, 0, node_sealed=True)
        m.restorable(job, 0)
        m.bytes_sent(job, "data", 10)
        m.bytes_received(job, "parity", 5)
        with m.encoding(job, 100):
            pass
        m.rebuilt(job, 7)
        m.rebuild_pass(job, 1.5)
        m.refused.labels(job, "Begin", "StepOrderError").inc()
    m.forget("gone")
    text = "\n".join(f"{s.name}{s.labels}" for fam in m.registry.collect() for s in fam.samples)
    assert "'gone'" not in text
    assert sample(m, "shardguard_data_sent_bytes_total", job="kept", kind="data") == 10
    assert sample(m, "shardguard_encode_bytes_total", job="kept") == 100
    assert sample(m, "shardguard_rpc_refused_total", job="kept", method="Begin",
                  error="StepOrderError") == 1


def test_gauges_are_read_at_each_scrape() -> None:
    state = NodeState(100, 40, [JobState("a", 3, 40, 12, peers=3, peers_up=2),
                                JobState("b", None, 0, 0)])
    m = Metrics()
    m.registry.register(StateCollector(lambda: state))
    assert sample(m, "shardguard_memory_used_bytes") == 40
    assert sample(m, "shardguard_restorable_step", job="a") == 3
    assert sample(m, "shardguard_restorable_step", job="b") is None  # nothing restorable yet
    assert sample(m, "shardguard_held_bytes", job="a", kind="parity") == 12
    assert (sample(m, "shardguard_peers", job="a"), sample(m, "shardguard_peers_up", job="a")) \
        == (3, 2)
    assert sample(m, "shardguard_peers", job="b") is None  # one node: no peers to count
    state = NodeState(100, 0, [])
    assert sample(m, "shardguard_restorable_step", job="a") is None


def test_two_daemons_in_one_process_keep_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.rank_sealed("j", 0, node_sealed=False)
    assert sample(a, "shardguard_snapshots_sealed_total", job="j") == 1
    assert sample(b, "shardguard_snapshots_sealed_total", job="j") is None


def test_metrics_server_serves_and_stops() -> None:
    m = Metrics()
    m.bytes_sent("j", "data", 3)
    server = MetricsServer(m.registry, "127.0.0.1", 0)
    host, port = server.address.rsplit(":", 1)
    try:
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'shardguard_data_sent_bytes_total{job="j",kind="data"} 3.0' in body
        with pytest.raises(OSError):
            MetricsServer(m.registry, host, int(port))  # taken
    finally:
        server.close()


@pytest.mark.parametrize("changes, message", [
    ({"metrics_port": -2}, "metrics_port"),
    ({"metrics_port": 65536}, "metrics_port"),
    ({"log_format": "xml"}, "log_format"),
    ({"peer_probe_interval_s": -1.0}, "peer_probe_interval_s"),
    ({"peer_probe_interval_s": float("nan")}, "peer_probe_interval_s"),
    ({"peer_probe_interval_s": float("inf")}, "peer_probe_interval_s"),
])
def test_observability_options_are_validated(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def test_observability_options_from_the_environment() -> None:
    c = load(env={"SHARDGUARD_METRICS_PORT": "0", "SHARDGUARD_LOG_FORMAT": "json",
                  "SHARDGUARD_METRICS_HOST": "::1", "SHARDGUARD_PEER_PROBE_INTERVAL_S": "0"},
             path="/dev/null")
    assert (c.metrics_port, c.log_format, c.metrics_host, c.peer_probe_interval_s) == \
        (0, "json", "::1", 0.0)
    assert (Config().metrics_port, Config().log_format) == (-1, "text")
