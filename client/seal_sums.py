"""The checksums a snapshot is sealed with, made by the copy engine as it copies.

The daemon keeps a CRC32C of each ``SEAL_BLOCK_BYTES`` block of a slot's data: the
protection layer makes its pieces' CRCs from them, restores and rebuilds check against
them. The copy thread makes them: each large host tensor or array is copied block by
block by proto/parallel_copy.py's checked copy, which checksums each chunk from the
source just before it copies it out of cache, so the bytes are read from memory once
(not copied, then read again by the daemon at seal); whatever else lies in the data
region (small leaves copied inline, device copies, padding) is checksummed from the
slot once it is there. The seal hands the blocks over (agent.proto ``block_crcs``); the
daemon checks that there is one per block and combines them.

What this trusts: the client's copy, as the daemon's read trusted it before. A CRC that
does not match the slot's bytes (a tensor changed under the copy, a bug) fails every
later check of the slot -- restore, rebuild, verify -- and is never restored silently.
"""

from __future__ import annotations

from shardguard.proto import parallel_copy
from shardguard.proto.crc32c import SEAL_BLOCK_BYTES, crc32c_at, crc32c_combine
from shardguard.proto.state_layout import CHECK_CHUNK_BYTES


class BlockSums:
    """The block CRCs of the data region ``[0, data_bytes)`` of the slot at ``addr``."""

    def __init__(self, addr: int, data_bytes: int, block_bytes: int = SEAL_BLOCK_BYTES) -> None:
        self.addr, self.data_bytes, self.block_bytes = addr, data_bytes, block_bytes
        # (offset, length, CRC) of the ranges checksummed as they were copied, none of
        # them across a block edge.
        self._spans: list[tuple[int, int, int]] = []

    def copy(self, off: int, src: int, n: int) -> None:
        """Copy ``n`` bytes from address ``src`` to data offset ``off`` of the slot,
        block by block, each checksummed as it is copied (on this thread only)."""
        if off < 0 or off + n > self.data_bytes:
            raise ValueError(f"bytes [{off}, {off + n}) are outside the {self.data_bytes}-byte "
                             f"data region")
        pos, end = off, off + n
        while pos < end:
            edge = min(end, (pos // self.block_bytes + 1) * self.block_bytes)
            crc = parallel_copy.copy(self.addr + pos, src + (pos - off), edge - pos,
                                     CHECK_CHUNK_BYTES, check=True)
            self._spans.append((pos, edge - pos, crc))
            pos = edge

    def blocks(self) -> list[int]:
        """Each block's CRC32C, in order: what no copy checksummed is read from the slot
        now (call it once every byte of the data region is in place)."""
        spans = sorted(self._spans)
        out: list[int] = []
        i = 0
        for lo in range(0, self.data_bytes, self.block_bytes):
            hi = min(lo + self.block_bytes, self.data_bytes)
            crc, pos = 0, lo
            while i < len(spans) and spans[i][0] < hi:
                o, n, c = spans[i]
                if o < pos:
                    raise ValueError(f"bytes [{o}, {o + n}) were copied twice")
                if o > pos:
                    crc = crc32c_at(self.addr + pos, o - pos, crc)
                crc = crc32c_combine(crc, c, n)
                pos = o + n
                i += 1
            if pos < hi:
                crc = crc32c_at(self.addr + pos, hi - pos, crc)
            out.append(crc)
        return out
