"""The first restore in a new process: what a trainer restarted after a crash pays.

``bench_node.py`` times restores in interleaved rounds inside one process, where fresh
tensors may land on memory the process freed a round before (no new pages). A restarted
trainer has none: every fresh tensor is new memory, faulted in. Here each restore runs
in a process of its own against one node daemon holding a snapshot of an LLM-shaped
state (``bench_node.llm_state``), the ways in rotating order:

- ``restore()`` into fresh tensors;
- ``restore(into=state)`` into a state the process built first (model init: every
  page already written);
- ``restore(copy=False)``, the slot mapped copy-on-write;
- peer: ``torch.load`` of the same state from ``/dev/shm`` (``mmap=False``), fresh
  tensors like ``restore()``.

Each process first measures its floor, a 2-thread ``torch`` copy into memory already
faulted in; ratios are floor/restore (1.00x: memcpy bandwidth) and restore/torch.load
in the same round. Every shardguard restore checks CRC32C (the default).

Usage: ``python bench/bench_first_restore.py [--quick] [--gib G] [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from _common import base_parser, load_average, print_rows, write_results

WAYS = ("restore() fresh", "restore(into=state)", "restore(copy=False)", "torch.load /dev/shm")
JOB = "bench-first-restore"
SHM_PREFIX = "sg-bench-first-restore"


def child(sock: str, way: str, gib: float, path: str) -> dict[str, Any]:
    """One restore in this (new) process, and the floor measured here first."""
    import bench_node
    import shardguard.client as sg

    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8).fill_(0)
    floor = []
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        floor.append(time.perf_counter() - t)
    del src, dst
    # A state of the same shapes and other values (seed 6), as a restarted trainer builds.
    state = bench_node.llm_state(n, 6) if way == "restore(into=state)" else None
    if way == "torch.load /dev/shm":
        t = time.perf_counter()
        got = torch.load(path, weights_only=True)
        took = time.perf_counter() - t
        ok = _same(got, bench_node.llm_state(n, 5))
    else:
        c = sg.connect(sock, JOB)
        t = time.perf_counter()
        if state is not None:
            _, got = c.restore(into=state)
        else:
            _, got = c.restore(copy=way == "restore() fresh")
        took = time.perf_counter() - t
        ok = _same(got, bench_node.llm_state(n, 5))
        del got
        c.close()
    return {"way": way, "s": took, "floor_s": min(floor), "verified": ok}


def _same(got: Any, want: Any) -> bool:
    from bench_node import tensors_of

    return all(torch.equal(a, b) for a, b in zip(tensors_of(got), tensors_of(want), strict=True))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=None, help="state size (default 1, quick 0.125)")
    parser.add_argument("--rounds", type=int, default=None, help="rotating rounds (default 5, quick 2)")
    parser.add_argument("--child", nargs=4, metavar=("SOCK", "WAY", "GIB", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sock, way, gib, path = args.child
        print(json.dumps(child(sock, way, float(gib), path)))
        return
    import bench_node
    import shardguard.client as sg

    gib = args.gib or (0.125 if args.quick else 1.0)
    rounds = args.rounds or args.repeat or (2 if args.quick else 5)
    n = int(gib * 2**30)
    load_start = load_average()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, bench_node.bench_daemon(tmp, SHM_PREFIX) as (sock, _):
        state = bench_node.llm_state(n, 5)
        c = sg.connect(sock, JOB)
        c.snapshot(0, state).wait()
        c.close()
        path = os.path.join("/dev/shm", f"{SHM_PREFIX}.pt")
        torch.save(state, path)
        del state
        runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
        try:
            for r in range(rounds):
                order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
                for way in order:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", sock, way, str(gib), path],
                        capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        raise RuntimeError(f"{way}: exit {out.returncode}\n{out.stderr[-3000:]}")
                    d = json.loads(out.stdout.strip().splitlines()[-1])
                    runs[way].append(d)
                    print(f"  round {r + 1}/{rounds} {way:22s} {d['s'] * 1e3:8.1f} ms "
                          f"(floor {d['floor_s'] * 1e3:.1f} ms, verified {d['verified']})", flush=True)
        finally:
            os.unlink(path)
    peer = [d["s"] for d in runs["torch.load /dev/shm"]]
    rows = []
    for way, v in runs.items():
        rows.append({"name": way, "ms": statistics.median(d["s"] for d in v) * 1e3,
                     "x_floor": statistics.median(d["floor_s"] / d["s"] for d in v),
                     "x_load": statistics.median(d["s"] / p for d, p in zip(v, peer)),
                     "verified": all(d["verified"] for d in v)})
    print_rows(rows, [("name", "first restore in a new process", "{}"), ("ms", "ms", "{:.1f}"),
                      ("x_floor", "x floor bandwidth", "{:.2f}x"),
                      ("x_load", "/ torch.load", "{:.2f}x"), ("verified", "verified", "{}")],
               title=f"{gib:g} GiB LLM-shaped state, median of {rounds} rotating rounds, one "
                     f"process per restore (floor: its 2-thread memcpy into faulted memory)")
    print(f"\ntotal {time.monotonic() - t0:.0f} s, load average {load_start} -> {load_average()}")
    write_results("first_restore" + ("_quick" if args.quick else ""), {
        "config": {"gib": gib, "rounds": rounds}, "rows": rows, "runs": runs,
        "load_average": {"start": load_start, "end": load_average()}})


if __name__ == "__main__":
    main()
