"""DDP with a bit-exact resume: the step time it costs, against plain DDP and the alternative.

``--ranks`` gloo ranks on this machine each train the same MLP under
``DistributedDataParallel`` (several gradient buckets), one wrapper per way, in
interleaved rounds (each round runs ``--steps`` steps of every way in turn, so a busy
neighbour slows every way of a round alike):

- ``plain DDP``: forward, backward, ``optimizer.step()``; nothing else (the baseline);
- ``DDP + snapshot``: plus ``client.snapshot()`` of model, optimizer and RNG every step
  (``client.protect(optimizer)``), the resume that is not bit-exact at 3+ ranks;
- ``DDP + snapshot + ddp_state``: the same snapshot holding ``sg.ddp_state(ddp)`` too,
  which makes the resume bit-exact (``shardguard.client.ddp``);
- ``DDP find_unused_parameters=True``: the other way to a bit-exact resume (DDP never
  rebuilds its buckets), without snapshots: a graph traversal every step.

Per way: the median over rounds of the slowest rank's time per step, and the median
over rounds of its ratio to plain DDP in the same round. Separately, the cost of one
``ddp_state()`` call once the buckets are rebuilt (a cache lookup), median of many.

Usage: ``python bench/bench_ddp.py [--quick] [--ranks N] [--repeat N] [--steps N]``
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import base_parser, load_average, print_table, raise_interrupt, write_results
from bench_node import bench_daemon
from torch.nn.parallel import DistributedDataParallel

import shardguard.client as sg

BASELINE = "plain DDP"
WAYS = (BASELINE, "DDP + snapshot", "DDP + snapshot + ddp_state",
        "DDP find_unused_parameters=True")
STATE_CALLS = 2000


@dataclass(frozen=True)
class Config:
    socket: str
    job: str
    ranks: int
    repeat: int
    steps: int
    width: int
    layers: int
    batch: int
    bucket_cap_mb: float
    store_port: int
    out: str


class Way:
    """One DDP wrapper (its own model copy and optimizer) and what it adds to a step."""

    def __init__(self, name: str, conf: Config, rank: int) -> None:
        self.name = name
        torch.manual_seed(0)
        # Many small parameters, as a transformer has: the graph find_unused_parameters
        # walks every step is as long as the model is deep.
        layers: list[torch.nn.Module] = []
        for _ in range(conf.layers):
            layers += [torch.nn.Linear(conf.width, conf.width), torch.nn.LayerNorm(conf.width),
                       torch.nn.GELU()]
        self.model = torch.nn.Sequential(*layers)
        self.ddp = DistributedDataParallel(self.model, bucket_cap_mb=conf.bucket_cap_mb,
                                           find_unused_parameters="find_unused" in name)
        self.opt = torch.optim.AdamW(self.ddp.parameters(), lr=1e-3)
        self.x = torch.randn(conf.batch, conf.width)
        self.client = None
        self.keep_ddp = name.endswith("ddp_state")
        if "snapshot" in name:
            self.client = sg.connect(conf.socket, f"{conf.job}-{WAYS.index(name)}")
            self.client.protect(self.opt)
        self.step_no = 0
        self.taken = 0

    def step(self) -> None:
        loss = self.ddp(self.x).square().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.client is not None:
            state = {"model": self.model.state_dict(), "optim": self.opt.state_dict(),
                     "rng": sg.rng_state(), "step": self.step_no}
            if self.keep_ddp:
                state["ddp"] = sg.ddp_state(self.ddp)
            self.taken += not self.client.snapshot(self.step_no, state).skipped
        self.step_no += 1

    def close(self) -> None:
        if self.client is not None:
            self.client.wait()
            self.client.close()


def rank_main(rank: int, conf: Config) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", conf.store_port, conf.ranks, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=conf.ranks)
    ways = [Way(name, conf, rank) for name in WAYS]
    for w in ways:  # warm up: allocations, DDP's bucket rebuild, the snapshot plan
        for _ in range(3):
            w.step()
    times: dict[str, list[float]] = {w.name: [] for w in ways}
    for _ in range(conf.repeat):
        for w in ways:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(conf.steps):
                w.step()
            times[w.name].append(_max((time.perf_counter() - t0) / conf.steps))
    state_call_s = _ddp_state_call_s(ways[2].ddp)
    taken = {w.name: w.taken for w in ways}
    for w in ways:
        w.close()
    n_buckets = len(sg.ddp_state(ways[2].ddp)["bucket_lengths"])
    n_params = sum(p.numel() for p in ways[0].model.parameters())
    if rank == 0:
        Path(conf.out).write_text(json.dumps({
            "times": times, "ddp_state_call_s": state_call_s, "taken": taken,
            "buckets": n_buckets, "parameters": n_params}))
    dist.destroy_process_group()


def _ddp_state_call_s(ddp: DistributedDataParallel) -> float:
    sg.ddp_state(ddp)
    t0 = time.perf_counter()
    for _ in range(STATE_CALLS):
        sg.ddp_state(ddp)
    return (time.perf_counter() - t0) / STATE_CALLS


def _max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def report(raw: dict[str, Any], conf: Config) -> list[dict[str, Any]]:
    times = raw["times"]
    base = times[BASELINE]
    rows = []
    for name in WAYS:
        ratios = [t / b for t, b in zip(times[name], base)]
        rows.append({"name": name, "step_ms": 1e3 * statistics.median(times[name]),
                     "vs_plain": statistics.median(ratios),
                     "snapshots_taken": raw["taken"][name]})
    print_table(rows, BASELINE, columns=["step_ms"],
                title=f"DDP, {conf.ranks} gloo ranks, {raw['parameters'] / 1e6:.1f} M parameters "
                      f"in {raw['buckets']} buckets, median of {conf.repeat} rounds x "
                      f"{conf.steps} steps (ms per step; base/row: plain DDP's time over "
                      "the row's)")
    print("\nwithin-round ratio to plain DDP (median over rounds; 1.00 = no cost):")
    for r in rows:
        print(f"  {r['name']:<34} {r['vs_plain']:6.3f}x   snapshots taken {r['snapshots_taken']}")
    share = statistics.median(k / s for k, s in zip(times[WAYS[2]], times[WAYS[1]]))
    rows[2]["vs_snapshot"] = share
    print(f"  {WAYS[2]} over {WAYS[1]}: {share:6.3f}x (what keeping the bucket order adds)")
    print(f"\nddp_state() once the buckets are rebuilt: {1e6 * raw['ddp_state_call_s']:.2f} us a "
          f"call (median step of plain DDP: {rows[0]['step_ms']:.1f} ms)")
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=None, help="gloo ranks (default 4, quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per way per round "
                        "(default 20, quick 8)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    load_start = load_average()
    ranks = args.ranks or (3 if args.quick else 4)
    # The rendezvous store binds port 0 here; the ranks connect to the port it got.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="shardguard-bench-ddp-") as tmp, \
            bench_daemon(tmp, f"shardguard-bench-ddp{os.getpid()}") as (sock, _):
        conf = Config(socket=sock, job=f"bench-ddp-{os.getpid()}", ranks=ranks,
                      repeat=args.repeat or (3 if args.quick else 7),
                      steps=args.steps or (8 if args.quick else 20),
                      width=256, layers=24, batch=32, bucket_cap_mb=1.0,
                      store_port=store.port, out=os.path.join(tmp, "result.json"))
        print(f"bench_ddp: {conf.ranks} ranks, {conf.repeat} rounds of {conf.steps} steps, "
              f"load average {load_start}", flush=True)
        mp.start_processes(rank_main, args=(conf,), nprocs=conf.ranks, start_method="fork")
        raw = json.loads(Path(conf.out).read_text())
    rows = report(raw, conf)
    load_end = load_average()
    print(f"load average start {load_start} end {load_end} (other work on this machine "
          "shows up in every row)")
    write_results("ddp_quick" if args.quick else "ddp", {
        "config": {k: v for k, v in asdict(conf).items()
                   if k not in ("socket", "job", "store_port", "out")},
        "parameters": raw["parameters"], "buckets": raw["buckets"], "rows": rows,
        "ddp_state_call_s": raw["ddp_state_call_s"], "runs_s": raw["times"],
        "load_average": {"start": load_start, "end": load_end},
    })


if __name__ == "__main__":
    main()
