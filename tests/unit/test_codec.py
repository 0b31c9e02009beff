"""Codec and CRC32C: exact recovery, pyeclib parity equality, the fallbacks."""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyeclib.ec_iface import ECDriver

from shardguard.daemon.coding import _isal
from shardguard.daemon.coding.checksum import crc32c, crc32c_blocks, crc32c_combine, crc32c_shift
from shardguard.daemon.coding.codec import PYECLIB_HEADER_BYTES, Codec
from shardguard.daemon.errors import CodecError, InsufficientPiecesError, InvalidRequestError
from shardguard.proto import crc32c as crc32c_module
from shardguard.proto import isal

CODES = [(3, 1), (4, 2), (6, 2), (10, 4)]
# Empty, one byte, odd, unaligned just past a page, page aligned.
SIZES = [0, 1, 7, 4097, 8192]

# Without ISA-L the codec runs on pyeclib and most tests still apply; these do not.
needs_isal = pytest.mark.skipif(_isal.load() is None, reason="needs the ISA-L library (pyeclib wheel)")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def random_pieces(count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


def zeros(count: int, size: int) -> list[np.ndarray]:
    return [np.zeros(size, dtype=np.uint8) for _ in range(count)]


def stripe(codec: Codec, size: int, seed: int = 0) -> list[np.ndarray]:
    """k random data pieces followed by their m parity pieces."""
    data = random_pieces(codec.k, size, seed)
    parity = zeros(codec.m, size)
    codec.encode(data, parity)
    return data + parity


def pyeclib_parity(k: int, m: int, data: list[np.ndarray]) -> list[bytes]:
    frags = ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy").encode(b"".join(d.tobytes() for d in data))
    return [f[PYECLIB_HEADER_BYTES:] for f in frags[k:]]


def erasures(n: int, m: int) -> Iterator[tuple[int, ...]]:
    """Every set of 1..m lost piece indices out of n."""
    for lost in range(1, m + 1):
        yield from itertools.combinations(range(n), lost)


def rebuild(codec: Codec, pieces: list[np.ndarray], lost: tuple[int, ...]) -> dict[int, np.ndarray]:
    out = {i: np.full(pieces[0].size, 0xA5, dtype=np.uint8) for i in lost}
    codec.decode({i: p for i, p in enumerate(pieces) if i not in lost}, out)
    return out


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC32C, straight from the definition."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.fixture
def without_isal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run as if no ISA-L could be found."""
    monkeypatch.setenv(_isal.ENV_LIBRARY, "none")
    _isal.load.cache_clear()
    crc32c_module._update.cache_clear()  # CRC32C's own lookup, cached per process
    yield
    monkeypatch.delenv(_isal.ENV_LIBRARY)
    _isal.load.cache_clear()
    crc32c_module._update.cache_clear()  # else every later test checksums without ISA-L


# --------------------------------------------------------------------------
# parity equals pyeclib's
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k,m", CODES)
@pytest.mark.parametrize("size", [4096, 3 * 4096, 4097, 1])
def test_parity_equals_pyeclib_isa_l_rs_cauchy(k: int, m: int, size: int) -> None:
    with Codec(k, m, threads=1) as codec:
        pieces = stripe(codec, size, seed=k * 100 + m)
    assert [p.tobytes() for p in pieces[k:]] == pyeclib_parity(k, m, pieces[:k])


@needs_isal
def test_library_cauchy_matrix_equals_python_twin() -> None:
    lib = _isal.load()
    assert lib is not None
    for k, m in [*CODES, (1, 1), (200, 55)]:
        assert lib.cauchy1_matrix(k + m, k) == _isal.cauchy1_matrix(k + m, k)


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k,m", CODES)
def test_every_erasure_pattern_is_recovered(k: int, m: int) -> None:
    with Codec(k, m, threads=1) as codec:
        for size in SIZES if k + m <= 8 else [4097]:
            pieces = stripe(codec, size, seed=size)
            for lost in erasures(k + m, m):
                out = rebuild(codec, pieces, lost)
                for i in lost:
                    assert np.array_equal(out[i], pieces[i]), (size, lost, i)


@pytest.mark.parametrize("k,m", CODES)
@pytest.mark.parametrize("size", SIZES)
def test_sizes_with_m_data_pieces_lost(k: int, m: int, size: int) -> None:
    with Codec(k, m, threads=1) as codec:
        pieces = stripe(codec, size, seed=3)
        lost = tuple(range(m))
        out = rebuild(codec, pieces, lost)
    assert all(np.array_equal(out[i], pieces[i]) for i in lost)


@settings(max_examples=60, deadline=None)
@given(
    code=st.sampled_from(CODES),
    size=st.integers(0, 3000),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_random_erasures_recover_exactly(code: tuple[int, int], size: int, seed: int, data: st.DataObject) -> None:
    k, m = code
    lost = tuple(data.draw(st.sets(st.integers(0, k + m - 1), min_size=1, max_size=m), label="lost"))
    # Any k of the survivors must do, not just the lowest ones.
    survivors = [i for i in range(k + m) if i not in lost]
    used = data.draw(st.permutations(survivors), label="order")[: data.draw(st.integers(k, len(survivors)))]
    with Codec(k, m, threads=1, chunk_bytes=data.draw(st.integers(1, 4096), label="chunk")) as codec:
        pieces = stripe(codec, size, seed)
        out = {i: np.zeros(size, dtype=np.uint8) for i in lost}
        codec.decode({i: pieces[i] for i in used}, out)
    assert all(np.array_equal(out[i], pieces[i]) for i in lost)


def test_too_few_pieces() -> None:
    with Codec(4, 2, threads=1) as codec:
        pieces = stripe(codec, 64)
        with pytest.raises(InsufficientPiecesError, match="need 4 pieces"):
            codec.decode({0: pieces[0], 1: pieces[1], 5: pieces[5]}, {2: zeros(1, 64)[0]})


# --------------------------------------------------------------------------
# chunks, threads, ranges, incremental encoding
# --------------------------------------------------------------------------

MULTI_CHUNK = 3 * (1 << 20) + 123  # several chunks of an odd size, odd tail


@needs_isal
def test_thread_pool_equals_single_thread_over_many_chunks() -> None:
    k, m = 4, 2
    data = random_pieces(k, MULTI_CHUNK, seed=7)
    with Codec(k, m, threads=1) as one, Codec(k, m, threads=2, chunk_bytes=64 * 1024 + 1) as pool:
        assert pool.threads == 2
        p1, p2 = zeros(m, MULTI_CHUNK), zeros(m, MULTI_CHUNK)
        one.encode(data, p1)
        pool.encode(data, p2)
        assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
        lost = (0, 3)
        pieces = data + p1
        out_one, out_pool = rebuild(one, pieces, lost), rebuild(pool, pieces, lost)
    assert all(np.array_equal(out_pool[i], pieces[i]) and np.array_equal(out_one[i], pieces[i]) for i in lost)
    assert [p.tobytes() for p in p1] == pyeclib_parity(k, m, data)


def test_encode_range_touches_only_its_range() -> None:
    k, m, size = 3, 2, 10_001
    with Codec(k, m, threads=2, chunk_bytes=777) as codec:
        data = random_pieces(k, size, seed=11)
        full = zeros(m, size)
        codec.encode(data, full)
        # Frames arriving in pieces: encode each as soon as it is complete.
        parts = [np.full(size, 0x5A, dtype=np.uint8) for _ in range(m)]
        edges = [0, 1, 4096, 4097, 9000, size]
        for start, stop in itertools.pairwise(edges):
            codec.encode_range(data, parts, start, stop)
            assert all((p[stop:] == 0x5A).all() for p in parts)
        assert all(np.array_equal(a, b) for a, b in zip(full, parts))
        out = {0: np.zeros(size, dtype=np.uint8)}
        codec.decode_range({i: p for i, p in enumerate(data + full) if i != 0}, out, 100, 200)
        assert np.array_equal(out[0][100:200], data[0][100:200])
        assert not out[0][:100].any() and not out[0][200:].any()


@pytest.mark.parametrize("backend", [pytest.param("isal", marks=needs_isal), "pyeclib"])
def test_encode_update_in_any_order_equals_encode(backend: str) -> None:
    k, m, size = 4, 2, 5000
    with Codec(k, m, threads=2, chunk_bytes=1024, backend=backend) as codec:
        data = random_pieces(k, size, seed=5)
        full, acc = zeros(m, size), zeros(m, size)
        codec.encode(data, full)
        for q in (2, 0, 3, 1):
            codec.encode_update(q, data[q], acc, 0, 3000)
            codec.encode_update(q, data[q], acc, 3000)
    assert all(np.array_equal(a, b) for a, b in zip(full, acc))


@pytest.mark.parametrize("backend", [pytest.param("isal", marks=needs_isal), "pyeclib"])
@pytest.mark.parametrize("m", [1, 3])
def test_the_first_share_overwrites_what_the_parity_held(backend: str, m: int) -> None:
    """``first=True`` writes a piece's share over whatever the buffer held (a reused
    parity file); the later shares added to it give :meth:`encode`'s parity, in any
    order of pieces and with the first share of each range from a different piece."""
    k, size = 4, 5000
    with Codec(k, m, threads=2, chunk_bytes=1024, backend=backend) as codec:
        data = random_pieces(k, size, seed=7)
        full = zeros(m, size)
        codec.encode(data, full)
        acc = random_pieces(m, size, seed=8)  # stale bytes, not zeros
        codec.encode_update(2, data[2], acc, 0, 3000, first=True)
        codec.encode_update(0, data[0], acc, 3000, first=True)
        for q, (lo, hi) in [(0, (0, 3000)), (1, (0, size)), (3, (0, size)), (2, (3000, size))]:
            codec.encode_update(q, data[q], acc, lo, hi)
        assert all(np.array_equal(a, b) for a, b in zip(full, acc))
        # A share written twice as first is that share alone, not the stripe's parity.
        alone = random_pieces(m, size, seed=9)
        codec.encode_update(1, data[1], alone, first=True)
        only = zeros(m, size)
        codec.encode_update(1, data[1], only)
        assert all(np.array_equal(a, b) for a, b in zip(alone, only))


# --------------------------------------------------------------------------
# buffers: zero copy, read-only inputs, mmap
# --------------------------------------------------------------------------


def test_works_in_place_on_mmap_and_readonly_inputs() -> None:
    k, m, size = 3, 1, 4096 + 13
    data = [bytes(p) for p in random_pieces(k, size, seed=2)]  # read-only inputs
    with mmap.mmap(-1, 2 * size) as arena, Codec(k, m, threads=1) as codec:
        view = memoryview(arena)
        try:
            codec.encode(data, [view[size : 2 * size]])
            assert arena[size : 2 * size] == pyeclib_parity(k, m, [np.frombuffer(d, np.uint8) for d in data])[0]
            codec.decode({1: data[1], 2: data[2], 3: view[size : 2 * size]}, {0: view[:size]})
            assert arena[:size] == data[0]
        finally:
            view.release()


def test_rejects_bad_buffers_and_arguments() -> None:
    with Codec(3, 1, threads=1) as codec:
        data = random_pieces(3, 16, seed=0)
        with pytest.raises(InvalidRequestError, match="read-only"):
            codec.encode(data, [bytes(16)])
        with pytest.raises(InvalidRequestError, match="differ in length"):
            codec.encode(data, zeros(1, 17))
        with pytest.raises(InvalidRequestError, match="expected 3 data"):
            codec.encode(data[:2], zeros(1, 16))
        with pytest.raises(InvalidRequestError, match="contiguous"):
            codec.encode(data, [np.zeros(32, dtype=np.uint8)[::2]])
        with pytest.raises(InvalidRequestError, match="outside"):
            codec.encode_range(data, zeros(1, 16), 4, 17)
        with pytest.raises(InvalidRequestError, match="both available"):
            codec.decode({0: data[0], 1: data[1], 2: data[2]}, {2: zeros(1, 16)[0]})
        with pytest.raises(InvalidRequestError, match=r"outside 0\.\.3"):
            codec.decode({0: data[0], 1: data[1], 2: data[2]}, {4: zeros(1, 16)[0]})
        with pytest.raises(InvalidRequestError, match=r"outside 0\.\.2"):
            codec.encode_update(3, data[0], zeros(1, 16))
    for kwargs in ({"k": 0, "m": 1}, {"k": 1, "m": 0}, {"k": 200, "m": 56}):
        with pytest.raises(InvalidRequestError, match="k >= 1"):
            Codec(**kwargs)
    with pytest.raises(InvalidRequestError, match="threads"):
        Codec(2, 1, threads=0)
    with pytest.raises(InvalidRequestError, match="chunk_bytes"):
        Codec(2, 1, chunk_bytes=0)
    with pytest.raises(InvalidRequestError, match="backend"):
        Codec(2, 1, backend="jerasure")


# --------------------------------------------------------------------------
# pyeclib fallback
# --------------------------------------------------------------------------


@needs_isal
@pytest.mark.parametrize("k,m", [(3, 1), (4, 2)])
def test_pyeclib_backend_equals_isal(k: int, m: int) -> None:
    size = 4097
    with Codec(k, m, threads=1, backend="isal") as fast, Codec(k, m, backend="pyeclib", chunk_bytes=1000) as slow:
        assert slow.backend == "pyeclib" and slow.threads == 1
        pieces = stripe(fast, size, seed=9)
        parity = zeros(m, size)
        slow.encode(pieces[:k], parity)
        assert all(np.array_equal(a, b) for a, b in zip(parity, pieces[k:]))
        for lost in erasures(k + m, m):
            out = rebuild(slow, pieces, lost)
            assert all(np.array_equal(out[i], pieces[i]) for i in lost), lost


def test_without_isal_falls_back_everywhere(without_isal: None) -> None:
    assert _isal.load() is None
    with Codec(4, 2) as codec:
        assert codec.backend == "pyeclib"
        pieces = stripe(codec, 333, seed=1)
        assert all(np.array_equal(v, pieces[i]) for i, v in rebuild(codec, pieces, (1, 4)).items())
    with pytest.raises(CodecError, match="no ISA-L"):
        Codec(4, 2, backend="isal")
    assert crc32c(b"123456789") == 0xE3069283


@needs_isal
def test_isal_is_found_through_pyeclib_and_bad_paths_are_wrapped(tmp_path: os.PathLike[str]) -> None:
    assert any("pyeclib" in path for path in _isal.candidate_paths())
    with pytest.raises(CodecError, match="cannot use ISA-L"):
        _isal.open_library(os.path.join(tmp_path, "libisal.so.2"))


# --------------------------------------------------------------------------
# CRC32C
# --------------------------------------------------------------------------

# RFC 3720 (iSCSI) appendix B.4, plus the customary check value.
CRC_VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", CRC_VECTORS)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert crc32c_reference(data) == expected


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32c_matches_reference_and_chains(a: bytes, b: bytes) -> None:
    assert crc32c(a) == crc32c_reference(a)
    assert crc32c(b, crc32c(a)) == crc32c(a + b) == crc32c_reference(b, crc32c_reference(a))


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32c_combine_equals_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
    whole, blocks = crc32c_blocks(a + b, 7)
    assert whole == crc32c(a + b)
    assert blocks == [crc32c((a + b)[o:o + 7]) for o in range(0, len(a + b), 7)]


def test_crc32c_combine_over_a_gigabyte_of_zeros() -> None:
    # Lengths far beyond what a test can hash byte by byte: 1 GiB of zeros is 256 4 MiB blocks.
    block = bytes(4 << 20)
    whole = 0
    for _ in range(256):
        whole = crc32c_combine(whole, crc32c(block), len(block))
    assert whole == crc32c(bytes(4 << 20), crc32c_combine(0, crc32c(bytes(1020 << 20)),
                                                           1020 << 20))
    with pytest.raises(InvalidRequestError):
        crc32c_shift(-1)


@pytest.mark.parametrize("length", [(1 << 29) - 1, 1 << 29, (1 << 30) + 3, (1 << 32) + 5])
def test_crc32c_combine_beyond_512_mib(length: int) -> None:
    """The shift over 2^29 bytes and more (x^(2^32) and up): a wrapping table made every
    such combination wrong, so a restore of a 512 MiB tensor failed its check. The bytes
    after ``a`` are zeros (untouched pages, nothing allocated); ``crc1`` is not zero, so
    the shift is really applied."""
    a = b"shardguard" * 7
    zeros = np.zeros(length, dtype=np.uint8)
    direct = crc32c(zeros, crc32c(a))
    assert crc32c_combine(crc32c(a), crc32c(zeros), length) == direct


def test_crc32c_reads_any_buffer_in_place() -> None:
    raw = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    expected = crc32c(raw.tobytes())
    with mmap.mmap(-1, raw.size) as mm:
        mm[:] = raw.tobytes()
        assert crc32c(mm) == expected
    assert crc32c(memoryview(raw.tobytes())[10:20]) == crc32c(raw.tobytes()[10:20])
    assert crc32c(bytearray(raw.tobytes())) == expected
    assert crc32c(raw.reshape(100, 100)) == expected
    with pytest.raises(InvalidRequestError, match="contiguous"):
        crc32c(raw[::2])
    with pytest.raises(InvalidRequestError, match="32-bit"):
        crc32c(b"", 1 << 32)


@needs_isal
@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 2049, 4 * (1 << 20) + 2048 + 3])
def test_crc32c_numpy_fallback_equals_isal(size: int) -> None:
    from shardguard.proto.crc32c import _crc32c_numpy

    raw = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    seed = 0x12345678
    assert _crc32c_numpy(raw, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF == crc32c(raw, seed)


# --------------------------------------------------------------------------
# big buffers
# --------------------------------------------------------------------------


@needs_isal
def test_calls_past_a_c_int_are_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """ISA-L takes lengths as C ints; shrink the limit to check the splitting cheaply."""
    raw = np.random.default_rng(4).integers(0, 256, 10_000, dtype=np.uint8)
    expected = crc32c(raw)
    monkeypatch.setattr(_isal, "MAX_CALL_BYTES", 999)  # the codec's
    monkeypatch.setattr(isal, "MAX_CALL_BYTES", 999)  # CRC32C's (proto/crc32c.py)
    assert crc32c(raw) == expected
    with pytest.raises(InvalidRequestError, match="chunk_bytes"):
        Codec(2, 1, chunk_bytes=1000)


@pytest.mark.slow
def test_pieces_past_2_gib() -> None:
    """Real lengths beyond a C int, for the codec and the CRC (6 GiB of memory)."""
    size = (1 << 31) + 4096 + 1
    block = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    data = [np.empty(size, dtype=np.uint8) for _ in range(2)]
    whole = size - size % block.size
    for q, piece in enumerate(data):
        piece[:whole].reshape(-1, block.size)[:] = np.roll(block, q)
        piece[whole:] = block[: size - whole]
    parity = zeros(1, size)
    with Codec(2, 1, chunk_bytes=1 << 30) as codec:
        codec.encode(data, parity)
        expected = crc32c(data[0])
        assert crc32c(data[0][-5000:], crc32c(data[0][:-5000])) == expected
        data[0].fill(0xA5)
        codec.decode({1: data[1], 2: parity[0]}, {0: data[0]})
    assert crc32c(data[0]) == expected
