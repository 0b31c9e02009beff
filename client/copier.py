"""The copy engine: a snapshot's leaves into the rank's arena slot, off the training path.

Small host leaves are copied at once, CUDA leaves on a side stream into the arena
registered as pinned memory, the rest on a background thread, which then writes the
manifest and seals the slot. The background thread checksums a large host tensor's
blocks as it copies them and hands the seal every block's CRC (client/seal_sums.py),
so the daemon does not read the slot again; with device copies it leaves the
checksums to the daemon (no read to save: the bytes come from the GPU). The next
``optimizer.step()`` waits for the copy (the tensors are immutable during forward and
backward: that is the window the copy hides in).

The background thread may run at a lower CPU priority (nice ``SHARDGUARD_COPY_NICE``,
0..19, as NVRx's checkpoint writer runs at 10): the training step's own threads then
come first where cores are short, and the copy takes what they leave. The default is
0, the trainer's priority: measured (bench_node, sg-nice10), nice 10 lowered the step
time only where every core computes, and everywhere it made the copy finish later, so
that more snapshots were skipped (README, "Benchmarks").
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

import numpy as np
import torch

from shardguard.client._faults import fault_point
from shardguard.client.arena_map import ArenaMap
from shardguard.client.handle import SnapshotHandle
from shardguard.client.seal_sums import BlockSums
from shardguard.proto.errors import ConfigError
from shardguard.proto.state_layout import Leaf, copy_leaf

logger = logging.getLogger(__name__)

# Tensors up to this size are copied inside snapshot() itself, so that small
# buffers a forward pass may update in place (BatchNorm statistics, counters)
# are captured as they were at the snapshot, not as forward left them.
SYNC_COPY_BYTES = 256 << 10

#: Niceness added to the copy thread's (the environment variable overrides it).
COPY_NICE = 0
COPY_NICE_ENV = "SHARDGUARD_COPY_NICE"

#: Seals a copied slot with the daemon, handing it the data's block CRCs (None: the
#: daemon makes them); returns the restorable step, if it says.
Seal = Callable[[list[int] | None], int | None]


class Copier:
    """One rank's copies: its background thread and its CUDA side stream."""

    def __init__(self, job: str, rank: int, nice: int = COPY_NICE) -> None:
        self.job = job
        self.rank = rank
        self._side_stream: Any = None
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._nice = nice
        self._worker = threading.Thread(target=self._work, name=f"sg-copy-r{rank}", daemon=True)
        self._worker.start()

    def start(self, h: SnapshotHandle, arena: ArenaMap, slot: int, leaves: list[Leaf],
              data_bytes: int, manifest: bytes, manifest_offset: int, seal: Seal) -> None:
        """Copy ``leaves`` into the data region ``[0, data_bytes)`` of ``slot``, then
        write ``manifest`` at ``manifest_offset`` of it and ``seal`` it; ``h`` tells how
        far it got."""
        base = arena.slot_base(slot)
        cuda = [lf for lf in leaves if lf.kind == "tensor" and lf.value.is_cuda]
        if cuda:
            h.copying_on_gpu(self._copy_cuda(arena, cuda, base))
        host = [lf for lf in leaves if not (lf.kind == "tensor" and lf.value.is_cuda)]
        deferred = [lf for lf in host if lf.nbytes > SYNC_COPY_BYTES and lf.kind != "pickle"]
        inline = [lf for lf in host if lf.nbytes <= SYNC_COPY_BYTES or lf.kind == "pickle"]
        if slot not in arena.populated and \
                sum(lf.nbytes for lf in inline) * 5 > arena.slot_bytes:
            # Copies made here that would fault a fifth of the slot's pages one by one
            # (~1.4 us each) cost more than mapping all of them in one call (~0.26 us).
            arena.populate_slot(slot)
        for i, lf in enumerate(inline):
            if not deferred and i == len(inline) // 2:
                fault_point("mid-copy", h.step, self.rank)
            copy_leaf(lf, arena.u8, arena.arr, base)
        sums = None if cuda else BlockSums(arena.u8.data_ptr() + base, data_bytes)
        self._queue.put(lambda: self._finish(h, arena, slot, deferred, sums,
                                             base + manifest_offset, manifest, seal))

    def close(self, timeout_s: float) -> None:
        """Stop the thread once the copies queued before are done."""
        self._queue.put(None)
        self._worker.join(timeout=timeout_s)

    def _finish(self, h: SnapshotHandle, arena: ArenaMap, slot: int, deferred: list[Leaf],
                sums: BlockSums | None, manifest_at: int, manifest: bytes, seal: Seal) -> None:
        base = arena.slot_base(slot)
        try:
            fault_point("before-copy", h.step, self.rank)
            # The slot's first copy in this mapping: its pages mapped in one call, not
            # faulted one by one by the copy (client/arena_map.py).
            arena.populate_slot(slot)
            half = len(deferred) // 2
            for i, lf in enumerate(deferred):
                if i == half:
                    fault_point("mid-copy", h.step, self.rank)
                src = _plain_host_bytes(lf) if sums is not None else None
                if src is not None:
                    sums.copy(lf.node["off"], src, lf.nbytes)
                else:
                    copy_leaf(lf, arena.u8, arena.arr, base)
            h.copied()
            blocks = sums.blocks() if sums is not None else None
            arena.arr[manifest_at:manifest_at + len(manifest)] = np.frombuffer(
                manifest, dtype=np.uint8)
            fault_point("before-seal", h.step, self.rank)
            restorable = seal(blocks)
            if restorable is not None:
                h.restorable_step = restorable
            fault_point("after-seal", h.step, self.rank)
            h.sealed()
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer via the handle
            logger.warning("job=%s rank=%d step=%d snapshot failed: %s", self.job, self.rank,
                           h.step, exc)
            h.fail(exc)

    def _copy_cuda(self, arena: ArenaMap, leaves: list[Leaf], base: int) -> Any:
        """Queue device-to-host copies on a side stream; returns the event that marks them done."""
        arena.pin_for_cuda()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        stream = self._side_stream
        # The copy must start after the kernels that produced the tensors.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for lf in leaves:
                copy_leaf(lf, arena.u8, arena.arr, base, non_blocking=True)
                lf.value.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def _work(self) -> None:
        _lower_priority(self._nice)
        while True:
            job = self._queue.get()
            if job is None:
                return
            job()


