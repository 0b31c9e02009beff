"""DCP into shardguard against DCP's own FileSystemWriter on local disk: time blocked, time until safe.

The state is shaped like an LLM's under FSDP2: fp32 parameters plus AdamW's two
moments, as DTensors sharded over the ranks (each rank saves its share), plus the
optimizer's step counters and hyperparameters. Every method saves the same
state in the same run, in turn, ``--repeat`` rounds after one warm-up round:

- ``shardguard dcp.save`` / ``dcp.async_save``: ``ShardguardWriter`` into the
  node daemon (a client from ``connect_dcp``, its gloo group also DCP's);
- ``FileSystemWriter dcp.save`` / ``dcp.async_save``: one directory per save on
  ``--disk-dir`` (``sync_files``, DCP's default: every file fsynced), the previous
  one deleted.

Per save, slowest rank: **blocked**, the call (``dcp.save`` returns; for
``async_save``, staging: the copy DCP makes before it returns); **protected**,
from the call until the checkpoint is safe: shardguard, until the step is
restorable (copied into the daemon's memory, sealed and checksummed; with more
nodes, parity stored on others); FileSystemWriter, until the save has finished
(files fsynced) and the directory is fsynced. **load**: ``dcp.load`` of the whole
state in place at the same world size (the files are in the page cache by then).
Medians; the ratio columns are FileSystemWriter ``dcp.save``'s figure over the row's.

Usage: ``python bench/bench_dcp.py [--quick] [--gib G] [--ranks N] [--repeat N] [--disk-dir D]``
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from _common import base_parser, free_port, load_average, print_table, raise_interrupt, write_results
from bench_node import bench_daemon, fs_type, llm_shapes
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import shardguard.client as sg

MiB = 1 << 20
GiB = 1 << 30
BASELINE = "FileSystemWriter dcp.save"
METHODS = ("shardguard dcp.save", "shardguard dcp.async_save", "FileSystemWriter dcp.save",
           "FileSystemWriter dcp.async_save")


@dataclass(frozen=True)
class Config:
    socket: str
    job: str
    gib: float
    ranks: int
    repeat: int
    disk_dir: str
    out: str
    port: int


# ------------------------------------------------------------------ the state


def sharded_state(total_bytes: int, rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Parameters and AdamW moments as Shard(0) DTensors, ``total_bytes`` over all ranks."""
    gen = torch.Generator().manual_seed(1000 + rank)
    model: dict[str, DTensor] = {}
    optim: dict[str, Any] = {}

    def shard(rows: int, cols: tuple[int, ...], scale: float) -> DTensor:
        local = torch.empty((rows // world, *cols)).uniform_(-scale, scale, generator=gen)
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False)

    for name, shape in llm_shapes(total_bytes // 3):
        rows = max(world, shape[0] // world * world)
        model[name] = shard(rows, shape[1:], 0.02)
        optim[name] = {"step": torch.tensor(10.0), "exp_avg": shard(rows, shape[1:], 1e-3),
                       "exp_avg_sq": shard(rows, shape[1:], 1e-6)}
    groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
               "params": list(model)}]
    return {"model": model, "optim": {"state": optim, "param_groups": groups}}


def local_bytes(state: Any) -> int:
    if isinstance(state, DTensor):
        t = state.to_local()
        return t.numel() * t.element_size()
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(local_bytes(v) for v in state)
    return 0


# --------------------------------------------------------------- the methods


class Saver:
    """One way to checkpoint: ``save(step)`` returns (blocked, protected) seconds on this rank."""

    def __init__(self, name: str, state: dict[str, Any], group: Any) -> None:
        self.name, self.state, self.group = name, state, group

    def save(self, step: int) -> tuple[float, float]:
        raise NotImplementedError

    def load(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Shardguard(Saver):
    def __init__(self, name: str, state: dict[str, Any], group: Any, client: sg.Client,
                 asynchronous: bool) -> None:
        super().__init__(name, state, group)
        self.client, self.asynchronous = client, asynchronous
        self.writer = sg.ShardguardWriter(client)

    def save(self, step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        if self.asynchronous:
            fut = dcp.async_save(self.state, checkpoint_id=step, storage_writer=self.writer,
                                 process_group=self.group)
            blocked = time.perf_counter() - t0
            fut.result()
        else:
            dcp.save(self.state, checkpoint_id=step, storage_writer=self.writer,
                     process_group=self.group)
            blocked = time.perf_counter() - t0
        self.client.wait(restorable=True)
        return blocked, time.perf_counter() - t0

    def load(self) -> float:
        t0 = time.perf_counter()
        dcp.load(self.state, storage_reader=sg.ShardguardReader(self.client),
                 process_group=self.group)
        return time.perf_counter() - t0


class Files(Saver):
    def __init__(self, name: str, state: dict[str, Any], group: Any, directory: str,
                 asynchronous: bool) -> None:
        super().__init__(name, state, group)
        self.directory, self.asynchronous = directory, asynchronous
        self.last: str | None = None

    def save(self, step: int) -> tuple[float, float]:
        path = os.path.join(self.directory, f"step-{step}")
        writer = FileSystemWriter(path)  # sync_files=True: DCP's default
        t0 = time.perf_counter()
        if self.asynchronous:
            fut = dcp.async_save(self.state, storage_writer=writer, process_group=self.group)
            blocked = time.perf_counter() - t0
            fut.result()
        else:
            dcp.save(self.state, storage_writer=writer, process_group=self.group)
            blocked = time.perf_counter() - t0
        _fsync_dir(path)
        protected = time.perf_counter() - t0
        dist.barrier(self.group)
        if dist.get_rank() == 0 and self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)
        self.last = path
        return blocked, protected

    def load(self) -> float:
        assert self.last is not None
        t0 = time.perf_counter()
        dcp.load(self.state, storage_reader=FileSystemReader(self.last), process_group=self.group)
        return time.perf_counter() - t0

    def close(self) -> None:
        if dist.get_rank() == 0 and self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the ranks


def rank_main(rank: int, conf: Config) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(conf.ranks))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{conf.port}", rank=rank,
                            world_size=conf.ranks)
    mesh = init_device_mesh("cpu", (conf.ranks,))
    state = sharded_state(int(conf.gib * GiB), rank, conf.ranks, mesh)
    group = dist.new_group(backend="gloo")
    client = sg.connect_dcp(conf.socket, conf.job, group=group)
    disk = os.path.join(conf.disk_dir, "files")
    savers: list[Saver] = [
        Shardguard(METHODS[0], state, group, client, asynchronous=False),
        Shardguard(METHODS[1], state, group, client, asynchronous=True),
        Files(METHODS[2], state, group, disk, asynchronous=False),
        Files(METHODS[3], state, group, disk, asynchronous=True),
    ]
    times: dict[str, dict[str, list[float]]] = {
        s.name: {"blocked": [], "protected": [], "load": []} for s in savers}
    step = 0
    for round_ in range(conf.repeat + 1):  # round 0 warms up (allocations, page cache)
        for s in savers:
            step += 1
            dist.barrier(group)
            blocked, protected = s.save(step)
            if round_:
                times[s.name]["blocked"].append(_max(group, blocked))
                times[s.name]["protected"].append(_max(group, protected))
    for _ in range(conf.repeat):
        for s in (savers[0], savers[2]):
            dist.barrier(group)
            load = _max(group, s.load())
            times[s.name]["load"].append(load)
            # async_save's row loads the same checkpoint the same way.
            times[savers[savers.index(s) + 1].name]["load"].append(load)
    for s in savers:
        s.close()
    total = _sum(group, local_bytes(state))
    client.close()
    if rank == 0:
        Path(conf.out).write_text(json.dumps({"times": times, "state_bytes": total}))
    dist.destroy_process_group()


