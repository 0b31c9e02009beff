"""The block CRCs a snapshot is sealed with, made as the copy engine copies
(client/seal_sums.py): equal to the daemon's own read of the slot, whatever the leaves'
places, sizes and gaps, with and without the C copy."""

from __future__ import annotations

import numpy as np
import pytest

from shardguard.client.seal_sums import BlockSums
from shardguard.daemon.coding.checksum import crc32c_blocks
from shardguard.proto import parallel_copy
from shardguard.proto.crc32c import SEAL_BLOCK_BYTES

BLOCK = 64 << 10


def addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def fill(region: np.ndarray, rng: np.random.Generator,
         spans: list[tuple[int, int]], block: int) -> tuple[BlockSums, np.ndarray]:
    """``region`` holds random bytes (the gaps, as a slot's old contents); the ``spans``
    (offset, length) are copied into it from a random source through BlockSums."""
    region[:] = rng.integers(0, 256, region.size, dtype=np.uint8)
    sums = BlockSums(addr(region), region.size, block)
    want = region.copy()
    for off, n in spans:
        src = rng.integers(0, 256, n, dtype=np.uint8)
        want[off:off + n] = src
        sums.copy(off, addr(src), n)
    return sums, want


@pytest.mark.parametrize("native", [True, False], ids=["c-copy", "memmove"])
@pytest.mark.parametrize("spans,size", [
    ([], 5 * BLOCK + 17),  # nothing copied: every block read from the slot
    ([(0, 5 * BLOCK)], 5 * BLOCK),  # one leaf, block-aligned
    ([(13, 3 * BLOCK + 5)], 4 * BLOCK + 100),  # across block edges, gaps both sides
    ([(0, 7), (7, BLOCK - 7), (BLOCK + 64, 3), (2 * BLOCK - 1, 2)], 2 * BLOCK + 1),  # tiny ones
    ([(4096, 9 * BLOCK), (9 * BLOCK + 8192, BLOCK // 2)], 10 * BLOCK + 333),
])
def test_blocks_equal_a_read_of_the_slot(spans: list[tuple[int, int]], size: int,
                                          native: bool, monkeypatch) -> None:
    monkeypatch.setattr(parallel_copy, "USE_NATIVE", native)
    rng = np.random.default_rng(size)
    region = np.empty(size, dtype=np.uint8)
    sums, want = fill(region, rng, spans, BLOCK)
    assert np.array_equal(region, want)  # copied
    assert sums.blocks() == crc32c_blocks(region, BLOCK)[1]


def test_default_blocks_are_the_daemons() -> None:
    """With the Seal contract's block size, over a leaf larger than a block."""
    rng = np.random.default_rng(1)
    region = np.empty(2 * SEAL_BLOCK_BYTES + 4097, dtype=np.uint8)
    sums, _ = fill(region, rng, [(4096, SEAL_BLOCK_BYTES + 5)], SEAL_BLOCK_BYTES)
    assert sums.blocks() == crc32c_blocks(region, SEAL_BLOCK_BYTES)[1]


def test_an_empty_region_has_no_blocks() -> None:
    assert BlockSums(0, 0, BLOCK).blocks() == []


def test_a_copy_outside_the_region_or_twice_is_refused() -> None:
    region = np.zeros(2 * BLOCK, dtype=np.uint8)
    src = np.ones(BLOCK, dtype=np.uint8)
    sums = BlockSums(addr(region), region.size, BLOCK)
    with pytest.raises(ValueError, match="outside"):
        sums.copy(BLOCK + 1, addr(src), BLOCK)
    assert not region.any()  # nothing written
    sums.copy(0, addr(src), 100)
    sums.copy(50, addr(src), 100)
    with pytest.raises(ValueError, match="twice"):
        sums.blocks()
