"""Lost nodes on a real local cluster: real daemons, real trainer ranks, real parity.

Each node is a daemon with its own socket, ports and shared memory
(``shardguard cluster``); rank i runs on node i. A node is lost for real: its
daemon and its rank are SIGKILLed and its shared memory wiped; a replacement
daemon starts empty in its slot and the job resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from shardguard.daemon.base import procs
from shardguard.daemon.service import cluster
from _support import restored_steps
from _support import (
    assert_matches_reference,
    reference_run,
    assert_same_state,
    environ,
    finish,
    read_losses,
    run_trainer,
    status_of_socket,
    trainer_log,
)

STEPS = 12

FAULT_CATEGORY = 'node lost (daemon + ranks SIGKILLed, memory wiped), daemon crash mid-run, >m lost, flipped bytes'
FAULT_OUTCOME = 'bit-exact resume; >m lost: InsufficientPiecesError on every rank'


@pytest.fixture
def local_cluster(tmp_path: Path):
    made: list[Path] = []

    def make(nodes: int, group_size: int, parity: int, env: dict[str, str] | None = None):
        root = tmp_path / f"cluster{len(made)}"
        made.append(root)  # before up(): a cluster that half-started is brought down too
        with environ(env or {}):
            cluster.up(str(root), nodes, group_size, parity)
        return root

    yield make
    for root in made:
        if (root / "cluster.json").exists():
            cluster.down(str(root))


def sockets(root: Path) -> str:
    return ",".join(cluster.sockets(str(root)))


def status(root: Path, node: int):
    return status_of_socket(cluster.sockets(str(root))[node])


def restorable(root: Path, node: int, job: str = "job") -> int:
    """The node's restorable step of ``job``; -1 for none (or the job not registered yet)."""
    st = status(root, node)
    j = next((j for j in st.jobs if j.job == job), None)
    return j.restorable_step if j is not None and j.HasField("restorable_step") else -1


@pytest.fixture(scope="module")
def reference4(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory.mktemp("ref4"), 4, STEPS)


def train(root: Path, out: Path, world: int, steps: int, **kw) -> int:
    proc = run_trainer(out, "job", sockets(root), world, steps, **kw)
    return finish(proc)


def lose_node_while_training(root: Path, out: Path, node: int, world: int, after: int) -> None:
    """Train; once node's rank passed ``after`` steps, SIGKILL the node and its rank."""
    proc = run_trainer(out, "job", sockets(root), world, STEPS)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        rows = read_losses(out, node)
        if rows and rows[-1][0] >= after and restorable(root, node) >= 1:
            break
        time.sleep(0.01)
    pid_file = out / f"pid.{node}"
    if proc.poll() is None:
        cluster.kill(str(root), node)
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError, ValueError):
            pass
    finish(proc)


@pytest.mark.parametrize("lost", [pytest.param(0, marks=pytest.mark.slow),
                                  pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow), 3],
                         ids=lambda n: f"lose-node{n}")
def test_lost_node_is_rebuilt_and_the_run_resumes_bit_exact(local_cluster, reference4,
                                                             tmp_path: Path, lost: int) -> None:
    root = local_cluster(4, 4, 1)
    out = tmp_path / "run"
    lose_node_while_training(root, out, lost, 4, after=3)
    cluster.kill(str(root), lost)  # in case training finished first: the node is lost now
    cluster.start(str(root), lost)
    assert train(root, out, 4, STEPS) == 0, trainer_log(out)
    assert_matches_reference(out, reference4, 4)
    restored = restored_steps(out, 4)
    assert len(restored) == 1 and restored != {"None"}, restored
    assert "rebuilt ranks [%d]" % lost in (root / f"node-{lost}" / "daemon.log").read_text()
    # The step the relaunch sealed again becomes restorable (tests/unit/test_reseal.py):
    # the older seal's sends, still blocked in their offers, no longer stall it.
    assert "not restorable after" not in (out / "trainer.log").read_text(), trainer_log(out)
    # The relaunch is the job's second launch on every node, the replacement's too.
    assert [status(root, n).jobs[0].epoch for n in range(4)] == [2] * 4


def test_more_than_parity_lost_fails_clearly_on_every_rank(local_cluster, tmp_path: Path) -> None:
    root = local_cluster(4, 4, 1)
    out = tmp_path / "run"
    assert train(root, out, 4, 6) == 0, trainer_log(out)
    for node in (1, 2):
        cluster.kill(str(root), node)
        cluster.start(str(root), node)
    assert train(root, out, 4, 6, expect_restore_error=True) == 0, trainer_log(out)
    for rank in range(4):
        err = (out / f"error.{rank}").read_text()
        assert err.startswith("InsufficientPiecesError"), err
        assert "group 0" in err or rank not in (1, 2), err


