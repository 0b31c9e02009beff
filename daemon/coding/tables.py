"""The code's matrices: the coefficients that make any piece of a stripe from any ``k``
others, and the ISA-L tables ``ec_encode_data`` reads for them, built once per pattern.

Parity is ``R = C · D`` over GF(2^8) with the Cauchy matrix of ISA-L's
``gf_gen_cauchy1_matrix`` (coding/codec.py).
"""

from __future__ import annotations

import ctypes
import functools

from shardguard.daemon.coding import _isal
from shardguard.daemon.errors import CodecError


def rows_for(lib: _isal.IsaL, k: int, m: int, sources: tuple[int, ...], outputs: tuple[int, ...]) -> bytes:
    """Coefficients rebuilding pieces ``outputs`` from the ``k`` pieces ``sources``.

    With ``E`` the (k+m) x k encoding matrix, the sources are ``E[sources] · D``,
    so ``D = E[sources]^-1 · sources`` and piece ``o`` is
    ``E[o] · E[sources]^-1 · sources``. Encoding is the case
    ``sources = data``, where the inverse is the identity.
    """
    full = lib.cauchy1_matrix(k + m, k)
    sub = b"".join(full[s * k : (s + 1) * k] for s in sources)
    inv = lib.invert_matrix(sub, k)
    rows = bytearray()
    for o in outputs:
        enc = full[o * k : (o + 1) * k]
        for col in range(k):
            acc = 0
            for j in range(k):
                acc ^= _isal.gf_mul(enc[j], inv[j * k + col])
            rows.append(acc)
    return bytes(rows)


def _lib() -> _isal.IsaL:
    lib = _isal.load()
    if lib is None:  # pragma: no cover - the ISA-L backend exists only with a library
        raise CodecError("ISA-L is not loaded")
    return lib


@functools.lru_cache(maxsize=4096)
def tables(k: int, m: int, sources: tuple[int, ...], outputs: tuple[int, ...]) -> ctypes.Array[ctypes.c_ubyte]:
    """ISA-L tables for one (k, m, erasure pattern), built once and shared.

    A (10, 4) code has under 4,000 patterns of interest, each table a few KiB.
    """
    lib = _lib()
    return lib.init_tables(k, len(outputs), rows_for(lib, k, m, sources, outputs))


@functools.lru_cache(maxsize=256)
def share_tables(k: int, m: int, index: int) -> ctypes.Array[ctypes.c_ubyte]:
    """ISA-L tables that make data piece ``index``'s share of the ``m`` parities."""
    lib = _lib()
    rows = rows_for(lib, k, m, tuple(range(k)), tuple(range(k, k + m)))
    return lib.init_tables(1, m, bytes(rows[j * k + index] for j in range(m)))
