"""What must match across the nodes of a job, checked for real: different daemon configs,
a client that hands nodes different codes, and one daemon's clock skewed (libfaketime).

Refused at connect on every rank, naming the nodes and the values, where the ranks
can see it (the daemons' default code, peer secret, TLS, clocks); named as the stall
cause by the daemons where only they can (a node protecting the job otherwise, peer
tokens outside the window).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shardguard.daemon.service import cluster
from _ranks import close_all, rank_state
from _support import environ, finish, run_trainer, status_of_socket, trainer_log

FAULT_CATEGORY = "operator mistakes across nodes: mismatched code, one clock skewed 300 s"
FAULT_OUTCOME = "refused at connect naming the nodes, or named as the stall cause"

SKEW_SOURCE = Path(__file__).with_name("skewclock.c")


@pytest.fixture(scope="module")
def skew_lib(tmp_path_factory) -> str:
    """The LD_PRELOAD shim that skews one process's wall clock (tests/integration/skewclock.c)."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the clock-skew shim")
    lib = tmp_path_factory.mktemp("skew") / "libskew.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(SKEW_SOURCE), "-ldl"],
                   check=True, capture_output=True)
    return str(lib)


@pytest.fixture
def cluster_root(tmp_path: Path):
    roots: list[Path] = []

    def make(nodes: int, group_size: int, parity: int) -> Path:
        root = tmp_path / f"c{len(roots)}"
        roots.append(root)
        with environ({"SHARDGUARD_PEER_TIMEOUT_S": "3"}):
            cluster.up(str(root), nodes, group_size, parity)
        return root

    yield make
    for root in roots:
        if (root / "cluster.json").exists():
            cluster.down(str(root))


def restart(root: Path, node: int, extra: list[str], env: dict[str, str] | None = None) -> None:
    cluster.kill(str(root), node)
    with environ({"SHARDGUARD_PEER_TIMEOUT_S": "3", **(env or {})}):
        cluster.start(str(root), node, extra_args=extra)


def stall_of(sock: str, job: str) -> str:
    js = next((j for j in status_of_socket(sock).jobs if j.job == job), None)
    return js.stall_cause if js is not None else ""


def test_daemons_with_different_default_codes_are_refused_at_connect(cluster_root,
                                                                      tmp_path: Path) -> None:
    root = cluster_root(3, 3, 1)
    restart(root, 2, ["--parity", "2"])
    out = tmp_path / "run"
    proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 3, 4)
    assert finish(proc) != 0
    log = trainer_log(out)
    assert "ConfigMismatchError" in log and "parity" in log and "nodes [2]" in log, log
    assert not any(j.job == "job" for s in cluster.sockets(str(root))
                   for j in status_of_socket(s).jobs)


def test_a_node_given_another_code_is_named_as_config_mismatch(cluster_root) -> None:
    """Clients that bypass connect's check (here: built by hand) hand node 2 another code:
    the encoders refuse its offers and the stall is named on the node that sent them."""
    root = cluster_root(3, 3, 1)
    socks = cluster.sockets(str(root))
    from shardguard.client.client import Client
    from _ranks import addresses

    nodes = [addresses(s) for s in socks]
    clients = [Client(s, "mix2", r, 3, nodes=nodes, node_index=r, local_ranks=[r],
                      group_size=3, parity=1 if r < 2 else 2) for r, s in enumerate(socks)]
    try:
        for c in clients:
            c.snapshot(0, rank_state("mix2", c.rank, 0))
        deadline = time.monotonic() + 60
        while not any(stall_of(s, "mix2") == "config_mismatch" for s in socks):
            assert time.monotonic() < deadline, [stall_of(s, "mix2") for s in socks]
            time.sleep(0.1)
    finally:
        close_all(clients)


@pytest.mark.slow
def test_one_daemon_clock_skewed_is_refused_at_connect_and_named_by_the_daemons(
        cluster_root, skew_lib: str, tmp_path: Path) -> None:
    root = cluster_root(2, 2, 1)
    # Node 1's daemon lives 300 s in the past (its wall clock only).
    restart(root, 1, [], env={"LD_PRELOAD": skew_lib, "SKEW_CLOCK_S": "-300"})
    socks = cluster.sockets(str(root))
    out = tmp_path / "run"
    assert finish(run_trainer(out, "job", ",".join(socks), 2, 4)) != 0
    log = trainer_log(out)
    assert "ClockSkewError" in log and "differ by 300s" in log, log
    # Ranks that skip the check (built by hand) reach the daemons: the peers refuse each
    # other's tokens, and the daemons name clock skew as the cause.
    from shardguard.client.client import Client
    from _ranks import addresses

    nodes = [addresses(s) for s in socks]
    clients = [Client(s, "skew", r, 2, nodes=nodes, node_index=r, local_ranks=[r],
                      group_size=2, parity=1) for r, s in enumerate(socks)]
    try:
        for c in clients:
            c.snapshot(0, rank_state("skew", c.rank, 0))
        deadline = time.monotonic() + 60
        while not any(stall_of(s, "skew") == "clock_skew" for s in socks):
            assert time.monotonic() < deadline, [stall_of(s, "skew") for s in socks]
            time.sleep(0.1)
        # And `shardguard doctor` says so in plain words, from either side.
        from _fuzz_support import cli

        doctor = cli("doctor", "--socket", socks[0])
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert "FAIL  clock" in doctor.stdout and "clocks disagree" in doctor.stdout, \
            doctor.stdout
    finally:
        close_all(clients)