def _plain_host_bytes(lf: Leaf) -> int | None:
    """The address of a leaf's bytes where they can be copied as they are (a dense,
    C-contiguous tensor in host memory with no lazy conjugate or negation, or such an
    array), else None (copied by ``copy_leaf``)."""
    if lf.kind == "tensor":
        t: torch.Tensor = lf.value
        if (t.device.type == "cpu" and t.layout is torch.strided and t.is_contiguous()
                and not t.is_conj() and not t.is_neg()
                and t.numel() * t.element_size() == lf.nbytes):
            return int(t.data_ptr())
    elif lf.kind == "ndarray":
        a: np.ndarray = lf.value
        if a.flags.c_contiguous and a.nbytes == lf.nbytes:
            return int(a.ctypes.data)
    return None


def copy_nice() -> int:
    """The niceness the copy thread adds to the trainer's: the environment's, or 0."""
    raw = os.environ.get(COPY_NICE_ENV, "")
    try:
        nice = int(raw) if raw else COPY_NICE
    except ValueError:
        raise ConfigError(f"{COPY_NICE_ENV}={raw!r}: expected an integer 0..19") from None
    if not 0 <= nice <= 19:
        raise ConfigError(f"{COPY_NICE_ENV}={nice}: expected an integer 0..19")
    return nice


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice`` (Linux: per thread; elsewhere a no-op)."""
    if nice == 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # a sandbox that forbids it: the copy runs at the trainer's priority
        logger.info("copy thread keeps the trainer's priority: %s", exc)
