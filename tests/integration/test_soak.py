"""Soak: over a thousand snapshots on a 4-node cluster with a random fault every few dozen steps.

Faults, drawn at random: a trainer rank SIGKILLed (the job restarts and
restores), a daemon crash restarted in place (the job goes on), a whole node
lost (daemon and rank SIGKILLed, memory wiped, an empty replacement that
rebuilds it). Checked at the end: every loss ever computed, by every
incarnation, equals the uninterrupted run's, and so does the final state; the
private (anonymous) resident memory of the daemons that lived through the
whole soak stayed flat.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from shardguard.daemon.service import cluster
from conftest import record
from _support import (assert_same_state, finish, read_losses, reference_run, run_trainer,
                      trainer_log)
from test_cluster import free_base_port

STEPS = 1600
WANT_SNAPSHOTS = 1000
# A step of the test's tiny model is faster than protecting it across 4 nodes on 2 cores
# (the client then skips snapshots); a real step is not. This pause makes nearly every
# step a snapshot, without changing what is computed.
STEP_SLEEP_S = 0.08
# Daemons of nodes 0 (the coordinator) and 1 are never killed: their memory is measured
# from the end of the warm-up to the end of the soak.
MEASURED = (0, 1)
WARMUP_STEPS = 100


def private_rss(pid: int) -> int:
    mem = psutil.Process(pid).memory_info()
    return mem.rss - mem.shared  # shared: the arenas and parity files it maps


def progress(out: Path, rank: int = 0) -> int:
    rows = read_losses(out, rank)
    return rows[-1][0] if rows else -1


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(3000)
def test_soak_a_thousand_snapshots_with_random_faults(tmp_path: Path) -> None:
    rng = random.Random(11)
    ref = reference_run(tmp_path / "ref", 4, STEPS, timeout=900)
    root = tmp_path / "c"
    cluster.up(str(root), 4, 4, 1, base_port=free_base_port(8))
    socks = ",".join(cluster.sockets(str(root)))
    out = tmp_path / "run"
    env = {"SHARDGUARD_PROTECT_TIMEOUT_S": "2"}
    pids = {i: int((root / f"node-{i}" / "daemon.pid").read_text()) for i in MEASURED}
    rss_start: dict[int, int] = {}
    faults: dict[str, int] = {"trainer SIGKILL": 0, "daemon crash": 0, "node lost": 0}
    proc = None
    try:
        while True:
            if proc is None:
                for stale in out.glob("pid.*"):
                    stale.unlink()
                proc = run_trainer(out, "soak", socks, 4, STEPS, env=env,
                                   step_sleep=STEP_SLEEP_S)
            goal = progress(out) + rng.randint(20, 60)
            while proc.poll() is None and progress(out) < goal:
                time.sleep(0.01)
            if proc.poll() is not None:
                assert proc.returncode == 0, trainer_log(out)
                break
            if not rss_start and progress(out) >= WARMUP_STEPS:
                rss_start = {i: private_rss(pid) for i, pid in pids.items()}
            kind = rng.choice(list(faults))
            if kind == "trainer SIGKILL":
                victim = rng.randrange(4)
                try:
                    os.kill(int((out / f"pid.{victim}").read_text()), signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    continue
                finish(proc)
                proc = None
            elif kind == "daemon crash":
                node = rng.choice((2, 3))
                cluster.kill(str(root), node, keep_memory=True)
                time.sleep(rng.random() * 0.5)
                cluster.start(str(root), node)
            else:
                node = rng.choice((2, 3))
                cluster.kill(str(root), node)
                try:
                    os.kill(int((out / f"pid.{node}").read_text()), signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    pass
                finish(proc)
                proc = None
                cluster.start(str(root), node)
            faults[kind] += 1
        taken = len((out / "snapshots.0").read_text().split())
        assert taken >= WANT_SNAPSHOTS, (taken, faults)
        assert all(faults.values()), faults
        for rank in range(4):
            want = dict(read_losses(ref, rank))
            got = read_losses(out, rank)
            assert {s for s, _ in got} == set(range(STEPS)), f"rank {rank} skipped steps"
            for step, loss in got:
                assert loss == want[step], f"rank {rank} step {step}: {loss} != {want[step]}"
            a = torch.load(ref / f"final.{rank}.pt", weights_only=False)
            b = torch.load(out / f"final.{rank}.pt", weights_only=False)
            assert_same_state(a, b)
        rss_end = {i: private_rss(pid) for i, pid in pids.items()}
        for i in MEASURED:
            assert rss_end[i] <= rss_start[i] * 1.25 + (32 << 20), (i, rss_start, rss_end)
        record(f"soak: {taken} snapshots, 4 nodes, {sum(faults.values())} random faults "
               f"({', '.join(f'{v} {k}' for k, v in faults.items())})", sum(faults.values()),
               f"every loss and the final state bit-exact; daemon private RSS "
               f"{', '.join(f'{rss_start[i] >> 20}->{rss_end[i] >> 20} MiB' for i in MEASURED)}")
        print(f"soak: {taken} snapshots, faults {faults}, rss {rss_start} -> {rss_end}")
    finally:
        if proc is not None and proc.poll() is None:
            finish(proc, timeout=1)
        cluster.down(str(root))
