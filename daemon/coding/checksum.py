"""CRC32C (Castagnoli) over caller-owned memory, and the CRC arithmetic the daemon builds on.

ISA-L's ``crc32_iscsi`` (the library pyeclib's wheel bundles, coding/_isal.py; about 30
GB/s here), or a numpy fallback. Checksums combine without the bytes
(:func:`crc32c_combine`), so a piece's CRC is made from the block CRCs its slots' seals
computed (:func:`range_crc`) instead of reading the bytes a second time. Everything
that checksums (the store, protection, rebuild, verify, the tier) imports this
module, not the erasure codec.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
from collections.abc import Iterable, Iterator
from typing import TypeAlias

import numpy as np

from shardguard.daemon.coding import _isal
from shardguard.daemon.errors import InvalidRequestError

#: Anything exposing a C-contiguous buffer.
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap | np.ndarray
#: Blocks of a slot's data checksummed separately at seal (see Store.block_crcs).
CRC_BLOCK_BYTES = 4 << 20


def _view(buf: Buffer) -> np.ndarray:
    try:
        return np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise InvalidRequestError(f"CRC input is not a contiguous buffer: {exc}") from exc


_CRC_MASK = 0xFFFFFFFF
_CRC_POLY = 0x82F63B78  # Castagnoli, reflected


def crc32c(buf: Buffer, init: int = 0) -> int:
    """CRC32C (Castagnoli) of ``buf``, read in place.

    Standard convention (``crc32c(b"123456789") == 0xE3069283``); pass a
    previous result as ``init`` to continue it, so
    ``crc32c(b, crc32c(a)) == crc32c(a + b)``.

    Raises:
        InvalidRequestError: ``buf`` is not a contiguous buffer or ``init``
            is not a 32-bit value.
    """
    if not 0 <= init <= _CRC_MASK:
        raise InvalidRequestError(f"CRC init {init!r} is not a 32-bit value")
    arr = _view(buf)
    # ISA-L's crc32_iscsi neither inverts its seed nor its result; the
    # standard CRC32C does both, so the inversion happens here.
    state = init ^ _CRC_MASK
    lib = _isal.load()
    if lib is None:
        state = _crc32c_numpy(arr, state)
    else:
        addr, size = arr.ctypes.data, arr.size
        for off in range(0, size, _isal.MAX_CALL_BYTES):
            state = lib.crc32_iscsi(addr + off, min(_isal.MAX_CALL_BYTES, size - off), state)
    return state ^ _CRC_MASK


def _crc_mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in the reflected representation."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _crc_x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)  # x^(2^n)
        p = _crc_mulmod(p, p)
    return table


_CRC_X2N = _crc_x2n_table()


@functools.lru_cache(maxsize=256)
def crc32c_shift(nbytes: int) -> int:
    """The operator that :func:`crc32c_combine` applies for ``nbytes`` bytes (x^(8n) mod P);
    cached, since pieces and blocks repeat a few lengths."""
    if nbytes < 0:
        raise InvalidRequestError(f"byte count {nbytes} is negative")
    p, k = 1 << 31, 3  # x^0; x^(8n) = x^(n * 2^3)
    while nbytes:
        if nbytes & 1:
            p = _crc_mulmod(_CRC_X2N[k & 31], p)
        nbytes >>= 1
        k += 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """``crc32c(a + b)`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``, without the bytes."""
    return _crc_mulmod(crc32c_shift(len2), crc1) ^ crc2


def crc32c_blocks(buf: Buffer, block_bytes: int) -> tuple[int, list[int]]:
    """The CRC32C of ``buf`` and of each of its ``block_bytes`` blocks, in one read."""
    arr = _view(buf)
    blocks = [crc32c(arr[o:o + block_bytes]) for o in range(0, arr.size, block_bytes)]
    whole = 0
    for i, c in enumerate(blocks):
        whole = crc32c_combine(whole, c, min(block_bytes, arr.size - i * block_bytes))
    return whole, blocks


def _crc_byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC_POLY), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_byte_table()
_CRC_TABLE_LIST: list[int] = [int(v) for v in _CRC_TABLE]

# The numpy fallback reads the buffer as rows of _CRC_ROW bytes, runs the
# bytewise recurrence down all rows at once (one vector op per column), then
# folds the per-row CRCs together; that keeps the Python loop at
# O(sqrt(block)) steps instead of one per byte.
_CRC_ROW = 2048
_CRC_BLOCK = _CRC_ROW * 2048


def _crc_feed(state: np.ndarray, column: np.ndarray) -> np.ndarray:
    fed: np.ndarray = _CRC_TABLE[(state ^ column) & 0xFF] ^ (state >> 8)
    return fed


@functools.cache
def _crc_row_shift() -> tuple[list[int], ...]:
    """Tables that advance a raw CRC state over ``_CRC_ROW`` zero bytes.

    Advancing over zeros is linear in the state, so it splits into one
    256-entry table per state byte.
    """
    states = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]).ravel()
    zeros = np.zeros(states.size, dtype=np.uint32)
    for _ in range(_CRC_ROW):
        states = _crc_feed(states, zeros)
    return tuple(states.reshape(4, 256).tolist())


def _crc32c_numpy(data: np.ndarray, state: int) -> int:
    """Raw (uninverted) CRC32C update, without ISA-L; slow but correct."""
    z0, z1, z2, z3 = _crc_row_shift()
    whole = data.size - data.size % _CRC_ROW
    for start in range(0, whole, _CRC_BLOCK):
        # Transposed so each step of the recurrence reads one contiguous column.
        cols = np.ascontiguousarray(data[start : min(start + _CRC_BLOCK, whole)].reshape(-1, _CRC_ROW).T)
        rows = np.zeros(cols.shape[1], dtype=np.uint32)
        rows[0] = state
        for col in cols:
            rows = _crc_feed(rows, col)
        state = int(rows[0])
        for row_crc in rows[1:].tolist():
            state = z0[state & 0xFF] ^ z1[(state >> 8) & 0xFF] ^ z2[(state >> 16) & 0xFF] ^ z3[state >> 24] ^ row_crc
    for byte in data[whole:].tobytes():
        state = _CRC_TABLE_LIST[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


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

    Whole blocks of a slot's data use the CRCs its seal computed; only the
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
