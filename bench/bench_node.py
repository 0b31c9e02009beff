"""One node: what a snapshot costs the trainer, how long until it is safe, and restore, against peers.

A state shaped like an LLM's (fp32 parameters plus Adam's two moments and step
counters, tensors of a few KiB to 256 MiB) goes through a training loop whose
steps are a real, fixed compute phase (matmuls that stand for forward, backward
and the device-side optimizer) followed by ``optimizer.step()`` (which writes
into every state tensor) and a checkpoint. Every method runs in the same loop,
in the same process; each method's loop sits between two loops that checkpoint
nothing, which are its baseline. The compute runs on all cores but one, which
is left to the copy as a GPU trainer leaves its host cores (``--compute-threads``).
The methods:

- shardguard: ``client.snapshot()`` every step, ``client.protect(optimizer)``;
- ``torch.save`` to /dev/shm, to local disk, and to local disk with fsync;
- ``torch.distributed.checkpoint.async_save`` to local disk (fsynced by its
  writer) with ``DefaultStager`` (shared-memory staging; pinned and
  non-blocking copies where CUDA exists).

Per checkpoint it reports the time blocked (the call, plus the wait that the
next ``optimizer.step()`` makes before it may mutate), the extra wall time per
step against the loop without checkpoints, and the time until the checkpoint
is complete (sealed / written / durable). An asynchronous method whose previous
checkpoint is still in flight skips the step, as shardguard does; the table
says how many steps each one took. Every figure is set against the physical floor:
one memcpy of the same bytes into a pre-faulted buffer (torch ``copy_`` on one
thread and on every core, ``numpy.copyto``; the fastest median).

Restore (every byte checked against the seal's CRC32C, the default) is timed into
the state's own tensors (``restore(into=state)``), into fresh tensors
(``restore()``) and mapped copy-on-write (``restore(copy=False)``), in interleaved
rounds with the memcpy floor, so that each ratio to the floor is taken within the
same rounds; two more rows show what new memory itself costs here. The peers'
restores (``torch.load``, ``dcp.load``) run once per run. ``--restore-only``
measures the restore section alone (one snapshot, no training loops, no peers).

Usage: ``python bench/bench_node.py [--quick] [--gib G] [--ranks N] [--repeat N] [--compute-s S]
[--rounds N] [--restore-only]``
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from _common import (base_parser, free_port, gbps, load_average, print_rows, raise_interrupt,
                     write_results)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

import shardguard.client as sg
from shardguard.proto import hostmem, parallel_copy
from shardguard.client.copier import COPY_NICE_ENV

MiB = 1 << 20
GiB = 1 << 30
SHM_DIR = "/dev/shm"
SHM_PREFIX = "shardguard-bench"
DAEMON_START_S = 60.0
#: Steps each method takes before timing: the first writes of its buffers (shardguard's
#: arena has two slots, each mapped at its first copy: client/arena_map.py). What they
#: started is waited for before the timed steps, so that none of it is timed: the last
#: one's background work (for shardguard, its copy into the second slot, which first maps
#: that slot's fresh pages: ~0.2-0.3 s of CPU for 512 MiB on this guest) otherwise ran into
#: the first timed step and was counted in its wall and CPU time (``perf record`` of
#: ``bench_peers.py --only shardguard``, 2026-12-06).
WARMUP_STEPS = 2
FLOOR = "memcpy floor"


# ------------------------------------------------------------------ the state


def llm_shapes(param_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a decoder-only LM's fp32 parameters, about ``param_bytes`` in all."""
    d = 512 if param_bytes < 128 * MiB else 1024 if param_bytes < GiB else 2048
    row = 4 * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (min(256 * MiB, param_bytes // 3) // row, d))]
    layer = [
        ("attn.qkv.weight", (3 * d, d)),
        ("attn.out.weight", (d, d)),
        ("mlp.up.weight", (4 * d, d)),
        ("mlp.down.weight", (d, 4 * d)),
        ("norm1.weight", (d,)),
        ("norm2.weight", (d,)),
    ]
    layer_bytes = sum(4 * math.prod(s) for _, s in layer)
    left = param_bytes - 4 * math.prod(shapes[0][1])
    for i in range(max(1, left // layer_bytes)):
        shapes += [(f"layers.{i}.{name}", shape) for name, shape in layer]
    left = param_bytes - sum(4 * math.prod(s) for _, s in shapes)
    if left >= row:
        shapes.append(("lm_head.weight", (left // row, d)))
    shapes.append(("final_norm.weight", (d,)))
    return shapes


def llm_state(total_bytes: int, seed: int) -> dict[str, Any]:
    """A model state_dict plus an Adam optimizer state_dict, every page written."""
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] = {}
    for name, shape in llm_shapes(total_bytes // 3):
        model[name] = torch.empty(shape).uniform_(-0.02, 0.02, generator=gen)
        optim[name] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.empty(shape).uniform_(-1e-3, 1e-3, generator=gen),
            "exp_avg_sq": torch.empty(shape).uniform_(0.0, 1e-6, generator=gen),
        }
    groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(model)}]
    return {"model": model, "optim": {"state": optim, "param_groups": groups}, "step": 0}


def tensors_of(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors_of(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors_of(v)


def nbytes_of(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state))


class TouchOptimizer(torch.optim.Optimizer):
    """``optimizer.step()`` as the host sees it: an in-place write into every state tensor.

    The arithmetic of a real Adam step belongs to the compute phase (on a GPU it
    runs on the device); what matters here is that it mutates the tensors a
    snapshot may still be reading, so it has to wait for the copy.
    """

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(list(tensors_of(state)), {})
        self._tensors = list(tensors_of(state))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for t in self._tensors:
            t.view(-1)[:1].add_(1.0)


class Compute:
    """A fixed matmul workload of about ``seconds`` on torch's current threads (calibrated once)."""

    def __init__(self, seconds: float, n: int = 1024) -> None:
        self.a = torch.randn(n, n)
        self.b = torch.randn(n, n)
        self.c = torch.empty(n, n)
        one = statistics.median(_timed(lambda: torch.mm(self.a, self.b, out=self.c)) for _ in range(7))
        self.iters = max(1, round(seconds / one))

    def __call__(self) -> None:
        for _ in range(self.iters):
            torch.mm(self.a, self.b, out=self.c)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------- the floor


def memcpy_floor(state: dict[str, Any], repeat: int, cores: int) -> dict[str, Any]:
    """Median time of one memcpy of the state's bytes into pre-faulted memory, several ways.

    The floor is the fastest of the flat copies into anonymous memory. Two more
    rows are for reading the others: the state's own tensors copied one by one
    (what a snapshot copies), and a flat copy into a pre-faulted /dev/shm mapping
    (where an arena lives).
    """
    n = nbytes_of(state)
    src = torch.empty(n, dtype=torch.uint8).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8).fill_(0)
    shm_path = os.path.join(SHM_DIR, f"{SHM_PREFIX}.floor-{os.getpid()}")
    fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, n)
        mm = mmap.mmap(fd, n, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
        os.unlink(shm_path)
    shm = torch.frombuffer(mm, dtype=torch.uint8)
    tensors = list(tensors_of(state))

    def per_tensor() -> None:
        off = 0
        for t in tensors:
            k = t.numel() * t.element_size()
            dst[off : off + k].view(t.dtype).view(t.shape).copy_(t)
            off += k

    def on(threads: int, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch_threads(threads):
                return fn()

        return run

    ways: dict[str, Callable[[], object]] = {
        "torch copy_, 1 thread": on(1, lambda: dst.copy_(src)),
        f"torch copy_, {cores} threads": on(cores, lambda: dst.copy_(src)),
        "numpy copyto": lambda: np.copyto(dst.numpy(), src.numpy()),
        "state tensors one by one, torch copy_, 1 thread (info)": on(1, per_tensor),
        "torch copy_ into /dev/shm, 1 thread (info)": on(1, lambda: shm.copy_(src)),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():
        fn()  # warm caches and thread pools
    # Interleaved rounds, so that a noisy neighbour hurts every way alike.
    for _ in range(max(5, 2 * repeat)):
        for name, fn in ways.items():
            times[name].append(_timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    floor_way = min((k for k in medians if "(info)" not in k), key=medians.__getitem__)
    del shm
    mm.close()
    return {"bytes": n, "floor_s": medians[floor_way], "floor_way": floor_way, "ways_s": medians}


# --------------------------------------------------------------------- methods


@dataclass
class Pending:
    """One checkpoint in flight: when it started and when it was complete."""

    t0: float
    done_s: float | None = None
    error: BaseException | None = None
    _event: threading.Event = field(default_factory=threading.Event)

    def finish(self) -> None:
        self.done_s = time.perf_counter() - self.t0
        self._event.set()

    def wait(self) -> None:
        self._event.wait()


class Watcher:
    """Stamps the completion time of checkpoints that only offer a blocking ``wait()``."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Pending, Callable[[], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bench-watcher", daemon=True)
        self._thread.start()

    def watch(self, t0: float, wait: Callable[[], None]) -> Pending:
        p = Pending(t0)
        self._queue.put((p, wait))
        return p

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            p, wait = item
            try:
                wait()
            except BaseException as exc:  # noqa: BLE001 - reported with the run, not lost in a thread
                p.error = exc
            p.finish()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class Method:
    """A way to checkpoint; the loop calls ``protect`` once, then ``checkpoint`` every step."""

    name = ""

    def protect(self, opt: torch.optim.Optimizer) -> None:
        """Make ``opt.step()`` wait until the state may be mutated."""

    def checkpoint(self, step: int, state: dict[str, Any]) -> Pending | None:
        """Start (or do) a checkpoint; None if this step is skipped."""
        return None

    def drain(self) -> None:
        """Wait for everything in flight."""

    def close(self) -> None:
        pass


class NoCheckpoint(Method):
    name = "no checkpoint (baseline)"


class Shardguard(Method):
    name = "shardguard snapshot"

    def __init__(self, socket_path: str, job: str, copy_nice: int | None = None) -> None:
        """``copy_nice``: the copy thread's niceness for this client (None: the default)."""
        if copy_nice is not None:
            self.name = f"shardguard snapshot, copy thread at nice {copy_nice}"
            job = f"{job}-nice{copy_nice}"
        with _env(COPY_NICE_ENV, None if copy_nice is None else str(copy_nice)):
            self.client = sg.connect(socket_path, job)
        self.watcher = Watcher()

    def protect(self, opt: torch.optim.Optimizer) -> None:
        self.client.protect(opt)

    def checkpoint(self, step: int, state: dict[str, Any]) -> Pending | None:
        t0 = time.perf_counter()
        h = self.client.snapshot(step, state)
        if h.skipped:
            return None
        return self.watcher.watch(t0, h.wait)

    def drain(self) -> None:
        self.client.wait()

    def close(self) -> None:
        self.watcher.close()
        self.client.close()


class TorchSave(Method):
    """``torch.save`` of the whole state into a new file per step; the previous one is deleted."""

    def __init__(self, name: str, directory: str, fsync: bool, rank: int) -> None:
        self.name = name
        self.dir = directory
        self.fsync = fsync
        self.rank = rank
        self.path: str | None = None

    def checkpoint(self, step: int, state: dict[str, Any]) -> Pending | None:
        p = Pending(time.perf_counter())
        path = os.path.join(self.dir, f"step-{step}.r{self.rank}.pt")
        with open(path, "wb") as f:
            torch.save(state, f)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        if self.fsync:
            _fsync_dir(self.dir)
        # Keeping only the newest checkpoint is part of the price (freeing a GiB of tmpfs is not free).
        if self.path is not None:
            os.unlink(self.path)
        self.path = path
        p.finish()
        return p


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DcpAsync(Method):
    """``dcp.async_save`` with ``DefaultStager``; one directory per step, the previous deleted.

    ``optimizer.step()`` waits for staging (the copy of the state); a step whose
    previous upload is still in flight is skipped on every rank, as shardguard
    skips, instead of queueing saves behind each other.
    """

    name = "dcp.async_save + DefaultStager, disk"

    def __init__(self, directory: str, agree: Any) -> None:
        cuda = torch.cuda.is_available()
        self.options = StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=cuda
        )
        self.stager = DefaultStager(self.options)
        self.dir = directory
        self.agree = agree
        self.distributed = dist.is_initialized()
        self.response: Any = None
        self.pending: Pending | None = None
        self.done_dirs: list[str] = []

    def protect(self, opt: torch.optim.Optimizer) -> None:
        opt.register_step_pre_hook(lambda *_: self._wait_staged())

    def _wait_staged(self) -> None:
        if self.response is not None:
            self.response.staging_completion.result()

    def _busy(self) -> bool:
        busy = self.response is not None and not self.response.upload_completion.done()
        if self.agree is None:
            return busy
        flag = torch.tensor([int(busy)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.agree)
        return bool(flag.item())

    def checkpoint(self, step: int, state: dict[str, Any]) -> Pending | None:
        if self._busy():
            return None
        self._retire()
        p = Pending(time.perf_counter())
        path = os.path.join(self.dir, f"step-{step}")
        self.response = dcp.async_save(
            state, storage_writer=FileSystemWriter(path), async_stager=self.stager, no_dist=not self.distributed
        )
        self.response.upload_completion.add_done_callback(lambda _: p.finish())
        self.pending = p
        self.done_dirs.append(path)
        return p

    def _retire(self) -> None:
        """Delete every finished checkpoint but the newest (rank 0 owns the directories)."""
        while len(self.done_dirs) > 1:
            old = self.done_dirs.pop(0)
            if not self.distributed or dist.get_rank() == 0:
                shutil.rmtree(old, ignore_errors=True)

    def drain(self) -> None:
        if self.response is not None:
            self.response.upload_completion.result()
            assert self.pending is not None
            self.pending.wait()  # the done-callback may run just after result() returns
        self._retire()

    @property
    def latest(self) -> str | None:
        return self.done_dirs[-1] if self.done_dirs else None

    def close(self) -> None:
        self.drain()
        self.stager.close()


# ------------------------------------------------------------------------ loop


@dataclass
class LoopStats:
    """One run of the loop for one method, on one rank."""

    step_s: list[float] = field(default_factory=list)
    call_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    first_call_s: float | None = None
    # CPU seconds over the measured steps and the drain: this process (every thread) and the daemon.
    cpu_s: float = 0.0
    daemon_cpu_s: float = 0.0

    @property
    def taken(self) -> int:
        return len(self.pending)

    def summary(self, base_step_s: float, base_cpu_per_step_s: float) -> dict[str, Any]:
        n, k = len(self.step_s), self.taken
        extra = sum(self.step_s) - n * base_step_s
        extra_cpu = self.cpu_s - n * base_cpu_per_step_s
        blocked = sum(self.call_s) + sum(self.wait_s)
        done = [p.done_s for p in self.pending if p.done_s is not None]
        return {
            "steps": n,
            "taken": k,
            "step_s": statistics.median(self.step_s),
            "blocked_s": blocked / k if k else None,
            "call_s": sum(self.call_s) / k if k else None,
            "wait_s": sum(self.wait_s) / k if k else None,
            "extra_per_step_s": extra / n,
            "extra_per_ckpt_s": extra / k if k else None,
            "complete_s": statistics.median(done) if done else None,
            "first_call_s": self.first_call_s,
            "cpu_per_step_s": self.cpu_s / n,
            "extra_cpu_per_ckpt_s": extra_cpu / k if k else None,
            "daemon_cpu_per_ckpt_s": self.daemon_cpu_s / k if k else None,
        }


def run_loop(
    method: Method,
    opt: torch.optim.Optimizer,
    marks: dict[str, float],
    state: dict[str, Any],
    compute: Compute,
    first_step: int,
    steps: int,
    min_taken: int,
    max_steps: int,
    daemon: psutil.Process,
) -> tuple[LoopStats, int]:
    """``WARMUP_STEPS`` + at least ``steps`` steps (more, up to ``max_steps``, until
    ``min_taken`` checkpoints were taken); returns the stats and the next step number."""
    stats = LoopStats()
    step = first_step
    i = 0
    cpu0 = daemon0 = 0.0
    while True:
        if i == WARMUP_STEPS:
            method.drain()  # the untimed steps' work in flight is not the timed steps'
            cpu0, daemon0 = time.process_time(), _cpu(daemon)
        t0 = time.perf_counter()
        compute()
        opt.step()
        state["step"] = step
        t1 = time.perf_counter()
        pending = method.checkpoint(step, state)
        t2 = time.perf_counter()
        if i == 0:
            stats.first_call_s = t2 - t1
        if i >= WARMUP_STEPS:
            stats.step_s.append(t2 - t0)
            stats.call_s.append(t2 - t1)
            stats.wait_s.append(marks["ready"] - marks["enter"])
            if pending is not None:
                stats.pending.append(pending)
        i += 1
        step += 1
        n = i - WARMUP_STEPS
        if n >= steps and (stats.taken >= min_taken or n >= max_steps):
            break
    method.drain()
    stats.cpu_s = time.process_time() - cpu0
    stats.daemon_cpu_s = _cpu(daemon) - daemon0
    return stats, step


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def one_run(
    methods: list[Method],
    loop: Callable[[Method, int], tuple[LoopStats, int]],
    step: int,
    after: Callable[[Method], None],
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every method once, each between two loops that checkpoint nothing: its baseline is
    the pair of them, because a shared machine drifts within a run. ``after(method)`` runs
    after each method's loop, before anything else touches the state."""
    baseline, others = methods[0], methods[1:]
    first, step = loop(baseline, step)
    bases = [first]
    stats: dict[str, LoopStats] = {}
    for m in others:
        stats[m.name], step = loop(m, step)
        after(m)
        b, step = loop(baseline, step)
        bases.append(b)
    failed = [p.error for s in stats.values() for p in s.pending if p.error is not None]
    if failed:
        raise RuntimeError(f"a checkpoint failed: {failed[0]!r}") from failed[0]
    pooled = LoopStats(step_s=[t for b in bases for t in b.step_s], call_s=[t for b in bases for t in b.call_s],
                       wait_s=[t for b in bases for t in b.wait_s], cpu_s=sum(b.cpu_s for b in bases))
    out = {baseline.name: pooled.summary(statistics.median(pooled.step_s), pooled.cpu_s / len(pooled.step_s))}
    for i, m in enumerate(others):
        around = bases[i].step_s + bases[i + 1].step_s
        cpu = (bases[i].cpu_s + bases[i + 1].cpu_s) / len(around)
        out[m.name] = stats[m.name].summary(statistics.median(around), cpu)
    return out, step


def optimizer_for(method: Method, state: dict[str, Any]) -> tuple[torch.optim.Optimizer, dict[str, float]]:
    """An optimizer protected by ``method``, with hooks that time what the protection waits."""
    opt = TouchOptimizer(state)
    marks = {"enter": 0.0, "ready": 0.0}
    # Step pre-hooks run in registration order: enter, the method's wait, ready.
    opt.register_step_pre_hook(lambda *_: marks.__setitem__("enter", time.perf_counter()))
    method.protect(opt)
    opt.register_step_pre_hook(lambda *_: marks.__setitem__("ready", time.perf_counter()))
    return opt, marks


# --------------------------------------------------------------------- restore


def settle(sgm: Shardguard, agree: Any) -> None:
    """Every rank's last snapshot sealed before any rank restores.

    ``restore()`` drains only this rank's snapshot: with several ranks, rank 0 can
    otherwise read a restorable step that another rank's seal supersedes before
    it opens it (NotRestorableError).
    """
    sgm.client.wait()
    _barrier(agree)


#: The restore paths measured in interleaved rounds with the memcpy floor (every byte is
#: checked against the seal's CRC32C on each, the default).
R_INTO = "shardguard restore(into=state)"
R_FRESH = "shardguard restore(), fresh tensors"
R_MAPPED = "shardguard restore(copy=False), mapped"
#: What fresh memory costs here, for reading the fresh row: the same bytes copied into a
#: new allocation, on 4 KiB pages and on 2 MiB ones (what restore() asks for).
NEW_PAGES = "torch.empty + copy_, new 4 KiB pages (info)"
NEW_HUGE = "torch.empty + copy_, new huge pages (info)"
#: The copying paths without the C copy (proto/_fastcopy.c): what an install that could
#: not build it gets.
R_INTO_PY = "restore(into=state), memmove fallback (info)"
R_FRESH_PY = "restore(), fresh tensors, memmove fallback (info)"


def restore_rounds(sgm: Shardguard, state: dict[str, Any], agree: Any, rounds: int,
                   cores: int) -> dict[str, float]:
    """Median time of each restore path and of memcpy into pre-faulted memory over ``rounds``
    interleaved rounds (each round runs every way once, in turn, every rank together), so
    a noisy neighbour slows every way of a round alike; :data:`FLOOR` is the fastest memcpy."""
    n = nbytes_of(state)
    src = torch.empty(n, dtype=torch.uint8).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8).fill_(0)

    def memcpy(threads: int) -> Callable[[], None]:
        def run() -> None:
            with torch_threads(threads):
                dst.copy_(src)
        return run

    def fresh() -> None:
        _, got = sgm.client.restore()
        del got  # freed inside the timing, like the peers' results

    def mapped() -> None:
        _, got = sgm.client.restore(copy=False)
        del got

    def fallback(way: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            parallel_copy.USE_NATIVE = False
            try:
                way()
            finally:
                parallel_copy.USE_NATIVE = True
        return run

    def new_memory(huge: bool) -> Callable[[], None]:
        def run() -> None:
            t = torch.empty(n, dtype=torch.uint8)
            if huge:
                hostmem.advise_huge_pages(t.data_ptr(), n)
            with torch_threads(1):
                t.copy_(src)
            del t
        return run

    ways: dict[str, Callable[[], object]] = {
        "memcpy, torch copy_, 1 thread": memcpy(1),
        f"memcpy, torch copy_, {cores} threads": memcpy(cores),
        R_INTO: lambda: sgm.client.restore(into=state),
        R_FRESH: fresh,
        R_MAPPED: mapped,
        R_INTO_PY: fallback(lambda: sgm.client.restore(into=state)),
        R_FRESH_PY: fallback(fresh),
        NEW_PAGES: new_memory(False),
        NEW_HUGE: new_memory(True),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():
        _barrier(agree)
        fn()  # warm caches, thread pools and the daemon
    for _ in range(rounds):
        for name, fn in ways.items():
            _barrier(agree)
            times[name].append(_timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {FLOOR: min(v for k, v in medians.items() if k.startswith("memcpy")), **medians}


def restore_times(sgm: Shardguard, saves: dict[str, TorchSave], dcpm: DcpAsync | None,
                  state: dict[str, Any], agree: Any, rounds: int, cores: int) -> dict[str, float]:
    """shardguard's restore paths and the memcpy floor in interleaved rounds, then each peer's
    restore once; into fresh tensors unless it says in place."""
    out = restore_rounds(sgm, state, agree, rounds, cores)
    for name, m in saves.items():
        if m.path is not None and m.fsync is False:
            label = f"torch.load, {name.removeprefix('torch.save ')}"
            out[label] = _timed(lambda p=m.path: torch.load(p, weights_only=True))
    if dcpm is not None and dcpm.latest is not None:
        reader = FileSystemReader(dcpm.latest)
        no_dist = not dist.is_initialized()
        out["dcp.load(into=state), disk"] = _timed(lambda: dcp.load(state, storage_reader=reader, no_dist=no_dist))
    return out


def verify_restore(sgm: Shardguard, state: dict[str, Any]) -> bool:
    """Every restore path gives back the state of the last snapshot (the current one) bit
    for bit: into fresh tensors, into a zeroed state, and mapped."""
    def same(got: Any) -> bool:
        return all(torch.equal(a, b) for a, b in zip(tensors_of(got), tensors_of(state), strict=True))

    fresh = same(sgm.client.restore()[1])
    into = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
    into_ok = same(sgm.client.restore(into=into)[1])
    del into
    mapped = same(sgm.client.restore(copy=False)[1])
    return fresh and into_ok and mapped


# ------------------------------------------------------------------- one rank


@dataclass(frozen=True)
class Config:
    gib: float
    ranks: int
    repeat: int
    steps: int
    peer_steps: int
    min_taken: int
    max_steps: int
    compute_s: float | None
    compute_threads: int
    cores: int
    disk_dir: str
    peers: tuple[str, ...]
    rounds: int
    restore_only: bool
    socket: str
    job: str
    daemon_pid: int
    quick: bool


# "sg-nice10": shardguard again, its copy thread at nice 10 (the default keeps the
# trainer's priority): what a lower priority buys, measured in the same rounds.
PEERS = ("shm", "disk", "disk-fsync", "dcp", "sg-nice10")


def rank_main(rank: int, conf: Config, port: int, out_path: str) -> None:
    """Everything one trainer rank measures; rank 0 writes the gathered results to ``out_path``."""
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    agree = None
    if conf.ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=conf.ranks)
        # A group of our own, so that the bench's collectives never interleave with DCP's.
        agree = dist.new_group(backend="gloo")
    torch.set_num_threads(conf.compute_threads)
    state = llm_state(int(conf.gib * GiB) // conf.ranks, seed=rank)
    nbytes = nbytes_of(state)
    _barrier(agree)
    floor = memcpy_floor(state, conf.repeat, conf.cores)
    floor["floor_s"] = _max_all(agree, floor["floor_s"])
    floor_s = floor["floor_s"]
    least = 0.2 if conf.quick else 0.3
    seconds = conf.compute_s if conf.compute_s is not None else max(least, 3 * floor_s)
    compute = Compute(seconds)

    scratch = tempfile.mkdtemp(prefix=f"{SHM_PREFIX}.peers-", dir=SHM_DIR) if rank == 0 else ""
    disk = tempfile.mkdtemp(prefix=f"{SHM_PREFIX}-", dir=conf.disk_dir) if rank == 0 else ""
    scratch, disk = _bcast_obj(agree, (scratch, disk))
    methods: list[Method] = []
    daemon = psutil.Process(conf.daemon_pid)
    runs: list[dict[str, dict[str, Any]]] = []
    restores: list[dict[str, float]] = []
    loads: list[Any] = []  # the load average before and after each run's restore rounds
    verified = None
    step = 0
    load = {"start": load_average()}
    try:
        methods += make_methods(conf, rank, agree, scratch, disk)
        sgm = next(m for m in methods if isinstance(m, Shardguard))
        saves = {m.name: m for m in methods if isinstance(m, TorchSave)}
        dcpm = next((m for m in methods if isinstance(m, DcpAsync)), None)
        opts = {m.name: optimizer_for(m, state) for m in methods}

        def loop(m: Method, first: int) -> tuple[LoopStats, int]:
            _barrier(agree)
            return run_loop(
                m, *opts[m.name], state, compute, first,
                steps=conf.peer_steps if isinstance(m, TorchSave) else conf.steps,
                min_taken=0 if isinstance(m, NoCheckpoint) else conf.min_taken,
                max_steps=conf.max_steps, daemon=daemon,
            )

        def after(m: Method) -> None:
            nonlocal verified
            if m is sgm and verified is None:
                settle(sgm, agree)
                verified = _all(agree, verify_restore(sgm, state))

        if conf.restore_only:
            sgm.client.snapshot(0, state)
            settle(sgm, agree)
            verified = _all(agree, verify_restore(sgm, state))
        for r in range(conf.repeat):
            if not conf.restore_only:
                summary, step = one_run(methods, loop, step, after)
                runs.append(summary)
                settle(sgm, agree)
            loads.append(load_average())
            with torch_threads(conf.cores):
                restores.append(restore_times(sgm, saves, dcpm, state, agree, conf.rounds,
                                              conf.cores))
            loads[-1] = [loads[-1], load_average()]
            if rank == 0:
                print(f"  run {r + 1}/{conf.repeat} done (loadavg {load_average()})", flush=True)
        for m in methods:
            m.drain()
        _barrier(agree)  # nobody is still writing into the directories rank 0 removes
    finally:
        for m in methods:
            m.close()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(disk, ignore_errors=True)
    load["end"] = load_average()

    gathered = _gather(agree, {"runs": runs, "restores": restores, "bytes": nbytes})
    if rank == 0:
        result = {
            "state": describe_state(state, conf.ranks),
            "floor": floor,
            "compute": {"target_s": seconds, "matmuls_per_step": compute.iters,
                        "threads_per_rank": conf.compute_threads},
            "dcp_staging": next((vars(m.options) for m in methods if isinstance(m, DcpAsync)), None),
            "restore_verified": verified,
            "load_average": load,
            "restore_load_average": loads,
            "per_rank": gathered,
        }
        torch.save(result, out_path)
    if conf.ranks > 1:
        dist.destroy_process_group()


def make_methods(conf: Config, rank: int, agree: Any, scratch: str, disk: str) -> list[Method]:
    """The baseline first, shardguard second, then the peers asked for."""
    methods: list[Method] = [NoCheckpoint(), Shardguard(conf.socket, conf.job)]
    for key, name, where, fsync in (
        ("shm", "torch.save /dev/shm", scratch, False),
        ("disk", "torch.save disk", disk, False),
        ("disk-fsync", "torch.save disk + fsync", disk, True),
    ):
        if key in conf.peers:
            os.makedirs(os.path.join(where, key), exist_ok=True)
            methods.append(TorchSave(name, os.path.join(where, key), fsync, rank))
    if "dcp" in conf.peers:
        methods.append(DcpAsync(os.path.join(disk, "dcp"), agree))
    if "sg-nice10" in conf.peers:
        methods.append(Shardguard(conf.socket, conf.job, copy_nice=10))
    return methods


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` meanwhile (None: left as it is)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def describe_state(state: dict[str, Any], ranks: int) -> dict[str, Any]:
    sizes = [t.numel() * t.element_size() for t in tensors_of(state)]
    return {
        "bytes_per_rank": sum(sizes),
        "ranks": ranks,
        "tensors_per_rank": len(sizes),
        "largest_bytes": max(sizes),
        "smallest_bytes": min(sizes),
        "tensors_1MiB_plus": sum(s >= MiB for s in sizes),
        "bytes_in_tensors_under_1MiB": sum(s for s in sizes if s < MiB),
    }


def _barrier(group: Any) -> None:
    if group is not None:
        dist.barrier(group=group)


def _max_all(group: Any, x: float) -> float:
    if group is None:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _all(group: Any, ok: bool) -> bool:
    return _max_all(group, float(not ok)) == 0.0


def _bcast_obj(group: Any, obj: Any) -> Any:
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(group: Any, obj: Any) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


# ------------------------------------------------------------------- reporting


def node_summary(per_rank: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, float],
                                                          dict[str, float]]:
    """Median over runs of each figure; a node is as slow as its slowest rank in each run.

    Returns the checkpoint table, each restore's time and its bandwidth as a ratio to the
    memcpy floor (floor time over its time), taken within each run's interleaved rounds
    and then the median over runs."""
    names = list(per_rank[0]["runs"][0]) if per_rank[0]["runs"] else []
    repeat = len(per_rank[0]["restores"])
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        per_run = [_max_over_ranks([pr["runs"][r][name] for pr in per_rank]) for r in range(repeat)]
        table[name] = {key: _median([run[key] for run in per_run]) for key in per_run[0]}
        table[name]["taken"] = f"{sum(run['taken'] for run in per_run)}/{sum(run['steps'] for run in per_run)}"
        table[name]["first_call_s"] = per_run[0]["first_call_s"]  # only the first run's is a first call
    runs = [{name: max(pr["restores"][r][name] for pr in per_rank) for name in per_rank[0]["restores"][0]}
            for r in range(repeat)]
    restores = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    ratios = {name: statistics.median(run[FLOOR] / run[name] for run in runs) for name in runs[0]}
    return table, restores, ratios


def _max_over_ranks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key, value in rows[0].items():
        values = [r[key] for r in rows]
        if key not in ("steps", "taken") and all(isinstance(v, (int, float)) for v in values):
            out[key] = max(values)
    return out


def _median(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def report(res: dict[str, Any], conf: Config) -> dict[str, Any]:
    table, restores, restore_ratios = node_summary(res["per_rank"])
    floor_s = res["floor"]["floor_s"]
    node_bytes = sum(pr["bytes"] for pr in res["per_rank"])
    st = res["state"]
    print(
        f"\nbench_node: {conf.ranks} rank(s), {node_bytes / GiB:.2f} GiB state on the node "
        f"({st['tensors_per_rank']} tensors per rank, {st['smallest_bytes'] / MiB:.3f} to "
        f"{st['largest_bytes'] / MiB:.0f} MiB), {conf.repeat} runs"
    )
    print(
        f"compute {res['compute']['target_s'] * 1e3:.0f} ms/step target ({res['compute']['matmuls_per_step']} "
        f"matmuls, {conf.compute_threads} thread(s)/rank); memcpy floor {floor_s * 1e3:.1f} ms = "
        f"{gbps(node_bytes // conf.ranks, floor_s):.1f} GB/s per rank ({res['floor']['floor_way']})"
    )
    for way, s in res["floor"]["ways_s"].items():
        print(f"    {way:<56} {s * 1e3:8.1f} ms  {gbps(node_bytes // conf.ranks, s):5.1f} GB/s")

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1e3

    rows: list[dict[str, Any]] = [] if conf.restore_only else checkpoint_rows(table, floor_s)
    per_rank = node_bytes // conf.ranks
    rrows = [{"name": name if name != FLOOR else f"{FLOOR} (fastest memcpy above)", "ms": ms(t),
              "gbps": gbps(per_rank, t), "vs": restore_ratios[name]} for name, t in restores.items()]
    print_rows(rrows, [("name", "restore", "{}"), ("ms", "ms", "{:.1f}"), ("gbps", "GB/s per rank", "{:.1f}"),
                       ("vs", "x floor bandwidth", "{:.2f}x")],
               title=f"restore, median over {conf.repeat} runs of {conf.rounds} interleaved rounds "
                     f"({conf.cores} thread(s); every shardguard restore checks CRC32C; ratios within "
                     "rounds; 'disk' reads hit the page cache)")
    print("  (the peers' restores run once per run, after the rounds)")
    print(f"load average before/after each run's restore rounds: {res['restore_load_average']}")
    print(f"restore verified (restored state == snapshotted state): {res['restore_verified']}")
    print(f"load average start {res['load_average']['start']} end {res['load_average']['end']} "
          f"(other work on this machine shows up in every row)")
    return {"checkpoint": table, "restore_s": restores, "restore_vs_floor": restore_ratios, "rows": rows,
            "restore_rows": rrows}


def checkpoint_rows(table: dict[str, dict[str, Any]], floor_s: float) -> list[dict[str, Any]]:
    """The checkpoint table's rows, printed; ratios to the memcpy floor."""

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1e3

    def ratio(x: float | None) -> float | None:
        return None if x is None else x / floor_s

    rows: list[dict[str, Any]] = [{"name": f"{FLOOR} (1 memcpy, reference)", "blocked": ms(floor_s),
                                   "extra_ckpt": ms(floor_s), "complete": ms(floor_s), "r_blocked": 1.0,
                                   "r_extra": 1.0}]
    for name, t in table.items():
        rows.append({
            "name": name, "taken": t["taken"], "step": ms(t["step_s"]), "blocked": ms(t["blocked_s"]),
            "call": ms(t["call_s"]), "wait": ms(t["wait_s"]), "extra_step": ms(t["extra_per_step_s"]),
            "extra_ckpt": ms(t["extra_per_ckpt_s"]), "complete": ms(t["complete_s"]),
            "r_blocked": ratio(t["blocked_s"]), "r_extra": ratio(t["extra_per_ckpt_s"]),
            "cpu": ms(t["extra_cpu_per_ckpt_s"]), "dcpu": ms(t["daemon_cpu_per_ckpt_s"]),
        })
    print_rows(rows, [
        ("name", "method", "{}"), ("taken", "taken", "{}"), ("step", "step ms", "{:.0f}"),
        ("blocked", "blocked ms", "{:.1f}"), ("call", "(call", "{:.1f}"), ("wait", "+wait)", "{:.1f}"),
        ("extra_step", "extra/step ms", "{:.1f}"), ("extra_ckpt", "extra/ckpt ms", "{:.1f}"),
        ("complete", "complete ms", "{:.0f}"), ("r_blocked", "blocked/floor", "{:.2f}x"),
        ("r_extra", "extra/floor", "{:.2f}x"), ("cpu", "cpu ms", "{:.0f}"), ("dcpu", "+daemon", "{:.0f}"),
    ], title="checkpoint cost per step, median over runs (blocked and extra are per checkpoint taken)")
    sg_first = table["shardguard snapshot"]["first_call_s"]
    print(f"(first shardguard snapshot, which registers the full-size arena: {sg_first * 1e3:.0f} ms, not counted;\n"
          " extra: against the two baseline loops around the method's loop; the baseline row's extra/step is its\n"
          " own mean minus median, the noise level; cpu ms: extra CPU time of the trainer process per checkpoint,\n"
          " all threads; +daemon: the daemon's CPU time per checkpoint)")

    return rows


# ------------------------------------------------------------------- the daemon


@contextlib.contextmanager
def bench_daemon(tmpdir: str, prefix: str = SHM_PREFIX) -> Iterator[tuple[str, int]]:
    """A node daemon for this run (its socket and pid) with shared-memory prefix ``prefix``;
    terminated, and its shared memory removed, whatever happens."""
    sock = os.path.join(tmpdir, "agent.sock")
    cmd = [sys.executable, "-m", "shardguard.daemon", "--socket", sock, "--shm-prefix", prefix,
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + DAEMON_START_S
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode} before listening on {sock}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not listen on {sock} within {DAEMON_START_S:.0f}s")
            time.sleep(0.05)
        yield sock, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        remove_shm(prefix)


def remove_shm(prefix: str = SHM_PREFIX) -> None:
    for p in Path(SHM_DIR).glob(f"{prefix}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (so a tmpfs 'disk' is not mistaken for one)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=None, help="state size on the node (default 1, quick 0.25)")
    parser.add_argument("--ranks", type=int, default=1, help="trainer ranks on the node (gloo); state split among them")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default 8, quick 4)")
    parser.add_argument("--peer-steps", type=int, default=None,
                        help="measured steps per run for the synchronous torch.save peers (default 3, quick 2)")
    parser.add_argument("--min-taken", type=int, default=2,
                        help="asynchronous methods run longer until this many checkpoints were taken")
    parser.add_argument("--max-steps", type=int, default=25, help="cap on measured steps per run")
    parser.add_argument("--compute-s", type=float, default=None,
                        help="compute per step in seconds (default: 3x the memcpy floor, at least 0.3; quick 0.2)")
    parser.add_argument("--compute-threads", type=int, default=None,
                        help="torch threads per rank for compute (default: cores-1, so a core is left for the "
                        "copy, as a GPU trainer leaves host cores; at least 1)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where the disk peers write")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the restore paths and the memcpy floor per run (default 5, quick 3)")
    parser.add_argument("--restore-only", action="store_true",
                        help="only the restore section: one snapshot, then the restore rounds (no training loops, no peers)")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    peers = () if args.restore_only else tuple(p for p in args.peers.split(",") if p)
    if unknown := set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(unknown)}")
    threads = args.compute_threads or max(1, (cores - 1) // args.ranks)
    gib = args.gib or (0.25 if args.quick else 1.0)
    conf_args = dict(
        gib=gib, ranks=args.ranks, repeat=args.repeat or (2 if args.quick else 3),
        steps=args.steps or (4 if args.quick else 8), peer_steps=args.peer_steps or (2 if args.quick else 3),
        min_taken=args.min_taken, max_steps=args.max_steps, compute_s=args.compute_s, compute_threads=threads,
        cores=cores, disk_dir=args.disk_dir, peers=peers, quick=args.quick,
        rounds=args.rounds or (3 if args.quick else 5), restore_only=args.restore_only,
    )
    kind = fs_type(args.disk_dir)
    if kind in ("tmpfs", "ramfs"):
        print(f"warning: --disk-dir {args.disk_dir} is on {kind}; the disk peers will not touch a disk")

    signal.signal(signal.SIGTERM, raise_interrupt)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shardguard-bench-") as tmp, bench_daemon(tmp) as (sock, pid):
        conf = Config(socket=sock, job=f"bench-node-{os.getpid()}", daemon_pid=pid, **conf_args)
        out = os.path.join(tmp, "result.pt")
        print(f"bench_node: {gib:g} GiB, {conf.ranks} rank(s), {conf.repeat} runs, peers {','.join(peers)}, "
              f"disk {args.disk_dir} ({kind})", flush=True)
        if conf.ranks == 1:
            rank_main(0, conf, 0, out)
        else:
            mp.spawn(rank_main, args=(conf, free_port(), out), nprocs=conf.ranks, join=True)
        res = torch.load(out, weights_only=False)
    summary = report(res, conf)
    elapsed = time.monotonic() - t_start
    print(f"\ntotal {elapsed:.0f} s")
    payload = {
        "config": {k: v for k, v in vars(conf).items() if k not in ("socket", "job", "daemon_pid")},
        "disk_fs": kind,
        "elapsed_s": elapsed,
        **{k: v for k, v in res.items() if k != "per_rank"},
        **summary,
        "per_rank_runs": res["per_rank"],
    }
    write_results("node" + ("_restore" if conf.restore_only else "") + (f"_r{conf.ranks}" if conf.ranks > 1 else "")
                  + ("_quick" if args.quick else ""), payload)


if __name__ == "__main__":
    main()
