"""The restore's C copy (proto/_fastcopy.c): every byte copied, nothing around it touched,
and the CRC32C of what it copied, at every alignment and length its loops split on."""

from __future__ import annotations

import os
import shutil
import sysconfig

import numpy as np
import pytest

from shardguard.proto import parallel_copy as pc
from shardguard.proto.crc32c import MASK, crc32c, update_address


def test_the_install_built_it() -> None:
    """make install builds it wherever a C compiler exists (setup.py); a silent fallback
    would only make restores slower, so a build that broke fails here."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the install cannot build proto/_fastcopy.c")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no Python headers: the install cannot build proto/_fastcopy.c")
    assert pc.native() is not None


STREAM_MIN = 256 << 10  # SG_STREAM_MIN_BYTES: plain stores below, streaming ones from it


@pytest.mark.parametrize("n", [0, 1, 15, 63, 64, 65, 4095, STREAM_MIN - 1, STREAM_MIN,
                               STREAM_MIN + 77, (3 << 20) + 5])
@pytest.mark.parametrize("dst_skew,src_skew", [(0, 0), (1, 0), (0, 3), (7, 13)])
@pytest.mark.parametrize("chunk", [64 << 10, 1 << 20])
@pytest.mark.parametrize("fresh", [0, 1])
def test_copies_exactly_and_checksums_the_bytes(n: int, dst_skew: int, src_skew: int,
                                                chunk: int, fresh: int) -> None:
    fast = pc.native()
    update = update_address()
    if fast is None or update is None:
        pytest.skip("no C copy or no ISA-L here")
    rng = np.random.default_rng(n + dst_skew)
    src = rng.integers(0, 256, n + 64, dtype=np.uint8)
    dst = np.full(n + 64, 0xEE, dtype=np.uint8)
    s, d = src.ctypes.data + src_skew, dst.ctypes.data + dst_skew
    body = src[src_skew:src_skew + n]
    state = fast(d, s, n, chunk, 0x12345678 ^ MASK, update, fresh)
    assert state ^ MASK == crc32c(body, 0x12345678)  # continued from a previous CRC
    assert np.array_equal(dst[dst_skew:dst_skew + n], body)
    assert (dst[:dst_skew] == 0xEE).all() and (dst[dst_skew + n:] == 0xEE).all()
    # Unchecked: the same copy, the state handed back untouched.
    dst[:] = 0
    assert fast(d, s, n, chunk, 99, None, fresh) == 99
    assert np.array_equal(dst[dst_skew:dst_skew + n], body)


def test_the_fallback_gives_the_same_crc(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 9 << 20  # parallel parts
    src = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
    crcs = []
    for native in (True, False):
        monkeypatch.setattr(pc, "USE_NATIVE", native)
        dst = np.zeros(n, dtype=np.uint8)
        crcs.append(pc.copy(dst.ctypes.data, src.ctypes.data, n, 512 << 10, True))
        assert np.array_equal(dst, src)
    assert crcs[0] == crcs[1] == crc32c(src)
