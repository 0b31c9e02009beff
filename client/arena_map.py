"""The rank's arena mapped into the trainer: the daemon's /dev/shm file, its header read
back, and (for CUDA leaves) its registration as pinned memory."""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

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

    def header(self) -> fmt.Header:
        # The daemon may be rewriting the header this instant; a torn read fails its checksum.
        for _ in range(100):
            try:
                return fmt.unpack_header(self.arr[:fmt.HEADER_BYTES])
            except ArenaFormatError:
                time.sleep(0.001)
        return fmt.unpack_header(self.arr[:fmt.HEADER_BYTES])

    def is_restorable(self, step: int) -> bool:
        return any(s.state == fmt.SlotState.RESTORABLE and s.step == step
                   for s in self.header().slots)

    def slot_base(self, slot: int) -> int:
        """Where ``slot`` starts in the arena."""
        return fmt.slot_offset(slot, self.slot_bytes)

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
    """Map the arena, every page now (``MAP_POPULATE``: the first snapshot does not
    fault) but those of ``lazy_slots``: slots the daemon is still allocating and
    faulting in (a just rebuilt arena's other slot, ``RegisterReply.lazy_slots``).
    Faulting them in here would clear their fresh pages in this process, on the way to
    the restore; they are mapped when first written instead."""
    lazy = sorted(set(lazy_slots))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise ArenaFormatError(f"arena {path} is not {size} bytes")
        flags = mmap.MAP_SHARED | (0 if lazy else getattr(mmap, "MAP_POPULATE", 0))
        mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    u8 = torch.frombuffer(mm, dtype=torch.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    if lazy:
        pos = 0  # every byte outside the lazy slots, faulted in
        for i in lazy:
            lo = fmt.slot_offset(i, slot_bytes)
            hostmem.populate_read(arr.ctypes.data + pos, lo - pos)
            pos = lo + slot_bytes
        hostmem.populate_read(arr.ctypes.data + pos, size - pos)
    return ArenaMap(path, size, slot_bytes, mm, u8, arr)
