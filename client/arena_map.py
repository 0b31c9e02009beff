"""The rank's arena mapped into the trainer: the daemon's /dev/shm file, its header read
back, and (for CUDA leaves) its registration as pinned memory."""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from shardguard.proto import arena as fmt
from shardguard.proto import hostmem
from shardguard.proto.errors import ArenaFormatError, ShardguardError

logger = logging.getLogger(__name__)


@dataclass
class ArenaMap:
    """The rank's arena, mapped into this process."""

    path: str
    size: int
    slot_bytes: int
    mm: mmap.mmap
    u8: torch.Tensor
    arr: np.ndarray
    cuda_registered: bool = False
    #: Slots whose pages are mapped (:meth:`populate_slot`).
    populated: set[int] = field(default_factory=set)
    #: The header's bytes when last parsed, and what they parsed to: a rank waiting for its
    #: step to be restorable reads the header every few ms, and between the daemon's
    #: writes of it (a seal, a step restorable) compares 4 KiB instead of parsing them.
    _seen: tuple[bytes, fmt.Header] | None = field(default=None, repr=False)

    def header(self) -> fmt.Header:
        # The daemon may be rewriting the header this instant; a torn read fails its checksum.
        for _ in range(100):
            try:
                return self._read_header()
            except ArenaFormatError:
                time.sleep(0.001)
        return self._read_header()

    def _read_header(self) -> fmt.Header:
        raw = bytes(self.arr[:fmt.HEADER_BYTES])
        if self._seen is not None and self._seen[0] == raw:
            return self._seen[1]
        parsed = fmt.unpack_header(raw)  # a torn read raises, and is not kept
        self._seen = (raw, parsed)
        return parsed

    def is_restorable(self, step: int) -> bool:
        return any(s.state == fmt.SlotState.RESTORABLE and s.step == step
                   for s in self.header().slots)

    def slot_base(self, slot: int) -> int:
        """Where ``slot`` starts in the arena."""
        return fmt.slot_offset(slot, self.slot_bytes)

    def populate_slot(self, slot: int) -> None:
        """Map every page of ``slot`` now, writable, in one call (once per mapping): before a
        copy into it, so the copy does not fault page by page. Where the kernel cannot
        (before Linux 5.14) the pages are mapped as they are written, as before."""
        if slot in self.populated:
            return
        hostmem.populate_read(self.arr.ctypes.data + self.slot_base(slot), self.slot_bytes)
        self.populated.add(slot)

    def pin_for_cuda(self) -> None:
        """Register the arena as pinned memory (once): what lets a non_blocking
        device-to-host copy into it run asynchronously."""
        if self.cuda_registered:
            return
        rc = torch.cuda.cudart().cudaHostRegister(self.u8.data_ptr(), self.size, 0)
        if int(rc) != 0:
            raise ShardguardError(f"cudaHostRegister of arena {self.path} failed ({rc})")
        self.cuda_registered = True

    def close(self) -> None:
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.u8.data_ptr())
            self.cuda_registered = False
        del self.u8, self.arr
        try:
            self.mm.close()
        except BufferError:
            logger.debug("arena %s still referenced; unmapped at exit", self.path)


def map_arena(path: str, size: int, slot_bytes: int, lazy_slots: Iterable[int] = ()
              ) -> ArenaMap:
    """Map the arena; its header's pages and those of the slot a restore reads next (the
    one holding the restorable step, :func:`restorable_slots`) are mapped at once, every
    other slot's at its first snapshot (:meth:`ArenaMap.populate_slot`, on the copy
    thread) or as it is touched.

    Mapping the pages of a slot that is there already costs ~70 ms per GiB (one
    ``MADV_POPULATE_READ``: a shared mapping's tmpfs pages come in writable), a slot written
    page by page through an empty mapping ~375 ms per GiB of write faults (2 cores, KVM,
    2026-12-06). A restarting trainer needs only the restorable slot before it can resume:
    the other is the next snapshot's, so mapping it at connect put ~0.1 s per GiB of state
    on the way to the restore, and on a node whose cores a rebuild was using, on the way
    of the rebuild. ``lazy_slots``, slots the daemon is still allocating and faulting in
    (a just rebuilt arena's other slot, ``RegisterReply.lazy_slots``), are never mapped
    here: faulting them in would clear their fresh pages in this process, on the way to
    the restore."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise ArenaFormatError(f"arena {path} is not {size} bytes")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    u8 = torch.frombuffer(mm, dtype=torch.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    hostmem.populate_read(arr.ctypes.data, fmt.HEADER_BYTES)
    m = ArenaMap(path, size, slot_bytes, mm, u8, arr)
    for i in restorable_slots(m, lazy_slots):
        m.populate_slot(i)
    return m


def restorable_slots(m: ArenaMap, lazy: Iterable[int] = ()) -> list[int]:
    """The slots of ``m`` whose header says they hold the restorable step, but those the
    daemon named ``lazy``: what a restore reads next."""
    skip = set(lazy)
    return [i for i, s in enumerate(m.header().slots)
            if s.state == fmt.SlotState.RESTORABLE and i not in skip]