def test_flipped_bytes_are_detected_and_repaired(local_cluster, reference4,
                                                 tmp_path: Path) -> None:
    root = local_cluster(4, 4, 1)
    out = tmp_path / "run"
    assert train(root, out, 4, 6) == 0, trainer_log(out)
    step = restorable(root, 1)
    st = status(root, 1)
    rank = st.jobs[0].ranks[0]
    slot = next(s for s in rank.slots if s.step == step and s.state == "restorable")
    from shardguard.proto import arena as fmt

    with open(rank.arena_path, "rb") as fh:
        header = fmt.unpack_header(fh.read(fmt.HEADER_BYTES))
    off = fmt.slot_offset(slot.index, header.slot_bytes) + 4096 + 17
    with open(rank.arena_path, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)
        fh.seek(off)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert train(root, out, 4, STEPS) == 0, trainer_log(out)
    assert "repaired from parity" in (root / "node-1" / "daemon.log").read_text()
    assert_matches_reference(out, reference4, 4)


@pytest.mark.slow
def test_node_lost_while_encoding_restores_the_previous_step(local_cluster, reference4,
                                                             tmp_path: Path) -> None:
    root = local_cluster(4, 4, 1, env={"SHARDGUARD_TEST_DAEMON_FAULT": "mid-encode@5@2"})
    out = tmp_path / "run"
    train(root, out, 4, STEPS)
    assert restorable(root, 0) < 5
    before = restorable(root, 0)
    cluster.kill(str(root), 2)
    cluster.start(str(root), 2)
    assert train(root, out, 4, STEPS) == 0, trainer_log(out)
    restored = restored_steps(out, 4)
    assert restored == {str(before)}, restored
    assert_matches_reference(out, reference4, 4)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_pattern_of_up_to_two_lost_nodes_g6_m2(local_cluster, tmp_path: Path) -> None:
    root = local_cluster(6, 6, 2)
    out = tmp_path / "run"
    assert train(root, out, 6, 5) == 0, trainer_log(out)
    step = restorable(root, 0)
    ref = reference_run(tmp_path / "ref", 6, step + 1)
    patterns = [c for r in (1, 2) for c in itertools.combinations(range(6), r)]
    for lost in patterns:
        for node in lost:
            cluster.kill(str(root), node)
        for node in lost:
            cluster.start(str(root), node)
        check = tmp_path / f"check-{'-'.join(map(str, lost))}"
        assert train(root, check, 6, step + 1) == 0, (lost, trainer_log(check))
        for rank in range(6):
            a = torch.load(ref / f"final.{rank}.pt", weights_only=False)
            b = torch.load(check / f"final.{rank}.pt", weights_only=False)
            assert_same_state(a, b)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.slow
def test_a_lost_node_is_rebuilt_past_corrupt_source_pieces(local_cluster, tmp_path: Path) -> None:
    """g=5, m=2 (k=3): node 1 is lost, and the first parity piece (index 3) of every stripe
    on nodes 2, 3 and 4 is corrupt. Each of node 1's data pieces is decoded from two data
    pieces and one of those parity pieces, streamed frame by frame: the decoded piece fails
    its checksum, is decoded again with its sources checked as their frames land, and the
    corrupt piece is found, never used, and replaced by the stripe's other parity piece;
    the job resumes bit-exact."""
    root = local_cluster(5, 5, 2)
    out = tmp_path / "run"
    assert train(root, out, 5, 5) == 0, trainer_log(out)
    step = restorable(root, 0)
    spec = cluster.load_spec(str(root))
    flipped = 0
    for node in (2, 3, 4):
        for stripe in range(5):
            path = os.path.join(cluster.SHM_DIR,
                                f"{spec.node_prefix(node)}.job.p{step}.g0.s{stripe}.i3")
            if os.path.exists(path) and os.path.getsize(path) > 4096:
                flip_byte(path, 4096 + 17)
                flipped += 1
    assert flipped == 3, flipped  # stripe s's first parity piece lives on node s
    cluster.kill(str(root), 1)
    cluster.start(str(root), 1)
    check = tmp_path / "check"
    assert train(root, check, 5, step + 1) == 0, trainer_log(check)
    ref = reference_run(tmp_path / "ref", 5, step + 1)
    for rank in range(5):
        a = torch.load(ref / f"final.{rank}.pt", weights_only=False)
        b = torch.load(check / f"final.{rank}.pt", weights_only=False)
        assert_same_state(a, b)
    log = (root / "node-1" / "daemon.log").read_text()
    assert "rebuilt ranks [1]" in log
    assert log.count("decoding it again with every source checked") >= 3, log[-3000:]
    assert log.count("unusable") >= 3 and "checksum fails" in log, log[-3000:]


