"""Four local nodes: snapshot-to-restorable latency and the rebuild of a lost node, against their floors.

A local cluster (``shardguard.daemon.service.cluster``: real daemons, each with its own
socket, ports and shared memory) of 4 nodes in one group with parity 1
(``k = 3``), one trainer rank per node. The ranks are started the way
``tests/integration/trainer.py`` starts them: a launcher process forks them
with torch.multiprocessing, they join a gloo group and ``sg.connect`` to their
node's socket. Each rank's state is fp32 tensors of 1 to 256 MiB, ``--gib``
per rank (the ranks' bytes differ: each reads a shared random buffer at its
own offset).

1. **Snapshot to restorable.** Every step, after a barrier, every rank calls
   ``client.snapshot(step, state)`` then ``client.wait(restorable=True)``;
   the latency is from the call to the last rank's return (median over
   steps; the first step, which sizes the arenas, is not counted), split at
   the moment the last rank's copy was sealed. The floor is the loopback
   transfer floor: the bytes each node must send per step,
   ``(k + m - 1) * P`` with ``P`` the group's piece size
   (``placement.GroupLayout.load``), over the bandwidth of ZeroMQ moving
   the data plane's frames (``transport.FRAME_BYTES``) on 127.0.0.1, with the
   allocator settings the daemon's data plane runs with
   (``daemon/base/allocator.py``), measured
   in this run two ways: one PUSH/PULL pair alone, and 4 processes sending
   all-to-all at once (what 4 daemons do during a step; on a machine whose
   cores they share it is the fair one); each in rounds before and after the
   snapshot steps (the median of both), so that the floor sees the machine
   the steps saw.
2. **Rebuild of one lost node.** With a step restorable: ``cluster.kill``
   (SIGKILL, shared memory wiped) and ``cluster.start`` of the node, then a
   4-rank relaunch. The replacement daemon rebuilds the lost rank inside the
   Register of that rank, so ``sg.connect`` on it is timed (after a barrier);
   the daemon's "rebuilt ranks" log line confirms it. Its floor is the transfer
   floor of the rebuild: the bytes the replacement must fetch, ``k`` pieces for
   each of the ``g`` pieces the node held (``g * k * P``), at the 1-pair loopback
   bandwidth (its best sample: the pair's rate is bimodal on 2 cores); the ratio is printed next to it and stored (``rebuild_vs_floor``;
   issue target: within 2x). Then ``restore()`` on
   that rank is timed and its state checked against the original (the other
   ranks restore onto the meta device: no copy, so 4 GiB of restored state
   need not fit next to the arenas). The peer: ``torch.load`` of the same
   rank's state from a file on local disk, warm in the page cache (nothing is
   dropped from it: that needs root and would hit everyone else on the
   machine), and right after the file was rewritten and fsynced.

The machine is shared: the load average is stored with every phase.

Usage: ``python bench/bench_cluster.py [--quick] [--gib G] [--steps N] [--repeat N]
[--rebuilds N] [--disk-dir DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zmq
from _common import (base_parser, gbps, load_average, median_time, print_rows, raise_interrupt,
                     write_results)
from bench_node import fs_type

import shardguard.client as sg
from shardguard.daemon.base.allocator import keep_frame_memory
from shardguard.daemon.service import cluster
from shardguard.daemon.coding import placement
from shardguard.daemon.transport.dataplane import FRAME_BYTES
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target

MiB = 1 << 20
GiB = 1 << 30
NODES = 4
GROUP_SIZE = 4
#: Snapshots taken before the timed ones (see main()).
WARMUP_STEPS = 2
PARITY = 1
JOB = "bench-cluster"
# Tensor sizes in MiB, taken in turn until the state is full (the last one is cut).
SIZES_MIB = (1, 64, 3, 128, 16, 256, 2, 192, 8, 32, 48, 4, 96, 24)
ROW_FLOATS = 1024
# Rank r's tensors start r pages into the shared random buffer, so the ranks' bytes differ.
RANK_SHIFT_FLOATS = 1024
SEED = 20240601
JOB_TIMEOUT_S = 900.0
PEER_TIMEOUT_S = 120.0
# A step not restorable by then never will be (its protection failed: see the daemon logs).
STEP_TIMEOUT_S = 180.0
# Shorter transfers are too brief to time on a loaded machine.
BANDWIDTH_MIN_BYTES = 512 * MiB
REBUILT_LINE = "rebuilt ranks [{rank}]"


# ------------------------------------------------------------------ the state


def tensor_sizes(total_bytes: int) -> list[int]:
    """Byte sizes of the state's tensors: SIZES_MIB in turn, the last one cut to fit."""
    sizes: list[int] = []
    left = total_bytes
    i = 0
    while left > 0:
        n = min(SIZES_MIB[i % len(SIZES_MIB)] * MiB, left)
        sizes.append(n)
        left -= n
        i += 1
    return sizes


