"""CRC32C (Castagnoli), the checksum of every slot and piece: the one implementation.

The client checksums a snapshot's data block by block as it copies it into its slot
(``client/seal_sums.py``), and checks what a restore copies with it, chunk by chunk as
it copies, the slot read once (``state_layout.rebuild``, ``parallel_copy``); the daemon
checksums pieces, parity and the tier with it, and slots at seal when the client gave
no block CRCs (``daemon/coding/checksum.py`` adds combination and range CRCs on top). ISA-L's ``crc32_iscsi``
(:mod:`shardguard.proto.isal`), or a numpy fallback without ISA-L.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np

from shardguard.proto import isal
from shardguard.proto.errors import CodecError, InvalidRequestError

logger = logging.getLogger(__name__)

#: Anything exposing a C-contiguous buffer.
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap | np.ndarray

MASK = 0xFFFFFFFF
#: A slot's data is checksummed in blocks of this size (a CRC32C per block, made as the
#: client copies or by the daemon at seal): the protection layer makes its pieces' CRCs
#: from them without reading the bytes again. Part of the Seal contract (agent.proto).
SEAL_BLOCK_BYTES = 4 << 20
#: The Castagnoli polynomial, reflected.
POLY = 0x82F63B78

#: ``crc32_iscsi(buf, len, state) -> state``: a raw (uninverted) CRC32C update.
_Update = Callable[[int, int, int], int]

# ISA-L's own dispatcher picks crc32_iscsi's kernel at run time, but not its AVX-512
# one on every CPU that has what it needs: on this AMD EPYC it runs the AVX2 kernel,
# 27 GB/s from cache, against 52 GB/s for crc32_iscsi_by16_10 (and a restore checks
# each chunk from cache right after copying it, so that speed is what it pays). The
# kernel is used when the kernel reports every feature it needs (Linux lists AVX-512
# only when it saves the registers) and it agrees with the dispatched one.
_AVX512_KERNEL = "crc32_iscsi_by16_10"
_AVX512_NEEDS = frozenset({"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
                           "vpclmulqdq"})


def _declare(cdll: ctypes.CDLL, name: str) -> _Update:
    fn = getattr(cdll, name)
    fn.restype = ctypes.c_uint
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
    update: _Update = fn
    return update


def _open(path: str) -> _Update:
    cdll = isal.open_cdll(path)
    try:
        dispatched = _declare(cdll, "crc32_iscsi")
    except AttributeError as exc:
        raise CodecError(f"cannot use ISA-L library {path}: {exc}") from exc
    if not _AVX512_NEEDS <= isal.cpu_flags() or not hasattr(cdll, _AVX512_KERNEL):
        return dispatched
    fast = _declare(cdll, _AVX512_KERNEL)
    probe = np.frombuffer(os.urandom(4099), dtype=np.uint8)
    addr = probe.ctypes.data
    if all(fast(addr + a, n, s) == dispatched(addr + a, n, s)
           for a, n, s in ((0, 4099, MASK), (3, 1000, 0), (7, 63, 0x1234567), (0, 0, MASK))):
        return fast
    logger.warning("%s of %s disagrees with crc32_iscsi; not used", _AVX512_KERNEL, path)
    return dispatched


@functools.cache
def _update() -> _Update | None:
    return isal.find(_open, "CRC32C")


def update_address() -> int | None:
    """The address of ISA-L's raw CRC32C update (``crc32_iscsi``'s signature), for C code
    that checksums as it copies (proto/_fastcopy.c); None without ISA-L."""
    update = _update()
    return None if update is None else ctypes.cast(update, ctypes.c_void_p).value


def crc32c_at(addr: int, nbytes: int, init: int = 0) -> int:
    """CRC32C of the ``nbytes`` bytes at address ``addr`` (memory the caller keeps alive),
    continuing ``init`` (a previous result) as :func:`crc32c` does.

    The hot path of a checked restore: one call per chunk, no buffer object made.
    """
    state = init ^ MASK  # ISA-L inverts neither its seed nor its result; CRC32C does both
    update = _update()
    if update is None:
        if nbytes:
            view = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(addr))
            state = _crc32c_numpy(view, state)
        return state ^ MASK
    for off in range(0, nbytes, isal.MAX_CALL_BYTES):
        state = update(addr + off, min(isal.MAX_CALL_BYTES, nbytes - off), state)
    return state ^ MASK


def crc32c(buf: Buffer, init: int = 0) -> int:
    """CRC32C (Castagnoli) of ``buf``, read in place.

    Standard convention (``crc32c(b"123456789") == 0xE3069283``); pass a
    previous result as ``init`` to continue it, so
    ``crc32c(b, crc32c(a)) == crc32c(a + b)``.

    Raises:
        InvalidRequestError: ``buf`` is not a contiguous buffer or ``init``
            is not a 32-bit value.
    """
    if not 0 <= init <= MASK:
        raise InvalidRequestError(f"CRC init {init!r} is not a 32-bit value")
    arr = byte_view(buf)
    return crc32c_at(arr.ctypes.data, arr.size, init)


def byte_view(buf: Any) -> np.ndarray:
    """``buf`` as a flat uint8 array, read in place.

    Raises:
        InvalidRequestError: ``buf`` is not a contiguous buffer.
    """
    try:
        return np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise InvalidRequestError(f"CRC input is not a contiguous buffer: {exc}") from exc


# ------------------------------------------------------------------ combination

def _crc_mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in the reflected representation."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1


#: x^(2^n) for n below this: byte counts up to 2^64 (x^(8n) needs n + 3 squarings).
_X2N_TERMS = 67


def _crc_x2n_table() -> list[int]:
    # Not periodic in n: zlib's CRC-32 reuses its 32 entries (k & 31), but the Castagnoli
    # polynomial has the factor x + 1 and x^(2^32) is not x modulo it; wrapping made every
    # combination over 512 MiB or more wrong (a restore of such a tensor failed its check).
    table, p = [], 1 << 30  # x^1
    for _ in range(_X2N_TERMS):
        table.append(p)  # x^(2^n)
        p = _crc_mulmod(p, p)
    return table


_CRC_X2N = _crc_x2n_table()


@functools.lru_cache(maxsize=256)
def crc32c_shift(nbytes: int) -> int:
    """The operator that :func:`crc32c_combine` applies for ``nbytes`` bytes (x^(8n) mod P);
    cached, since pieces and blocks repeat a few lengths."""
    if not 0 <= nbytes < 1 << (_X2N_TERMS - 3):
        raise InvalidRequestError(f"byte count {nbytes} is negative or beyond 2^64")
    p, k = 1 << 31, 3  # x^0; x^(8n) = x^(n * 2^3)
    while nbytes:
        if nbytes & 1:
            p = _crc_mulmod(_CRC_X2N[k], p)
        nbytes >>= 1
        k += 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """``crc32c(a + b)`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``, without the bytes."""
    return _crc_mulmod(crc32c_shift(len2), crc1) ^ crc2


# ------------------------------------------------------------------ without ISA-L

def _crc_byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(POLY), table >> 1)
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