@pytest.mark.slow
def test_ranks_that_land_on_other_nodes_still_restore(local_cluster, reference4,
                                                      tmp_path: Path) -> None:
    root = local_cluster(4, 4, 1)
    out = tmp_path / "run"
    assert train(root, out, 4, 5) == 0, trainer_log(out)
    # The restarted job places rank i on node i+1: each rank's bytes live on another node.
    socks = cluster.sockets(str(root))
    moved = ",".join(socks[1:] + socks[:1])
    proc = run_trainer(out, "job", moved, 4, STEPS)
    assert finish(proc) == 0, trainer_log(out)
    assert_matches_reference(out, reference4, 4)
    restored = restored_steps(out, 4)
    assert len(restored) == 1 and restored != {"None"}, restored


def free_base_port(count: int) -> int:
    """A base port with ``count`` free consecutive ports above it."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20000, 40000, 2)
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.mark.slow
@pytest.mark.parametrize("crashed", [0, 2],
                         ids=["coordinator", "node2"])
def test_a_daemon_crash_mid_run_is_taken_over_by_its_restart(local_cluster, reference4,
                                                             tmp_path: Path,
                                                             crashed: int) -> None:
    """A daemon alone dies mid-run (its node, ranks and memory live on) and systemd restarts it.

    With fixed ports the restarted daemon is where the job's node list says: it
    adopts its arenas and metadata, the trainers re-register by themselves, and
    protection goes on within the same run, for the coordinator's node too.
    """
    root = tmp_path / "c"
    cluster.up(str(root), 4, 4, 1, base_port=free_base_port(8))
    out = tmp_path / "run"
    proc = run_trainer(out, "job", sockets(root), 4, STEPS, step_sleep=0.5,
                       env={"SHARDGUARD_PROTECT_TIMEOUT_S": "1"})
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            if restorable(root, crashed) >= 3:
                break
            time.sleep(0.01)
        at_crash = restorable(root, crashed)
        cluster.kill(str(root), crashed, keep_memory=True)
        time.sleep(0.5)
        cluster.start(str(root), crashed)
        assert finish(proc) == 0, trainer_log(out)
        assert "adopted 1 jobs" in (root / f"node-{crashed}" / "daemon.log").read_text()
        # Protection went on in the same run: later steps became restorable everywhere.
        after = [restorable(root, i) for i in range(4)]
        assert min(after) > at_crash, (at_crash, after)
        assert_matches_reference(out, reference4, 4)
        # And what it protected restores bit-exact.
        assert train(root, out, 4, STEPS) == 0, trainer_log(out)
        assert_matches_reference(out, reference4, 4)
    finally:
        if proc.poll() is None:
            finish(proc, timeout=1)
        cluster.down(str(root))


def test_the_last_step_is_protected_after_wait(local_cluster, tmp_path: Path) -> None:
    """The trainer's last snapshot is skipped (an earlier one is still being protected:
    node 0 stalls 5 s before sending its pieces of a step from step 3 on, longer than the
    rest of the run takes); ``client.wait()`` at the end of training takes it, so the
    newest restorable step is the last step trained."""
    steps = 10
    root = local_cluster(2, 2, 1, env={"SHARDGUARD_TEST_DAEMON_FAULT": "sealed@3@0:slow",
                                       "SHARDGUARD_TEST_DAEMON_FAULT_SLOW_S": "5"})
    out = tmp_path / "run"
    assert train(root, out, 2, steps) == 0, trainer_log(out)
    for rank in range(2):
        taken = (out / f"snapshots.{rank}").read_text().split()
        assert str(steps - 1) not in taken, taken  # the loop's last snapshot was skipped
    deadline = time.monotonic() + 30
    while min(restorable(root, i) for i in range(2)) < steps - 1 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [restorable(root, i) for i in range(2)] == [steps - 1] * 2
    # A relaunch resumes after the last step: nothing left to train, nothing lost.
    assert train(root, out, 2, steps) == 0, trainer_log(out)
    assert restored_steps(out, 2) == {str(steps - 1)}


def test_a_cluster_that_fails_to_come_up_leaves_nothing_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Node 1 does not start (here: refused before it is spawned); node 0's daemon, already
    # up, is stopped and its shared memory removed, not left to the machine.
    root = tmp_path / "cluster"
    real_start, started = cluster.start, []

    def start(root_: str, node: int, *args, **kwargs) -> int:
        if node == 1:
            raise cluster.ConfigError("node 1 cannot start (test)")
        pid = real_start(root_, node, *args, **kwargs)
        started.append(pid)
        return pid

    monkeypatch.setattr(cluster, "start", start)
    with pytest.raises(cluster.ConfigError, match="node 1 cannot start"):
        cluster.up(str(root), 2, 2, 1)
    assert len(started) == 1
    assert not procs.holds_resources(started[0])
    prefix = f"shardguard-c{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"  # up()'s tag
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(prefix)]
    assert not (root / "cluster.json").exists()
