"""The CRC arithmetic the daemon builds on CRC32C: block and range CRCs.

CRC32C itself and its combination are :mod:`shardguard.proto.crc32c` (ISA-L's
``crc32_iscsi``, shared with the client, which checks what a restore copies with it).
Checksums combine without the bytes (:func:`crc32c_combine`), so a piece's CRC is made
from the block CRCs its slots were sealed with (:func:`range_crc`) instead of reading the
bytes a second time.
Everything in the daemon that checksums (the store, protection, rebuild, verify, the
tier) imports this module, not the erasure codec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

from shardguard.proto.crc32c import (
    SEAL_BLOCK_BYTES,
    Buffer,
    byte_view,
    crc32c,
    crc32c_combine,
    crc32c_shift,
)

__all__ = ["Buffer", "CRC_BLOCK_BYTES", "SegmentCrcs", "crc32c", "crc32c_blocks",
           "combine_blocks", "crc32c_combine", "crc32c_shift", "crc_of", "range_crc", "slice_segments"]

#: Blocks of a slot's data with a CRC each, from its seal (see Store.block_crcs).
CRC_BLOCK_BYTES = SEAL_BLOCK_BYTES


def crc32c_blocks(buf: Buffer, block_bytes: int) -> tuple[int, list[int]]:
    """The CRC32C of ``buf`` and of each of its ``block_bytes`` blocks, in one read."""
    arr = byte_view(buf)
    blocks = [crc32c(arr[o:o + block_bytes]) for o in range(0, arr.size, block_bytes)]
    return combine_blocks(blocks, arr.size, block_bytes), blocks


def combine_blocks(blocks: Sequence[int], nbytes: int, block_bytes: int) -> int:
    """The CRC32C of ``nbytes`` bytes from the CRCs of their ``block_bytes`` blocks."""
    whole = 0
    for i, c in enumerate(blocks):
        whole = crc32c_combine(whole, c, min(block_bytes, nbytes - i * block_bytes))
    return whole


def crc_of(bufs: Iterable[memoryview]) -> int:
    """CRC32C of the concatenation of ``bufs``."""
    crc = 0
    for b in bufs:
        crc = crc32c(b, crc)
    return crc


def slice_segments(segs: list[memoryview], start: int, end: int) -> list[memoryview]:
    """Views covering bytes [start, end) of the concatenation of ``segs``."""
    out, pos = [], 0
    for seg in segs:
        lo, hi = max(start, pos), min(end, pos + len(seg))
        if lo < hi:
            out.append(seg[lo - pos:hi - pos])
        pos += len(seg)
    return out


@dataclasses.dataclass(frozen=True)
class SegmentCrcs:
    """What a slot's seal checksummed: its data bytes, and the CRC of each block of them."""

    data_bytes: int
    blocks: list[int] | None  # None: unknown, read the bytes
    block_bytes: int = CRC_BLOCK_BYTES


def range_crc(segs: list[memoryview], infos: list[SegmentCrcs], start: int, end: int) -> int:
    """CRC32C of bytes [start, end) of the concatenation of ``segs``.

    Whole blocks of a slot's data use the CRCs it was sealed with; only the
    bytes at the edges (and past the data: padding, manifest) are read.
    """
    crc, pos = 0, 0
    for seg, info in zip(segs, infos):
        lo, hi = max(start, pos) - pos, min(end, pos + len(seg)) - pos
        pos += len(seg)
        if lo >= hi:
            continue
        for a, b, known in _spans(info, lo, hi):
            c = known if known is not None else crc32c(seg[a:b])
            crc = crc32c_combine(crc, c, b - a)
    return crc


def _spans(info: SegmentCrcs, lo: int, hi: int) -> Iterator[tuple[int, int, int | None]]:
    """[lo, hi) cut at the block edges: (start, end, the block's CRC when it is whole)."""
    if info.blocks is None:
        yield lo, hi, None
        return
    bb, data_end = info.block_bytes, min(hi, info.data_bytes)
    at = lo
    while at < data_end:
        i = at // bb
        block_end = min((i + 1) * bb, info.data_bytes)
        end = min(block_end, data_end)
        yield at, end, info.blocks[i] if at == i * bb and end == block_end else None
        at = end
    if max(lo, info.data_bytes) < hi:
        yield max(lo, info.data_bytes), hi, None