def shared_buffer(total_bytes: int, seed: int) -> np.ndarray:
    """Random fp32 values (no NaN, so states compare with ``torch.equal``) for every rank.

    Made by the launcher before it forks the ranks, so they share its pages.
    """
    n = total_bytes // 4 + NODES * RANK_SHIFT_FLOATS
    return np.random.default_rng(seed).random(n, dtype=np.float32)


def rank_state(buf: np.ndarray, rank: int, sizes: list[int]) -> dict[str, Any]:
    """Rank ``rank``'s state: views into ``buf`` at the rank's offset (no copy)."""
    tensors: dict[str, torch.Tensor] = {}
    off = rank * RANK_SHIFT_FLOATS
    for i, nbytes in enumerate(sizes):
        n = nbytes // 4
        t = torch.from_numpy(buf[off:off + n])
        tensors[f"t{i:02d}"] = t.view(-1, ROW_FLOATS) if n % ROW_FLOATS == 0 else t
        off += n
    return {"tensors": tensors, "step": -1}


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ta, tb = a["tensors"], b["tensors"]
    return list(ta) == list(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------- the jobs (subprocesses)
#
# Everything that forks runs in a launcher subprocess of its own
# (``--job-spec``): the orchestrating process talks gRPC to the daemons, and
# gRPC does not survive a fork into processes that use it again.


def job_main(spec_path: str) -> None:
    """A launcher: run the spec's ranks (or ZeroMQ peers); rank 0 writes ``spec['out']``."""
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    if spec["mode"] == "zmq":
        result = zmq_bandwidth(spec)
        Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
        return
    buf = shared_buffer(sum(spec["sizes"]), spec["seed"])
    mp.start_processes(rank_main, args=(spec, buf), nprocs=spec["world"], start_method="fork")


def rank_main(rank: int, spec: dict[str, Any], buf: np.ndarray) -> None:
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(spec["world"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{spec['rdzv']}", rank=rank,
                            world_size=spec["world"])
    state = rank_state(buf, rank, spec["sizes"])
    sock = spec["sockets"][rank]
    if spec["mode"] == "snapshot":
        result = snapshot_steps(sock, spec, state)
    else:
        result = rebuild_and_restore(sock, spec, rank, state)
    everyone: list[Any] = [None] * spec["world"]
    dist.all_gather_object(everyone, result)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(everyone), encoding="utf-8")
    dist.destroy_process_group()


def snapshot_steps(sock: str, spec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Snapshot every step and wait until it is restorable; monotonic stamps per step, and
    the CPU time the node's daemon spent over the timed steps."""
    client = sg.connect(sock, spec["job"], group_size=GROUP_SIZE, parity=PARITY)
    daemon = psutil.Process(status(sock).pid)
    rows = []
    cpu0 = 0.0
    try:
        for step in range(spec["warmup"] + spec["steps"]):
            state["step"] = step
            dist.barrier()
            if step == spec["warmup"]:
                cpu0 = cpu_s(daemon)
            rows.append(timed_snapshot(client, step, state))
        daemon_cpu = cpu_s(daemon) - cpu0
    finally:
        client.close()
    return {"steps": rows, "daemon_cpu_s": daemon_cpu}


def timed_snapshot(client: Any, step: int, state: dict[str, Any]) -> dict[str, Any]:
    """Snapshot ``step`` and wait until it is restorable: monotonic stamps of the start,
    the return of ``snapshot()``, the seal and restorability."""
    t0 = time.monotonic()
    h = client.snapshot(step, state)
    t1 = time.monotonic()
    if h.skipped:
        raise RuntimeError(f"step {step} was skipped: the previous one is not restorable")
    h.wait()
    t2 = time.monotonic()
    client.wait(restorable=True, timeout=STEP_TIMEOUT_S)
    t3 = time.monotonic()
    return {"step": step, "start": t0, "called": t1, "sealed": t2, "restorable": t3}


def rebuild_and_restore(sock: str, spec: dict[str, Any], rank: int, state: dict[str, Any]
                        ) -> dict[str, Any]:
    """Time ``sg.connect`` (the replacement node rebuilds inside it) and ``restore()``."""
    lost = rank == spec["lost"]
    daemon = psutil.Process(status(sock).pid)
    dist.barrier()
    cpu0, faults0 = cpu_s(daemon), minor_faults(daemon)
    t0 = time.monotonic()
    client = sg.connect(sock, spec["job"], group_size=GROUP_SIZE, parity=PARITY)
    t1 = time.monotonic()
    daemon_cpu, daemon_faults = cpu_s(daemon) - cpu0, minor_faults(daemon) - faults0
    try:
        dist.barrier()
        t2 = time.monotonic()
        # Only the lost rank's restore is measured and checked; the others take part in
        # the collective restore onto the meta device, which copies nothing.
        step, got = client.restore(map_location=None if lost else "meta")
        t3 = time.monotonic()
        ok = same_state(got, state) if lost else None
        del got
        # The first snapshot after the rebuild: on the replacement node it writes the
        # arena's other slot, which the daemon prepares only once the restore is done.
        state["step"] = step + 1
        dist.barrier()
        nxt = timed_snapshot(client, step + 1, state)
    finally:
        client.close()
    return {"rank": rank, "connect_s": t1 - t0, "restore_s": t3 - t2, "step": step, "verified": ok,
            "daemon_cpu_s": daemon_cpu, "daemon_minor_faults": daemon_faults,
            "next_step": step + 1,
            "next_snapshot": {f"{k}_s": nxt[k] - nxt["start"]
                              for k in ("called", "sealed", "restorable")}}


def status(sock: str) -> pb.StatusReply:
    with grpc.insecure_channel(grpc_target(sock)) as ch:
        return pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=10)


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def minor_faults(proc: psutil.Process) -> int:
    """The process's minor page faults so far (/proc/PID/stat field 10): a fault on a page
    that is new to it, which the kernel clears before the first write."""
    with open(f"/proc/{proc.pid}/stat", encoding="ascii") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])


