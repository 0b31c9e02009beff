"""The persistent tier: what flushing every K-th step to disk costs a training loop, against
the same loop with the tier off, and against the loop writing the same checkpoint itself
with ``dcp.save`` (what a trainer does without the tier).

One rank, a state of ``--gib`` GiB (fp32 tensors of 4-64 MiB), ``client.snapshot()``
every step after a fixed compute phase (a sleep: the host cores as a GPU trainer leaves
them). Three loops, each against its own daemon:

- tier off;
- tier on, every ``--every`` steps, into a directory on local disk;
- tier off, and ``dcp.save`` of the state (FileSystemWriter, fsynced) every ``--every``
  steps inside the loop.

Per loop: the median step, the extra time per step against the tier-off loop, the
snapshot call (median and max: a ``begin`` that waited for the tier's staging copy shows
here; the first call, which plans the layout, is left out), snapshots taken (a step is
skipped while the previous snapshot is still being copied). Per flush, from the daemon's
log: the staging copy (the only time the tier holds slots), its GB/s, and the flusher's
write (process start and torch import included). The tier-on and dcp.save loops compete
with their writer for the machine's cores; the compute phase does not.

Usage: ``python bench/bench_tier.py [--quick] [--gib G] [--steps N] [--every K] [--compute-s S]``
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import grpc
import torch
import torch.distributed.checkpoint as dcp
from _common import base_parser, gbps, load_average, print_rows, write_results
from torch.distributed.checkpoint import FileSystemWriter

import shardguard.client as sg
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target

_WRITTEN = re.compile(r"ranks \[[\d, ]*\] written: (\d+) bytes, staged in ([\d.]+)s, "
                      r"written in ([\d.]+)s")


@contextlib.contextmanager
def daemon(work: Path, extra: list[str]) -> Iterator[tuple[str, Path]]:
    """A daemon of its own (socket, shm prefix, log), stopped and its memory freed after."""
    work.mkdir(parents=True)
    sock, log, prefix = str(work / "agent.sock"), work / "daemon.log", f"sg-bench-{os.getpid()}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shardguard.daemon", "--socket", sock,
                                 "--shm-prefix", prefix, *extra], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {log.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(grpc_target(sock)) as ch:
                    pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.05)
        yield sock, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for path in glob.glob(f"/dev/shm/{prefix}.*"):
            os.unlink(path)


def make_state(gib: float) -> dict[str, Any]:
    total, out, i = int(gib * 2**30), {}, 0
    g = torch.Generator().manual_seed(0)
    while total > 0:
        n = min(total, (4 << 20) * (1 << (i % 5))) // 4
        out[f"w{i}"] = torch.randn(n, generator=g)
        total -= n * 4
        i += 1
    return {"model": out, "step": 0}


def run_loop(sock: str, job: str, state: dict[str, Any], steps: int, compute_s: float,
             every: int, dcp_dir: Path | None = None) -> dict[str, Any]:
    step_s, call_s, taken = [], [], 0
    with sg.connect(sock, job, tier_dir="") as client:
        for step in range(steps):
            t0 = time.perf_counter()
            time.sleep(compute_s)
            with torch.no_grad():
                state["model"]["w0"].add_(1.0)  # the optimizer's in-place update
            state["step"] = step
            c0 = time.perf_counter()
            taken += not client.snapshot(step, state).skipped
            call_s.append(time.perf_counter() - c0)
            if dcp_dir is not None and step % every == 0:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.save(state, storage_writer=FileSystemWriter(dcp_dir / f"step-{step}"),
                             no_dist=True)
            step_s.append(time.perf_counter() - t0)
        client.wait()
    return {"step_ms": statistics.median(step_s) * 1e3,
            "mean_step_ms": statistics.mean(step_s) * 1e3,
            # The first call plans the layout and grows the arena: not a steady-state step.
            "call_ms": statistics.median(call_s) * 1e3, "max_call_ms": max(call_s[1:]) * 1e3,
            "taken": taken, "steps": steps}


def flushes(log: Path, tier: Path, job: str) -> list[dict[str, float]]:
    """The flushes the daemon logged, once the last one has finished."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(p.name.endswith(".tmp")
                                              for p in (tier / job).glob("step-*")):
        time.sleep(0.2)
    out = []
    for m in _WRITTEN.finditer(log.read_text()):
        nbytes, staged, written = int(m.group(1)), float(m.group(2)), float(m.group(3))
        out.append({"bytes": nbytes, "staged_s": staged, "written_s": written,
                    "staging_gbps": gbps(nbytes, staged)})
    return out


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--compute-s", type=float, default=0.3)
    p.add_argument("--dir", default=None, help="where the tier and dcp.save write (local disk)")
    args = p.parse_args()
    gib = args.gib or (0.0625 if args.quick else 0.5)
    steps = args.steps or (20 if args.quick else 60)
    torch.set_num_threads(1)
    state = make_state(gib)
    nbytes = sum(t.numel() * 4 for t in state["model"].values())
    base = Path(tempfile.mkdtemp(prefix="sg-bench-tier-", dir=args.dir))
    rows, flushed = [], []
    try:
        with daemon(base / "off", []) as (sock, _):
            rows.append({"name": "tier off", **run_loop(sock, "off", state, steps,
                                                       args.compute_s, args.every)})
        tier = base / "tier"
        with daemon(base / "on", ["--tier-dir", str(tier), "--tier-every",
                                  str(args.every)]) as (sock, log):
            rows.append({"name": f"tier every {args.every}", **run_loop(
                sock, "on", state, steps, args.compute_s, args.every)})
            flushed = flushes(log, tier, "on")
        with daemon(base / "dcp", []) as (sock, _):
            (base / "dcp-out").mkdir()
            rows.append({"name": f"dcp.save every {args.every}", **run_loop(
                sock, "dcp", state, steps, args.compute_s, args.every, base / "dcp-out")})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for row in rows:
        row["extra_ms"] = row["mean_step_ms"] - rows[0]["mean_step_ms"]
    print_rows(rows, [("name", "loop", "{}"), ("step_ms", "step ms (median)", "{:.1f}"),
                      ("extra_ms", "extra ms/step (mean)", "{:+.1f}"),
                      ("call_ms", "snapshot call ms", "{:.2f}"),
                      ("max_call_ms", "max call ms", "{:.1f}"), ("taken", "snapshots", "{}")],
               title=f"one rank, {nbytes / 2**30:.2f} GiB, {args.compute_s * 1e3:.0f} ms compute "
                     f"per step, {steps} steps")
    print_rows([{"name": f"flush {i}", **f} for i, f in enumerate(flushed)],
               [("name", "", "{}"), ("staged_s", "staging s (slots held)", "{:.3f}"),
                ("staging_gbps", "staging GB/s", "{:.1f}"),
                ("written_s", "flusher write s", "{:.2f}")], title="tier flushes")
    write_results("tier_quick" if args.quick else "tier", {
        "config": {"gib": gib, "steps": steps, "every": args.every,
                   "compute_s": args.compute_s},
        "state_bytes": nbytes, "rows": rows, "flushes": flushed,
        "load_average": load_average()})


if __name__ == "__main__":
    main()
