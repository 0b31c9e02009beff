"""ISA-L's erasure-coding entry points, plus the GF(2^8) arithmetic it uses.

The codec (:mod:`shardguard.daemon.coding.codec`) calls ISA-L's kernels directly on
arena memory. The library is found and opened by :mod:`shardguard.proto.isal` (the
copy the pyeclib wheel bundles, else the system ``libisal``; the one loader, which
CRC32C uses too); when none loads, :func:`load` returns ``None`` and the codec falls
back to pyeclib's ``ECDriver``. ctypes calls into a ``CDLL`` drop the GIL, which is
what lets the codec's thread pool scale.

The small field helpers (:func:`gf_mul`, :func:`gf_inv`,
:func:`cauchy1_matrix`) mirror ISA-L's own (polynomial 0x11d, generator 2) so
that coding matrices can be composed in Python and checked against the
library.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardguard.daemon.errors import CodecError
from shardguard.proto.isal import ENV_LIBRARY, MAX_CALL_BYTES, candidate_paths, find, open_cdll

__all__ = ["ENV_LIBRARY", "MAX_CALL_BYTES", "IsaL", "candidate_paths", "cauchy1_matrix",
           "gf_inv", "gf_mul", "load", "open_library"]

_u8p = ctypes.POINTER(ctypes.c_ubyte)
_ptr_array = ctypes.POINTER(ctypes.c_void_p)

#: A foreign function with declared argtypes/restype.
_CFunc = Callable[..., Any]


# --------------------------------------------------------------------------
# GF(2^8), as ISA-L defines it
# --------------------------------------------------------------------------

_GF_POLY = 0x11D


def _gf_tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _GF_POLY
    # Doubling the exp table lets gf_mul skip the "mod 255" on the log sum.
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


_GF_EXP, _GF_LOG = _gf_tables()


def gf_mul(a: int, b: int) -> int:
    """Product of two GF(2^8) elements."""
    if a == 0 or b == 0:
        return 0
    return _GF_EXP[_GF_LOG[a] + _GF_LOG[b]]


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a non-zero GF(2^8) element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return _GF_EXP[255 - _GF_LOG[a]]


def cauchy1_matrix(rows: int, k: int) -> bytes:
    """The ``rows`` x ``k`` matrix that ISA-L's ``gf_gen_cauchy1_matrix`` makes.

    The top ``k`` rows are the identity (the data pieces pass through); row
    ``i >= k`` holds ``1 / (i ^ j)``, which keeps every k x k submatrix
    invertible for ``rows <= 256``.
    """
    out = bytearray(rows * k)
    for i in range(k):
        out[i * k + i] = 1
    for i in range(k, rows):
        for j in range(k):
            out[i * k + j] = gf_inv(i ^ j)
    return bytes(out)


# --------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class IsaL:
    """A loaded ISA-L with typed entry points.

    The ``ec_*`` attributes are the raw ctypes functions, called directly by the
    codec's hot path (CRC32C is :mod:`shardguard.proto.crc32c`'s).
    """

    path: str
    cdll: ctypes.CDLL
    ec_init_tables: _CFunc
    ec_encode_data: _CFunc
    ec_encode_data_update: _CFunc
    gf_invert_matrix: _CFunc
    gf_gen_cauchy1_matrix: _CFunc | None

    def cauchy1_matrix(self, rows: int, k: int) -> bytes:
        """``gf_gen_cauchy1_matrix(rows, k)``, or its Python twin if not exported."""
        if self.gf_gen_cauchy1_matrix is None:
            return cauchy1_matrix(rows, k)
        buf = (ctypes.c_ubyte * (rows * k))()
        self.gf_gen_cauchy1_matrix(buf, rows, k)
        return bytes(buf)

    def invert_matrix(self, matrix: bytes, n: int) -> bytes:
        """Inverse of the ``n`` x ``n`` matrix ``matrix`` (row-major).

        Raises:
            CodecError: the matrix is singular.
        """
        # gf_invert_matrix destroys its input, so hand it a scratch copy.
        scratch = (ctypes.c_ubyte * (n * n)).from_buffer_copy(matrix)
        out = (ctypes.c_ubyte * (n * n))()
        if self.gf_invert_matrix(scratch, out, n) != 0:
            raise CodecError(f"singular {n}x{n} coding matrix")
        return bytes(out)

    def init_tables(self, k: int, rows: int, matrix: bytes) -> ctypes.Array[ctypes.c_ubyte]:
        """Expand a ``rows`` x ``k`` coding matrix into the tables ``ec_encode_data`` reads."""
        a = (ctypes.c_ubyte * (rows * k)).from_buffer_copy(matrix)
        # 32 bytes per coefficient is the largest layout any ISA-L kernel uses.
        tables = (ctypes.c_ubyte * (32 * k * rows))()
        self.ec_init_tables(k, rows, a, tables)
        return tables


def _declare(cdll: ctypes.CDLL, name: str, restype: object, argtypes: list[object]) -> _CFunc:
    fn = getattr(cdll, name)
    fn.restype = restype
    fn.argtypes = argtypes
    declared: _CFunc = fn
    return declared


def open_library(path: str) -> IsaL:
    """Load ISA-L from ``path`` and declare its entry points.

    Raises:
        CodecError: the file cannot be loaded or lacks a required symbol.
    """
    cdll = open_cdll(path)
    try:
        c_int = ctypes.c_int
        lib = IsaL(
            path=path,
            cdll=cdll,
            ec_init_tables=_declare(cdll, "ec_init_tables", None, [c_int, c_int, _u8p, _u8p]),
            ec_encode_data=_declare(
                cdll, "ec_encode_data", None, [c_int, c_int, c_int, _u8p, _ptr_array, _ptr_array]
            ),
            ec_encode_data_update=_declare(
                cdll,
                "ec_encode_data_update",
                None,
                [c_int, c_int, c_int, c_int, _u8p, ctypes.c_void_p, _ptr_array],
            ),
            gf_invert_matrix=_declare(cdll, "gf_invert_matrix", c_int, [_u8p, _u8p, c_int]),
            gf_gen_cauchy1_matrix=(
                _declare(cdll, "gf_gen_cauchy1_matrix", None, [_u8p, c_int, c_int])
                if hasattr(cdll, "gf_gen_cauchy1_matrix")
                else None
            ),
        )
    except AttributeError as exc:
        raise CodecError(f"cannot use ISA-L library {path}: {exc}") from exc
    return lib


@functools.cache
def load() -> IsaL | None:
    """The process's ISA-L, loaded once; ``None`` when none can be used.

    Raises:
        CodecError: :data:`ENV_LIBRARY` names a library that cannot be used.
    """
    return find(open_library, "the erasure codec")
