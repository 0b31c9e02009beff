"""Fresh memory for restores (proto/hostmem.py): faulted in ahead of the copy without a
byte changing, and the copy into it exact either way (proto/parallel_copy.py)."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
import torch

from shardguard.proto import hostmem
from shardguard.proto import parallel_copy as pc
from shardguard.proto.crc32c import crc32c


def _populate_works() -> bool:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        return hostmem.populate(addr, 1)
    finally:
        del addr
        m.close()


needs_populate = pytest.mark.skipif(not _populate_works(),
                                    reason="MADV_POPULATE_WRITE needs Linux 5.14")


@needs_populate
@pytest.mark.parametrize("lo, n", [(0, 1), (1, 4094), (100, 3 * 4096), (4095, 2), (0, 5 * 4096)])
def test_populate_changes_no_byte(lo: int, n: int) -> None:
    # Whole pages are faulted in around an unaligned range: the bytes in them stay.
    buf = np.frombuffer(mmap.mmap(-1, 6 * 4096), dtype=np.uint8)
    buf[::3] = 7
    before = buf.copy()
    assert hostmem.populate(buf.ctypes.data + lo, n)
    assert np.array_equal(buf, before)


@needs_populate
def test_populate_faults_in_untouched_memory() -> None:
    m = mmap.mmap(-1, 64 << 20)
    buf = np.frombuffer(m, dtype=np.uint8)
    assert hostmem.populate(buf.ctypes.data, len(buf))
    assert not buf.any()  # zeros, as fresh memory reads


def test_nothing_to_populate() -> None:
    assert hostmem.populate(4096, 0) is False


@pytest.mark.parametrize("populated", [True, False])
@pytest.mark.parametrize("n", [(8 << 20) + 4099, 333])
def test_copy_into_fresh_memory_is_exact(monkeypatch: pytest.MonkeyPatch, populated: bool,
                                         n: int) -> None:
    # Where the kernel cannot populate, fresh memory is written as before: same bytes.
    if not populated:
        monkeypatch.setattr(hostmem, "populate", lambda addr, nbytes: False)
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    out = torch.empty(n, dtype=torch.uint8)
    crc = pc.copy(out.data_ptr(), src.ctypes.data, n, 512 << 10, True, fresh=True)
    assert np.array_equal(out.numpy(), src)
    assert crc == crc32c(src)