# ------------------------------------------------------------ loopback floor


def zmq_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-node bandwidth of ZeroMQ PUSH/PULL on 127.0.0.1 in ``FRAME_BYTES`` frames.

    ``pair``: one process sends ``bytes`` to another. ``all``: ``nodes`` processes
    each send ``bytes`` split evenly among the others while receiving as much, one
    ZeroMQ context (one I/O thread) per process, as a daemon has. Frames are sent
    zero-copy from pre-faulted memory and received zero-copy, then dropped.
    """
    ctx = multiprocessing.get_context("fork")
    n = 2 if spec["pattern"] == "pair" else spec["nodes"]
    dests = {0: [1], 1: []} if spec["pattern"] == "pair" else \
        {i: [j for j in range(n) if j != i] for i in range(n)}
    per_dest = {i: spec["bytes"] // len(d) // FRAME_BYTES * FRAME_BYTES if d else 0
                for i, d in dests.items()}
    expect = {j: sum(per_dest[i] for i in range(n) if j in dests[i]) for j in range(n)}
    ports = ctx.Array("i", n)
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_zmq_peer, args=(i, dests[i], per_dest[i], expect[i], ports,
                                                 barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    stamps = [results.get(timeout=PEER_TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a ZeroMQ peer failed: exit codes {[p.exitcode for p in procs]}")
    wall = max(s["end"] for s in stamps) - min(s["start"] for s in stamps)
    sent = max(per_dest[i] * len(dests[i]) for i in range(n))
    return {"pattern": spec["pattern"], "processes": n, "bytes_per_node": sent, "wall_s": wall,
            "gbps_per_node": gbps(sent, wall), "cpu_s_per_node": max(s["cpu_s"] for s in stamps)}


def _zmq_peer(i: int, dests: list[int], per_dest: int, expect: int, ports: Any,
              barrier: Any, results: Any) -> None:
    keep_frame_memory()  # the allocator settings the daemon's data plane runs with
    zctx = zmq.Context()
    pull = zctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    ports[i] = pull.bind_to_random_port("tcp://127.0.0.1")
    barrier.wait()
    pushes = []
    for j in dests:
        s = zctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(f"tcp://127.0.0.1:{ports[j]}")
        pushes.append(s)
    src = np.ones(min(per_dest, 64 * MiB) or FRAME_BYTES, dtype=np.uint8)  # every page written
    frames = [memoryview(src[o:o + FRAME_BYTES]) for o in range(0, len(src), FRAME_BYTES)]

    def send() -> None:
        for f in range(per_dest // FRAME_BYTES):
            for s in pushes:  # round robin: every destination is served at once
                s.send(frames[f % len(frames)], copy=False)

    barrier.wait()
    t0, cpu0 = time.monotonic(), time.process_time()
    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while got < expect:
        got += len(pull.recv(copy=False))
    sender.join()
    t1 = time.monotonic()
    # Until everyone has received, this process's I/O thread may still be sending: count its CPU.
    barrier.wait()
    results.put({"node": i, "start": t0, "end": t1, "got": got, "cpu_s": time.process_time() - cpu0})
    for s in pushes:
        s.close()
    pull.close(linger=0)
    zctx.term()


# ------------------------------------------------------------- orchestration


class Bench:
    """One run: a scratch directory, a cluster in it, and launched jobs; all torn down by close()."""

    def __init__(self, gib: float) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sg-bench-cluster-")
        self.root = os.path.join(self.tmp, "cluster")
        self.sizes = tensor_sizes(int(gib * GiB) // 4096 * 4096)
        self.spec: cluster.ClusterSpec | None = None
        self._jobs = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- cluster

    def up(self) -> None:
        self.spec = cluster.up(self.root, NODES, GROUP_SIZE, PARITY)

    def sockets(self) -> list[str]:
        return cluster.sockets(self.root)

    def daemon_log(self, node: int) -> str:
        assert self.spec is not None
        return Path(self.spec.node_dir(self.root, node), "daemon.log").read_text(errors="replace")

    def shm_leftovers(self) -> list[str]:
        """This cluster's files still in /dev/shm (after close(), there should be none)."""
        if self.spec is None:
            return []
        return sorted(p for p in os.listdir(cluster.SHM_DIR) if p.startswith(self.spec.prefix))

    # -- jobs

    def launch(self, mode: str, **spec: Any) -> Any:
        """Run a launcher subprocess for ``mode``; its result (JSON), or RuntimeError with its log."""
        self._jobs += 1
        base = os.path.join(self.tmp, f"job{self._jobs}-{mode}")
        full = {"mode": mode, "out": base + ".out.json", "rdzv": base + ".rdzv", "job": JOB,
                "world": NODES, "sizes": self.sizes, "seed": SEED, **spec}
        Path(base + ".spec.json").write_text(json.dumps(full), encoding="utf-8")
        with open(base + ".log", "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--job-spec", base + ".spec.json"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = self._proc.wait(JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = f"none: killed after {JOB_TIMEOUT_S:.0f} s"
        finally:
            self._reap_job()
        if rc != 0 or not os.path.exists(full["out"]):
            tail = Path(base + ".log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{mode} job failed (exit {rc}):\n{tail}")
        return json.loads(Path(full["out"]).read_text(encoding="utf-8"))

    def _reap_job(self) -> None:
        """Kill the launcher's whole session: a rank left behind would hold its arena."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def close(self, keep_logs: bool = False) -> None:
        """Stop everything; ``keep_logs`` leaves the scratch directory (daemon and job logs)."""
        self._reap_job()
        try:
            if self.spec is not None:
                cluster.down(self.root)
        finally:
            if keep_logs:
                print(f"logs kept in {self.tmp}", file=sys.stderr)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)


def slot_payloads(sockets: list[str]) -> list[int]:
    """Each node's payload for the restorable step: the data bytes of its rank's slot.

    The manifest after the data (a few KiB) is left out: it moves P by under 0.01%.
    """
    out = []
    for sock in sockets:
        job = next(j for j in status(sock).jobs if j.job == JOB)
        step = job.restorable_step
        out.append(sum(s.data_bytes for r in job.ranks for s in r.slots
                       if s.step == step and s.state == "restorable"))
    return out


# ---------------------------------------------------------------- the phases


def measure_bandwidth(bench: Bench, nbytes: int, repeat: int,
                      runs: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Median per-node loopback bandwidth, pair and all-to-all, interleaved rounds; with
    ``runs``, the rounds of an earlier call count too (the floor is measured before and
    after the snapshot steps, so that it sees the machine they saw)."""
    runs = runs if runs is not None else {"pair": [], "all": []}
    for _ in range(repeat):
        for pattern in runs:
            runs[pattern].append(bench.launch("zmq", pattern=pattern, nodes=NODES, bytes=nbytes))
    return {p: {"gbps_per_node": statistics.median(r["gbps_per_node"] for r in rs),
                "best_gbps_per_node": max(r["gbps_per_node"] for r in rs),
                "bytes_per_node": rs[0]["bytes_per_node"], "processes": rs[0]["processes"],
                "cpu_s_per_gb": statistics.median(r["cpu_s_per_node"] for r in rs)
                / (rs[0]["bytes_per_node"] / 1e9),
                "runs_gbps": [round(r["gbps_per_node"], 3) for r in rs]}
            for p, rs in runs.items()}


def measure_snapshots(bench: Bench, steps: int, warmup: int) -> dict[str, Any]:
    """Per step, over the ranks: time to the last seal and to the last rank seeing it restorable."""
    per_rank = bench.launch("snapshot", sockets=bench.sockets(), steps=steps, warmup=warmup)
    rows = []
    for i in range(warmup + steps):
        s = [r["steps"][i] for r in per_rank]
        start = min(x["start"] for x in s)
        rows.append({"step": s[0]["step"], "warmup": i < warmup,
                     "total_s": max(x["restorable"] for x in s) - start,
                     "sealed_s": max(x["sealed"] for x in s) - start,
                     "protect_s": max(x["restorable"] for x in s) - max(x["sealed"] for x in s),
                     "call_s": max(x["called"] - x["start"] for x in s)})
    timed = [r for r in rows if not r["warmup"]]
    med = {k: statistics.median(r[k] for r in timed) for k in ("total_s", "sealed_s", "protect_s",
                                                               "call_s")}
    return {"steps": rows, "median": med,
            "daemon_cpu_s_per_step": [r["daemon_cpu_s"] / steps for r in per_rank]}


def transfer_floor(payloads: list[int]) -> dict[str, Any]:
    """Bytes each node sends and receives per step, and what a rebuild must fetch."""
    grp = placement.plan(NODES, GROUP_SIZE, PARITY).groups[0]
    p = placement.piece_size(payloads, grp.k)
    loads = [grp.load(pos, p) for pos in range(grp.g)]
    return {"payload_bytes": payloads, "k": grp.k, "m": grp.m, "piece_bytes": p,
            "sent_bytes_per_node": max(ld.sent_bytes for ld in loads),
            "received_bytes_per_node": max(ld.received_bytes for ld in loads),
            # Every stripe lost one piece with the node; each is decoded from k others.
            "rebuild_fetch_bytes": grp.g * grp.k * p}


def measure_rebuilds(bench: Bench, count: int, step: int) -> list[dict[str, Any]]:
    """Lose nodes 1, 2, 3, 1, ... in turn; each time relaunch the job and time the rebuild."""
    out = []
    for i in range(count):
        lost = 1 + i % (NODES - 1)
        before = bench.daemon_log(lost).count(REBUILT_LINE.format(rank=lost))
        cluster.kill(bench.root, lost)
        cluster.start(bench.root, lost)
        per_rank = bench.launch("rebuild", sockets=bench.sockets(), lost=lost)
        mine = per_rank[lost]
        logged = bench.daemon_log(lost).count(REBUILT_LINE.format(rank=lost)) - before
        if mine["step"] != step or not mine["verified"] or logged != 1:
            raise RuntimeError(f"rebuild of node {lost} not confirmed: restored step "
                               f"{mine['step']} (want {step}), state equal {mine['verified']}, "
                               f"'rebuilt ranks' lines {logged}")
        step = mine["next_step"]  # the next rebuild restores the snapshot taken after this one
        out.append({"lost": lost, "connect_s": mine["connect_s"], "restore_s": mine["restore_s"],
                    "daemon_cpu_s": mine["daemon_cpu_s"],
                    "daemon_minor_faults": mine["daemon_minor_faults"],
                    "next_snapshot": mine["next_snapshot"],
                    "other_connect_s": [r["connect_s"] for r in per_rank if r["rank"] != lost],
                    "log": _rebuilt_line(bench.daemon_log(lost), lost),
                    "load_average": load_average()})
        nxt = mine["next_snapshot"]
        print(f"  rebuild {i + 1}/{count}: node {lost}, connect {mine['connect_s']:.2f} s, "
              f"restore {mine['restore_s']:.2f} s; the next snapshot there: sealed "
              f"{nxt['sealed_s']:.2f} s, restorable {nxt['restorable_s']:.2f} s (loadavg "
              f"{load_average()})", flush=True)
    return out


def _rebuilt_line(log: str, rank: int) -> str:
    lines = [ln for ln in log.splitlines() if REBUILT_LINE.format(rank=rank) in ln]
    return re.sub(r"\s+", " ", lines[-1]) if lines else ""


def measure_torch_load(sizes: list[int], rank: int, disk: str, repeat: int) -> dict[str, Any]:
    """``torch.load`` of the rank's state from local disk: warm, and just after write + fsync."""
    buf = shared_buffer(sum(sizes), SEED)
    state = rank_state(buf, rank, sizes)
    # Own storage per tensor, as the trainer's tensors have: a view would save all of buf.
    state = {"tensors": {k: v.clone() for k, v in state["tensors"].items()}, "step": 0}
    del buf
    path = os.path.join(disk, f"rank{rank}.pt")

    def write(fsync: bool) -> None:
        with open(path, "wb") as fh:
            torch.save(state, fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if fsync:
            fd = os.open(disk, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load() -> None:
        got = torch.load(path, weights_only=True)
        del got  # freed inside the timing, as a restore's result would be replaced

    write(False)
    got = torch.load(path, weights_only=True)
    ok = same_state(got, state)
    del got
    warm = median_time(load, repeat, warmup=0)
    fresh = []
    for _ in range(repeat):
        write(True)
        t0 = time.perf_counter()
        load()
        fresh.append(time.perf_counter() - t0)
    return {"bytes": os.path.getsize(path), "warm_s": warm, "after_fsync_s": statistics.median(fresh),
            "after_fsync_runs_s": fresh, "verified": ok}


# ------------------------------------------------------------------ reporting


def report(res: dict[str, Any]) -> None:
    fl, bw, sn = res["floor"], res["bandwidth"], res["snapshot"]["median"]
    sent = fl["sent_bytes_per_node"]
    floors = {"pair": sent / (bw["pair"]["gbps_per_node"] * 1e9),
              "all": sent / (bw["all"]["gbps_per_node"] * 1e9)}
    print(f"\nbench_cluster: {NODES} nodes, group {GROUP_SIZE}, parity {PARITY} (k={fl['k']}), 1 rank "
          f"per node, {res['state']['bytes_per_rank'] / GiB:.3f} GiB per rank in "
          f"{res['state']['tensors']} tensors of {res['state']['smallest'] / MiB:.0f}-"
          f"{res['state']['largest'] / MiB:.0f} MiB")
    print(f"piece P = {fl['piece_bytes'] / MiB:.1f} MiB; each node sends (k+m-1)*P = {sent / MiB:.0f} MiB "
          f"per step and receives {fl['received_bytes_per_node'] / MiB:.0f} MiB")
    print(f"ZeroMQ {FRAME_BYTES >> 20} MiB frames on 127.0.0.1, GB/s per node (median of "
          f"{len(bw['pair']['runs_gbps'])}): "
          f"1 pair {bw['pair']['gbps_per_node']:.2f} {bw['pair']['runs_gbps']}, "
          f"{NODES} all-to-all {bw['all']['gbps_per_node']:.2f} {bw['all']['runs_gbps']}")

    def row(name: str, s: float) -> dict[str, Any]:
        return {"name": name, "ms": s * 1e3, "r_pair": s / floors["pair"], "r_all": s / floors["all"]}

    rows = [row("floor: 1 pair alone (optimistic)", floors["pair"]),
            row(f"floor: {NODES} nodes all-to-all (fair)", floors["all"]),
            row("snapshot -> restorable (issue metric)", sn["total_s"]),
            row("  of which snapshot -> all sealed (copy)", sn["sealed_s"]),
            row("  of which sealed -> restorable (protect)", sn["protect_s"]),
            row("  snapshot() call itself", sn["call_s"])]
    print_rows(rows, [("name", "snapshot to restorable, median of steps", "{}"), ("ms", "ms", "{:.0f}"),
                      ("r_all", "/ fair floor", "{:.2f}x"), ("r_pair", "/ pair floor", "{:.2f}x")],
               title=f"latency per step vs the loopback transfer floor ({res['config']['steps']} steps; "
                     f"issue target: within 2x)")
    cpu = res["snapshot"]["daemon_cpu_s_per_step"]
    per_gb = statistics.mean(cpu) / (sent / 1e9)
    print(f"CPU per node and GB sent: daemons {per_gb:.2f} s/GB (per step: "
          f"{', '.join(f'{c:.2f}' for c in cpu)} s), ZeroMQ floor all-to-all "
          f"{bw['all']['cpu_s_per_gb']:.2f} s/GB, pair {bw['pair']['cpu_s_per_gb']:.2f} s/GB "
          f"({res['machine_cores']} cores: with the machine busy, latency follows CPU)")

    tl, rb = res["torch_load"], res["rebuild"]
    connect = statistics.median(r["connect_s"] for r in rb)
    restore = statistics.median(r["restore_s"] for r in rb)
    both = statistics.median(r["connect_s"] + r["restore_s"] for r in rb)
    fetch_floor = rebuild_floor_s(res)
    nbytes = res["state"]["bytes_per_rank"]

    def rrow(name: str, s: float) -> dict[str, Any]:
        return {"name": name, "ms": s * 1e3, "gbps": gbps(nbytes, s), "floor": s / fetch_floor,
                "vs": s / tl["warm_s"], "vs_fsync": s / tl["after_fsync_s"]}

    rrows = [rrow(f"rebuild fetch floor: {fl['rebuild_fetch_bytes'] / MiB:.0f} MiB at best 1-pair GB/s",
                  fetch_floor),
             rrow("shardguard rebuild (sg.connect on the new node)", connect),
             rrow("shardguard restore() after it", restore),
             rrow("shardguard rebuild + restore", both),
             rrow("torch.load, disk, warm page cache", tl["warm_s"]),
             rrow("torch.load, disk, just written + fsynced", tl["after_fsync_s"])]
    print_rows(rrows, [("name", "one lost node, one rank's state", "{}"), ("ms", "ms", "{:.0f}"),
                       ("floor", "/ fetch floor", "{:.2f}x"),
                       ("gbps", "GB/s of state", "{:.2f}"), ("vs", "/ torch.load warm", "{:.2f}x"),
                       ("vs_fsync", "/ after fsync", "{:.2f}x")],
               title=f"rebuild of one lost node, median of {len(rb)} (nodes {[r['lost'] for r in rb]}); "
                     f"torch.load median of {res['config']['repeat']}; issue target: rebuild within 2x "
                     f"its fetch floor")
    print(f"rebuild: {connect * 1e3:.0f} ms, fetch floor {fetch_floor * 1e3:.0f} ms "
          f"({fl['rebuild_fetch_bytes'] / MiB:.0f} MiB: k={fl['k']} pieces of {fl['piece_bytes'] / MiB:.1f} MiB "
          f"for each of the {fl['rebuild_fetch_bytes'] // (fl['k'] * fl['piece_bytes'])} lost pieces, at "
          f"{pair_floor_gbps(res):.2f} GB/s, the best 1-pair sample), ratio {connect / fetch_floor:.2f}x; per run: "
          f"{[round(r['connect_s'] / fetch_floor, 2) for r in rb]}")
    print("(torch.load: nothing was dropped from the page cache, so both rows read memory, not the disk;\n"
          f" the other ranks' connect during a rebuild: {[r['other_connect_s'] for r in rb]})")
    print(f"replacement daemon CPU during the rebuild: {[round(r['daemon_cpu_s'], 2) for r in rb]} s, "
          f"minor page faults {[r['daemon_minor_faults'] for r in rb]}; "
          f"daemon log: {rb[-1]['log']}")
    nxt = [r["next_snapshot"] for r in rb if "next_snapshot" in r]
    if nxt:
        print(f"the first snapshot after each rebuild, on the replacement node: snapshot() "
              f"{[round(n['called_s'] * 1e3) for n in nxt]} ms, sealed "
              f"{[round(n['sealed_s'] * 1e3) for n in nxt]} ms, restorable "
              f"{[round(n['restorable_s'] * 1e3) for n in nxt]} ms")
    print(f"load average: {res['load_average']}")


def rebuild_floor_s(res: dict[str, Any]) -> float:
    """The rebuild's transfer floor: the bytes the replacement node must fetch (``k``
    pieces for each lost piece) at the loopback bandwidth of one ZeroMQ pair, its best
    sample: on 2 cores the pair's rate jumps between ~1.8 and ~4.2 GB/s from sample to
    sample (2026-12-05), and a median that lands on the low mode flattered the rebuild."""
    return res["floor"]["rebuild_fetch_bytes"] / (pair_floor_gbps(res) * 1e9)


def pair_floor_gbps(res: dict[str, Any]) -> float:
    return float(res["bandwidth"]["pair"]["best_gbps_per_node"])


# ----------------------------------------------------------------------- main


def memory_needed(gib: float) -> tuple[int, int]:
    """Peak bytes in shared memory (two slots per rank, parity of two steps) and in all
    (that, plus the launcher's buffer, one restored state and the rebuild's buffers)."""
    per_rank = gib * GiB
    shm = per_rank * NODES * (2 + 2 * PARITY / (GROUP_SIZE - PARITY))
    return int(shm), int(shm + per_rank * (1 + 1 + 3))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=None, help="state per rank (default 1, quick 0.125)")
    parser.add_argument("--steps", type=int, default=None, help="timed snapshot steps (default 5, quick 3)")
    parser.add_argument("--rebuilds", type=int, default=None, help="nodes lost and rebuilt (default 2, quick 1)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where torch.save writes")
    parser.add_argument("--job-spec", help=argparse.SUPPRESS)  # internal: run a launcher
    args = parser.parse_args()
    if args.job_spec:
        job_main(args.job_spec)
        return

    gib = args.gib or (0.125 if args.quick else 1.0)
    steps = args.steps or (3 if args.quick else 5)
    repeat = args.repeat or 3
    rebuilds = args.rebuilds or (1 if args.quick else 2)
    need_shm, need = memory_needed(gib)
    avail, shm_free = psutil.virtual_memory().available, shutil.disk_usage(cluster.SHM_DIR).free
    if need > avail or need_shm > shm_free:
        sys.exit(f"bench_cluster: --gib {gib:g} needs about {need / GiB:.1f} GiB of memory, "
                 f"{need_shm / GiB:.1f} GiB of it in {cluster.SHM_DIR}; {avail / GiB:.1f} GiB are "
                 f"available, {shm_free / GiB:.1f} GiB free in {cluster.SHM_DIR}")
    kind = fs_type(args.disk_dir)
    if kind in ("tmpfs", "ramfs"):
        print(f"warning: --disk-dir {args.disk_dir} is on {kind}; torch.load will not read a disk")

    signal.signal(signal.SIGTERM, raise_interrupt)
    t_start = time.monotonic()
    load: dict[str, Any] = {"start": load_average()}
    bench = Bench(gib)
    print(f"bench_cluster: {gib:g} GiB per rank x {NODES} nodes, {steps} steps, {rebuilds} rebuild(s), "
          f"scratch {bench.tmp}, disk {args.disk_dir} ({kind})", flush=True)
    leftovers: list[str] = []
    ok = False
    try:
        bw_bytes = max(BANDWIDTH_MIN_BYTES, int(gib * GiB) // FRAME_BYTES * FRAME_BYTES)
        bw_runs: dict[str, list[dict[str, Any]]] = {"pair": [], "all": []}
        measure_bandwidth(bench, bw_bytes, repeat, bw_runs)
        load["after_bandwidth"] = load_average()
        print(f"  loopback measured (loadavg {load['after_bandwidth']})", flush=True)
        bench.up()
        # Two untimed steps: a node's parity files are new at the first two steps and
        # reused from a pool from the third on (daemon/storage/pieces.py).
        snap = measure_snapshots(bench, steps, warmup=WARMUP_STEPS)
        load["after_snapshots"] = load_average()
        print(f"  snapshots done (loadavg {load['after_snapshots']})", flush=True)
        bw = measure_bandwidth(bench, bw_bytes, repeat, bw_runs)  # the daemons idle meanwhile
        load["after_bandwidth_2"] = load_average()
        floor = transfer_floor(slot_payloads(bench.sockets()))
        last_step = snap["steps"][-1]["step"]
        rb = measure_rebuilds(bench, rebuilds, last_step)
        load["after_rebuilds"] = load_average()
        ok = True
    finally:
        bench.close(keep_logs=not ok)
        leftovers = bench.shm_leftovers()
        if leftovers:
            print(f"warning: left in {cluster.SHM_DIR}: {leftovers}", file=sys.stderr)
    # With the cluster down, so that the daemons' memory and threads are out of the way.
    disk = tempfile.mkdtemp(prefix="sg-bench-cluster-", dir=args.disk_dir)
    try:
        tl = measure_torch_load(bench.sizes, rb[0]["lost"], disk, repeat)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    if not tl["verified"]:
        raise RuntimeError("torch.load returned a different state")
    load["end"] = load_average()

    sizes = bench.sizes
    res = {
        "config": {"gib": gib, "steps": steps, "warmup_steps": WARMUP_STEPS, "repeat": repeat, "rebuilds": rebuilds,
                   "nodes": NODES, "group_size": GROUP_SIZE, "parity": PARITY, "quick": args.quick,
                   "disk_dir": args.disk_dir, "disk_fs": kind, "frame_bytes": FRAME_BYTES},
        "state": {"bytes_per_rank": sum(sizes), "tensors": len(sizes), "smallest": min(sizes),
                  "largest": max(sizes)},
        "machine_cores": len(os.sched_getaffinity(0)),
        "bandwidth": bw, "floor": floor, "snapshot": snap, "rebuild": rb, "torch_load": tl,
        "shm_leftovers": leftovers, "load_average": load,
    }
    fetch_floor = rebuild_floor_s(res)
    connect = statistics.median(r["connect_s"] for r in rb)
    res["rebuild_vs_floor"] = {"rebuild_s": connect, "fetch_floor_s": fetch_floor,
                               "ratio": connect / fetch_floor,
                               "fetch_bytes": floor["rebuild_fetch_bytes"],
                               "pair_gbps": bw["pair"]["best_gbps_per_node"],
                               "ratios": [r["connect_s"] / fetch_floor for r in rb]}
    report(res)
    res["elapsed_s"] = time.monotonic() - t_start
    print(f"\ntotal {res['elapsed_s']:.0f} s")
    write_results("cluster" + ("_quick" if args.quick else ""), res)


if __name__ == "__main__":
    main()
