"""``shardguard verify`` and ``shardguard drop`` against real daemons, real parity, real damage.

Damage is done for real: bytes flipped in a rank's arena or in a parity file
in /dev/shm, a node's daemon SIGKILLed. Verify must name what is wrong, tell
a degraded step (every stripe still decodes) from a lost one, never touch
what it checks, and give a clean answer while training goes on.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardguard.client as sg
from shardguard.daemon.service import cluster
from shardguard.daemon.service.cli import EXIT_DEGRADED, EXIT_LOST, EXIT_OK, EXIT_UNAVAILABLE
from shardguard.proto import arena as fmt
from _support import finish, run_trainer, status_of_socket, trainer_log

SHM = "/dev/shm"

FAULT_CATEGORY = 'bytes flipped in stored slots and parity, a node unreachable, verify during training'
FAULT_OUTCOME = 'named by verify (degraded/lost), nothing touched; drop frees every node'


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardguard.daemon.service.cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def trained(tmp_path: Path):
    """A 4-node cluster (g=4, m=1) after 5 steps of a 4-rank job, one rank per node."""
    root = tmp_path / "cluster"
    cluster.up(str(root), 4, 4, 1)
    try:
        out = tmp_path / "run"
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 5)
        assert finish(proc) == 0, trainer_log(out)
        yield root
    finally:
        cluster.down(str(root))


def sock(root: Path, node: int) -> str:
    return cluster.sockets(str(root))[node]


def restorable(root: Path, node: int) -> int:
    job = next(j for j in status_of_socket(sock(root, node)).jobs if j.job == "job")
    return job.restorable_step


def node_prefix(root: Path, node: int) -> str:
    return cluster.load_spec(str(root)).node_prefix(node)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def flip_slot(socket: str, job: str, offset_in_data: int) -> None:
    st = status_of_socket(socket)
    rank = next(j for j in st.jobs if j.job == job).ranks[0]
    slot = next(s for s in rank.slots if s.state == "restorable")
    with open(rank.arena_path, "rb") as fh:
        header = fmt.unpack_header(fh.read(fmt.HEADER_BYTES))
    data = fmt.slot_offset(slot.index, header.slot_bytes) + fmt.HEADER_BYTES
    flip(rank.arena_path, data + offset_in_data)


def parity_file(root: Path, node: int, step: int, stripe: int) -> str:
    # g=4, m=1: stripe s's only parity piece (index k=3) lives on node s.
    return os.path.join(SHM, f"{node_prefix(root, node)}.job.p{step}.g0.s{stripe}.i3")


def test_a_sound_step_verifies_healthy_on_every_node(trained: Path) -> None:
    step = restorable(trained, 0)
    r = cli("verify", "--job", "job", "--socket", sock(trained, 2))
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert f"step {step}" in r.stdout and "verdict: healthy" in r.stdout
    r = cli("verify", "--job", "job", "--socket", sock(trained, 0), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == EXIT_OK and report["step"] == step
    assert sorted(n["node"] for n in report["nodes"]) == [0, 1, 2, 3]
    assert [s["good"] for s in report["stripes"]] == [4, 4, 4, 4]
    # Every node checked its slot, its 3 data pieces and its parity piece.
    assert all(len(n["ranks"]) == 1 and len(n["pieces"]) == 4 for n in report["nodes"])
    assert report["bytes"] > 0
    # Only the restorable step has parity; an unknown job is named as such.
    r = cli("verify", "--job", "job", "--socket", sock(trained, 0), "--step", str(step - 1))
    assert r.returncode == 1 and "NotRestorableError" in r.stderr, r.stderr
    r = cli("verify", "--job", "nosuchjob", "--socket", sock(trained, 0))
    assert r.returncode == 1 and "UnknownJobError" in r.stderr, r.stderr
    # drop asks first; without --yes and without a terminal it refuses and keeps the job.
    r = subprocess.run([sys.executable, "-m", "shardguard.daemon.service.cli", "drop", "--job", "job",
                        "--socket", sock(trained, 0)], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--yes" in r.stderr
    assert restorable(trained, 0) == step


def test_damage_is_named_degraded_then_lost_and_left_untouched(trained: Path) -> None:
    step = restorable(trained, 0)
    par = parity_file(trained, 2, step, 2)
    assert os.path.exists(par)
    flip(par, 100)
    r = cli("verify", "--job", "job", "--socket", sock(trained, 0))
    assert r.returncode == EXIT_DEGRADED, r.stdout + r.stderr
    assert "node 2 group 0 stripe 2 parity piece 3: BAD: checksum fails" in r.stdout
    assert "1 degraded" in r.stdout and "0 lost" in r.stdout
    # Node 1's first data piece is stripe 0's piece 0 (source of piece q of stripe s:
    # node (s + m + q) mod g); stripe 0's parity lives on node 0. Both bad: stripe 0 lost.
    flip_slot(sock(trained, 1), "job", 17)
    flip(parity_file(trained, 0, step, 0), 5)
    r = cli("verify", "--job", "job", "--socket", sock(trained, 3), "--json")
    assert r.returncode == EXIT_LOST, r.stdout + r.stderr
    report = json.loads(r.stdout)
    bad_ranks = [(n["node"], x["rank"]) for n in report["nodes"] for x in n["ranks"]
                 if not x["ok"]]
    assert bad_ranks == [(1, 1)]
    good = {s["stripe"]: s["good"] for s in report["stripes"]}
    assert good == {0: 2, 1: 4, 2: 3, 3: 4}
    # Verify changed nothing: same step, the damage still there, nothing marked.
    assert restorable(trained, 0) == step
    r2 = cli("verify", "--job", "job", "--socket", sock(trained, 3), "--json")
    assert json.loads(r2.stdout)["stripes"] == report["stripes"]


def test_an_unreachable_node_is_reported_and_its_pieces_count_as_missing(
        trained: Path) -> None:
    cluster.kill(str(trained), 3)
    r = cli("verify", "--job", "job", "--socket", sock(trained, 0), "--json")
    assert r.returncode == EXIT_DEGRADED, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [u["node"] for u in report["unreachable"]] == [3]
    assert [s["good"] for s in report["stripes"]] == [3, 3, 3, 3]


def test_drop_frees_the_job_on_every_node(trained: Path) -> None:
    prefixes = [node_prefix(trained, i) for i in range(4)]
    assert all(glob.glob(os.path.join(SHM, f"{p}.job.*")) for p in prefixes)
    r = cli("drop", "--job", "job", "--yes", "--socket", sock(trained, 1))
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "on 4 node(s): 4 arenas" in r.stdout
    for i, p in enumerate(prefixes):
        assert not glob.glob(os.path.join(SHM, f"{p}.job.*")), i
        assert not any(j.job == "job" for j in status_of_socket(sock(trained, i)).jobs)


def test_drop_with_a_node_down_frees_the_rest_and_says_which(trained: Path) -> None:
    cluster.kill(str(trained), 2)
    r = cli("drop", "--job", "job", "--yes", "--socket", sock(trained, 0))
    assert r.returncode == EXIT_UNAVAILABLE, r.stdout + r.stderr
    assert "on 3 node(s)" in r.stdout and "not reached" in r.stderr
    for i in (0, 1, 3):
        assert not glob.glob(os.path.join(SHM, f"{node_prefix(trained, i)}.job.*")), i


def test_drop_local_frees_only_this_node(trained: Path) -> None:
    r = cli("drop", "--job", "job", "--yes", "--local", "--socket", sock(trained, 0))
    assert r.returncode == EXIT_OK and "on 1 node(s): 1 arenas" in r.stdout, r.stdout
    assert not glob.glob(os.path.join(SHM, f"{node_prefix(trained, 0)}.job.*"))
    assert glob.glob(os.path.join(SHM, f"{node_prefix(trained, 1)}.job.*"))


def test_one_node_job_healthy_then_lost(daemon) -> None:
    with sg.connect(daemon.socket, "solo") as c:
        c.snapshot(3, {"w": torch.arange(100_000, dtype=torch.float32)}).wait()
    r = cli("verify", "--job", "solo", "--socket", daemon.socket)
    assert r.returncode == EXIT_OK and "verdict: healthy" in r.stdout, r.stdout + r.stderr
    flip_slot(daemon.socket, "solo", 1000)
    r = cli("verify", "--job", "solo", "--socket", daemon.socket)
    assert r.returncode == EXIT_LOST, r.stdout + r.stderr
    assert "rank 0     slot    BAD: job solo rank 0 step 3: data checksum fails" in r.stdout


@pytest.mark.slow
def test_verify_while_training_never_reports_damage(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    cluster.up(str(root), 4, 4, 1)
    try:
        out = tmp_path / "run"
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 40)
        codes = []
        while proc.poll() is None:
            st = status_of_socket(sock(root, 0))
            if not any(j.job == "job" and j.HasField("restorable_step") for j in st.jobs):
                continue
            r = cli("verify", "--job", "job", "--socket", sock(root, len(codes) % 4))
            codes.append((r.returncode, r.stderr + (r.stdout if r.returncode else "")))
        assert finish(proc) == 0, trainer_log(out)
        assert codes, "training ended before a single check"
        # Training may outrun a check (it then says so: exit 1, "replaced"); never damage.
        bad = [(c, e) for c, e in codes if not (c == EXIT_OK or (c == 1 and "replaced" in e))]
        assert not bad, (len(codes), bad)
        assert sum(c == EXIT_OK for c, _ in codes) >= 1, codes
    finally:
        cluster.down(str(root))
