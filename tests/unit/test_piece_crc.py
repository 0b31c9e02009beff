"""A piece's CRC32C from the block CRCs its slots' seals computed (checksum.range_crc)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shardguard.daemon.coding.checksum import (
    SegmentCrcs,
    crc32c,
    crc_of,
    range_crc,
    slice_segments,
)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[memoryview], list[SegmentCrcs], int, int]:
    block = draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    segs, infos = [], []
    for _ in range(draw(st.integers(1, 4))):
        used = draw(st.integers(0, 400))
        data = draw(st.integers(0, used))  # data, then padding and manifest
        seg = memoryview(rng.integers(0, 256, used, dtype=np.uint8).tobytes())
        blocks = None if draw(st.booleans()) and draw(st.booleans()) else [
            crc32c(seg[o:min(o + block, data)]) for o in range(0, data, block)]
        segs.append(seg)
        infos.append(SegmentCrcs(data, blocks, block))
    total = sum(len(s) for s in segs)
    start = draw(st.integers(0, total))
    return segs, infos, start, draw(st.integers(start, total))


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_range_crc_equals_reading_the_bytes(layout) -> None:
    segs, infos, start, end = layout
    assert range_crc(segs, infos, start, end) == crc_of(slice_segments(segs, start, end))


def test_whole_default_blocks() -> None:
    from shardguard.daemon.coding.checksum import CRC_BLOCK_BYTES

    seg = memoryview(np.random.default_rng(1).integers(0, 256, 3 * CRC_BLOCK_BYTES + 12345,
                                                       dtype=np.uint8).tobytes())
    data = 3 * CRC_BLOCK_BYTES + 10000
    blocks = [crc32c(seg[o:min(o + CRC_BLOCK_BYTES, data)]) for o in range(0, data, CRC_BLOCK_BYTES)]
    info = SegmentCrcs(data, blocks)
    for start, end in [(0, len(seg)), (5, len(seg) - 7), (CRC_BLOCK_BYTES, 3 * CRC_BLOCK_BYTES)]:
        assert range_crc([seg], [info], start, end) == crc32c(seg[start:end])
