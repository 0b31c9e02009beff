"""Faults the kernel makes on the network, not the daemon on itself (nftables rules).

A stall must never be silent: whatever stops protection is named by ``status``
(``stall_cause``/``stall_detail``), ``verify``, the trainer's skip warning and the
metric ``shardguard_protection_stalled``; and protection resumes once the
network does.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shardguard.daemon.service import cluster
from _fuzz_support import cli
from _netfault import firewall_or_skip, port_of
from _support import environ, finish, run_trainer, status_of_socket, trainer_log

FAULT_CATEGORY = "network faults by the kernel (nftables): a data port blocked"
FAULT_OUTCOME = "named (status, verify, trainer warning); protection resumes"


@pytest.fixture
def firewall():
    fw = firewall_or_skip()
    yield fw
    fw.close()


@pytest.fixture
def two_nodes(tmp_path: Path):
    root = tmp_path / "c"
    with environ({"SHARDGUARD_PEER_TIMEOUT_S": "3"}):
        cluster.up(str(root), 2, 2, 1)
    yield root
    cluster.down(str(root))


def job_status(sock: str, job: str = "job"):
    return next((j for j in status_of_socket(sock).jobs if j.job == job), None)


def wait_until(cond, timeout: float, what: str, proc=None, out: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout}s" + (
            f"\n{trainer_log(out)}" if out is not None else "")
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the trainer ended\n{trainer_log(out)}")
        time.sleep(0.1)


def test_a_blocked_data_port_is_named_and_protection_resumes(firewall, two_nodes: Path,
                                                             tmp_path: Path) -> None:
    socks = cluster.sockets(str(two_nodes))
    data1 = status_of_socket(socks[1]).address.data
    firewall.block_port(port_of(data1))  # node 1's data port, from the start
    out = tmp_path / "run"
    proc = run_trainer(out, "job", ",".join(socks), 2, 100_000, step_sleep=0.02,
                       env={"SHARDGUARD_PROTECT_TIMEOUT_S": "2"})
    try:
        # Node 0 sends its pieces to node 1's encoder: the bytes never arrive, and it says so.
        wait_until(lambda: (js := job_status(socks[0])) is not None
                   and js.stall_cause == "data_unreachable", 60,
                   "node 0 names the unreachable data port", proc, out)
        js = job_status(socks[0])
        assert data1 in js.stall_detail, js.stall_detail
        assert not js.HasField("restorable_step")
        verdict = cli("verify", "--job", "job", "--socket", socks[0])
        assert verdict.returncode != 0
        assert "data_unreachable" in verdict.stdout + verdict.stderr, verdict
        doctor = cli("doctor", "--socket", socks[0])
        assert doctor.returncode == 1, doctor
        assert f"data port {data1} does not answer" in doctor.stdout, doctor.stdout
        # The trainer's warning after 50 skipped snapshots names it too.
        wait_until(lambda: "data_unreachable" in (out / "trainer.log").read_text(), 60,
                   "the trainer warns with the cause", proc, out)
        firewall.clear()
        wait_until(lambda: all((j := job_status(s)) is not None and j.HasField("restorable_step")
                               and not j.stall_cause for s in socks), 90,
                   "protection resumes once the port is open", proc, out)
        doctor = cli("doctor", "--socket", socks[0], "--verbose")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "0 failed" in doctor.stdout and f"data port {data1} answers" in doctor.stdout
    finally:
        finish_early(proc)


def finish_early(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    finish(proc, timeout=30)


@pytest.fixture
def three_nodes(tmp_path: Path):
    root = tmp_path / "c3"
    with environ({"SHARDGUARD_PEER_TIMEOUT_S": "5"}):
        cluster.up(str(root), 3, 3, 1)
    yield root
    cluster.down(str(root))


def lose_and_replace(root: Path, node: int) -> None:
    cluster.kill(str(root), node)
    cluster.start(str(root), node)


@pytest.mark.slow
def test_a_replacement_that_cannot_reach_its_peers_never_starts_from_zero(
        firewall, three_nodes: Path, tmp_path: Path) -> None:
    """The survivors' control ports are cut while the replacement catches up: every rank's
    restore fails, naming the unreachable nodes, instead of an empty job that trains
    from step 0; once the network is back, the relaunch resumes bit-exactly."""
    from _support import assert_matches_reference, read_losses, reference_run, restored_steps

    socks = cluster.sockets(str(three_nodes))
    out = tmp_path / "run"
    assert finish(run_trainer(out, "job", ",".join(socks), 3, 6)) == 0, trainer_log(out)
    lose_and_replace(three_nodes, 2)
    for s in socks[:2]:
        firewall.block_port(port_of(status_of_socket(s).address.control))
    trained = {r: len(read_losses(out, r)) for r in range(3)}
    proc = run_trainer(out, "job", ",".join(socks), 3, 12, expect_restore_error=True)
    assert finish(proc) == 0, trainer_log(out)
    for rank in range(3):
        err = (out / f"error.{rank}").read_text()
        assert "did not answer" in err and "peer_unreachable" in err, err
        assert len(read_losses(out, rank)) == trained[rank], "trained from step 0"
    firewall.clear()
    assert finish(run_trainer(out, "job", ",".join(socks), 3, 12)) == 0, trainer_log(out)
    assert restored_steps(out, 3) == {"5"}
    assert_matches_reference(out, reference_run(tmp_path / "ref", 3, 12), 3)


@pytest.mark.slow
def test_a_one_second_cut_during_catch_up_is_ridden_out(firewall, three_nodes: Path,
                                                         tmp_path: Path) -> None:
    from _support import assert_matches_reference, reference_run, restored_steps

    socks = cluster.sockets(str(three_nodes))
    out = tmp_path / "run"
    assert finish(run_trainer(out, "job", ",".join(socks), 3, 6)) == 0, trainer_log(out)
    lose_and_replace(three_nodes, 2)
    for s in socks[:2]:
        firewall.block_port(port_of(status_of_socket(s).address.control))
    log = three_nodes / "node-2" / "daemon.log"
    proc = run_trainer(out, "job", ",".join(socks), 3, 12)
    # The replacement asked its peers and got no answer: the network comes back 1 s later.
    wait_until(lambda: "has no step info" in log.read_text(), 60,
               "the replacement tries its peers", proc, out)
    time.sleep(1.0)
    firewall.clear()
    assert finish(proc) == 0, trainer_log(out)
    assert restored_steps(out, 3) == {"5"}
    assert_matches_reference(out, reference_run(tmp_path / "ref", 3, 12), 3)