def _max(group: Any, x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _sum(group: Any, x: int) -> int:
    t = torch.tensor([x], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item())


# ------------------------------------------------------------------- report


def report(raw: dict[str, Any], conf: Config) -> list[dict[str, Any]]:
    nbytes = raw["state_bytes"]
    rows = []
    for name in METHODS:
        t = raw["times"][name]
        protected = statistics.median(t["protected"])
        rows.append({"name": name,
                     "blocked_ms": 1e3 * statistics.median(t["blocked"]),
                     "protected_ms": 1e3 * protected,
                     "load_ms": 1e3 * statistics.median(t["load"]),
                     "protected_GBps": nbytes / protected / 1e9})
    print_table(rows, BASELINE, columns=["blocked_ms", "protected_ms", "load_ms"],
                title=f"DCP, {nbytes / GiB:.2f} GiB over {conf.ranks} ranks, medians of "
                      f"{conf.repeat} (ms; base/row: how many times shorter than {BASELINE})")
    for r in rows:
        print(f"  {r['name']:<34} protected at {r['protected_GBps']:.2f} GB/s")
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=None,
                        help="state size over all ranks (default 0.5, quick 0.125)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks (gloo, on this machine)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(),
                        help="where FileSystemWriter writes")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    kind = fs_type(args.disk_dir)
    if kind in ("tmpfs", "ramfs"):
        print(f"warning: --disk-dir {args.disk_dir} is on {kind}: FileSystemWriter will not "
              "touch a disk")
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="shardguard-bench-dcp-") as tmp, \
            tempfile.TemporaryDirectory(prefix="shardguard-bench-dcp-", dir=args.disk_dir) as disk, \
            bench_daemon(tmp, f"shardguard-bench-dcp{os.getpid()}") as (sock, _):
        conf = Config(socket=sock, job=f"bench-dcp-{os.getpid()}",
                      gib=args.gib or (0.125 if args.quick else 0.5), ranks=args.ranks,
                      repeat=args.repeat or (2 if args.quick else 5), disk_dir=disk,
                      out=os.path.join(tmp, "result.json"), port=free_port())
        print(f"bench_dcp: {conf.gib:g} GiB over {conf.ranks} ranks, {conf.repeat} rounds, "
              f"disk {args.disk_dir} ({kind})", flush=True)
        mp.start_processes(rank_main, args=(conf,), nprocs=conf.ranks, start_method="fork")
        raw = json.loads(Path(conf.out).read_text())
    rows = report(raw, conf)
    load_end = load_average()
    print(f"load average start {load_start} end {load_end} (other work on this machine "
          "shows up in every row)")
    write_results("dcp_quick" if args.quick else "dcp", {
        "config": {k: v for k, v in asdict(conf).items()
                   if k in ("gib", "ranks", "repeat")} | {"disk": kind},
        "state_bytes": raw["state_bytes"], "rows": rows, "runs": raw["times"],
        "load_average": {"start": load_start, "end": load_end},
    })


if __name__ == "__main__":
    main()
