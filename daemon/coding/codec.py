"""Reed-Solomon erasure coding over caller-owned memory (CRC32C: coding/checksum.py).

The daemon protects each stripe (DESIGN.md §3) with :class:`Codec`: ``k``
data pieces and ``m`` parity pieces of equal length ``P``, parity
``R = C · D`` over GF(2^8) with the Cauchy matrix of ISA-L's
``gf_gen_cauchy1_matrix`` -- the code pyeclib calls ``isa_l_rs_cauchy``, so
our parity equals its fragment payloads byte for byte.

Every method works in place on buffers the caller owns (numpy arrays,
memoryviews of the mmap'd arenas, ``bytes`` for inputs): the hot path is one
ISA-L call per chunk straight on that memory, with no copy and no allocation
of data-sized buffers. Chunks run on a thread pool, which scales because
ctypes drops the GIL for the duration of each call. Without ISA-L the codec
falls back to pyeclib's ``ECDriver`` (correct, much slower: it copies and
holds the GIL).

Piece indices follow pyeclib: ``0..k-1`` are data, ``k..k+m-1`` parity.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import mmap
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, cast

import numpy as np
from pyeclib.ec_iface import ECDriver, ECDriverError

from shardguard.daemon.coding import _isal
from shardguard.daemon.coding import tables as code_tables
from shardguard.daemon.errors import CodecError, InsufficientPiecesError, InvalidRequestError

logger = logging.getLogger(__name__)

#: Anything exposing a C-contiguous buffer. Inputs may be read-only; outputs
#: must be writable.
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap | np.ndarray

#: Runs the coding work for bytes ``[offset, offset + length)`` of every piece.
_ChunkFn: TypeAlias = Callable[[int, int], None]

#: Largest ``k + m`` a GF(2^8) Cauchy code supports.
MAX_PIECES = 255

#: Size of the header liberasurecode puts before each fragment's payload.
PYECLIB_HEADER_BYTES = 80

_BACKENDS = ("auto", "isal", "pyeclib")


# --------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------


def _view(buf: Buffer, *, writable: bool, what: str) -> np.ndarray:
    """A flat uint8 view of ``buf`` sharing its memory (never a copy)."""
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise InvalidRequestError(f"{what} is not a contiguous buffer: {exc}") from exc
    if writable and not arr.flags.writeable:
        raise InvalidRequestError(f"{what} is read-only; output pieces must be writable")
    return arr


def _common_size(views: Mapping[int, np.ndarray]) -> int:
    sizes = {i: v.size for i, v in views.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidRequestError(f"pieces differ in length (index: bytes): {sizes}")
    return next(iter(sizes.values()), 0)


def _check_range(start: int, stop: int | None, size: int) -> tuple[int, int]:
    stop = size if stop is None else stop
    if not 0 <= start <= stop <= size:
        raise InvalidRequestError(f"range [{start}, {stop}) is outside pieces of {size} bytes")
    return start, stop


# --------------------------------------------------------------------------
# Backends: each turns (sources -> outputs) into a function over one chunk
# --------------------------------------------------------------------------


class _IsalBackend:
    """ISA-L kernels called on the pieces' own memory."""

    name = "isal"
    parallel = True

    def __init__(self, lib: _isal.IsaL, k: int, m: int) -> None:
        self._lib = lib
        self._k = k
        self._m = m

    def kernel(
        self, sources: tuple[int, ...], outputs: tuple[int, ...], srcs: list[np.ndarray], dsts: list[np.ndarray]
    ) -> _ChunkFn:
        k, rows = self._k, len(outputs)
        tables = code_tables.tables(k, self._m, sources, outputs)
        src_addrs = [a.ctypes.data for a in srcs]
        dst_addrs = [a.ctypes.data for a in dsts]
        src_array, dst_array = ctypes.c_void_p * k, ctypes.c_void_p * rows
        encode = self._lib.ec_encode_data

        # ``_keep`` holds the views, and so the memory behind the raw
        # addresses, for as long as the kernel exists.
        def run(off: int, n: int, _keep: object = (srcs, dsts)) -> None:
            srcp = src_array(*[a + off for a in src_addrs])
            encode(n, k, rows, tables, srcp, dst_array(*[a + off for a in dst_addrs]))

        return run

    def update_kernel(self, index: int, src: np.ndarray, dsts: list[np.ndarray], first: bool) -> _ChunkFn:
        k, m = self._k, self._m
        src_addr = src.ctypes.data
        dst_addrs = [a.ctypes.data for a in dsts]
        dst_array = ctypes.c_void_p * m
        if first:  # the share alone: a k = 1 code whose column is the matrix's ``index``
            tables, encode = code_tables.share_tables(k, m, index), self._lib.ec_encode_data

            def put(off: int, n: int, _keep: object = (src, dsts)) -> None:  # see kernel()
                encode(n, 1, m, tables, (ctypes.c_void_p * 1)(src_addr + off), dst_array(*[a + off for a in dst_addrs]))

            return put
        tables = code_tables.tables(k, m, tuple(range(k)), tuple(range(k, k + m)))
        update = self._lib.ec_encode_data_update

        def run(off: int, n: int, _keep: object = (src, dsts)) -> None:  # see kernel()
            update(n, k, m, index, tables, src_addr + off, dst_array(*[a + off for a in dst_addrs]))

        return run


class _PyeclibBackend:
    """pyeclib's ``ECDriver`` (isa_l_rs_cauchy): the slow fallback.

    ECDriver wants whole fragments with liberasurecode headers. The headers
    of isa_l_rs_cauchy fragments depend only on the fragment index and size
    (no checksum is configured), so headers taken from encoding zeros of the
    same size turn raw pieces back into fragments for ``reconstruct``.
    """

    name = "pyeclib"
    # ECDriver copies and holds the GIL: threads would only add overhead.
    parallel = False

    def __init__(self, k: int, m: int) -> None:
        self._k = k
        self._m = m
        try:
            self._driver = ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")
        except ECDriverError as exc:
            raise CodecError(f"neither ISA-L nor pyeclib's isa_l_rs_cauchy is usable: {exc}") from exc
        self._headers = functools.lru_cache(maxsize=4)(self._make_headers)

    def _make_headers(self, n: int) -> list[bytes]:
        return [f[:PYECLIB_HEADER_BYTES] for f in self._encode(bytes(self._k * n), n)]

    def _encode(self, data: bytes, n: int) -> list[bytes]:
        try:
            frags = self._driver.encode(data)
        except ECDriverError as exc:
            raise CodecError(f"pyeclib encode failed: {exc}") from exc
        if any(len(f) != PYECLIB_HEADER_BYTES + n for f in frags):
            raise CodecError(f"pyeclib fragments are not {n}-byte payloads after an 80-byte header")
        return frags

    def _code(self, sources: tuple[int, ...], outputs: tuple[int, ...], blocks: list[bytes]) -> list[bytes]:
        """Payloads of ``outputs``, rebuilt from the equal-length ``blocks`` of ``sources``."""
        n = len(blocks[0])
        if sources == tuple(range(self._k)):
            frags = self._encode(b"".join(blocks), n)
            return [frags[o][PYECLIB_HEADER_BYTES:] for o in outputs]
        headers = self._headers(n)
        try:
            rebuilt = self._driver.reconstruct([headers[s] + b for s, b in zip(sources, blocks)], list(outputs))
            # pyeclib returns the rebuilt fragments in its own order; each
            # header names its index.
            by_index = {self._fragment_index(f): f for f in rebuilt}
        except ECDriverError as exc:
            raise CodecError(f"pyeclib reconstruct of {list(outputs)} failed: {exc}") from exc
        return [by_index[o][PYECLIB_HEADER_BYTES:] for o in outputs]

    def _fragment_index(self, fragment: bytes) -> int:
        meta = cast(dict[str, Any], self._driver.get_metadata(fragment, formatted=True))
        return int(meta["index"])

    def kernel(
        self, sources: tuple[int, ...], outputs: tuple[int, ...], srcs: list[np.ndarray], dsts: list[np.ndarray]
    ) -> _ChunkFn:
        def run(off: int, n: int) -> None:
            payloads = self._code(sources, outputs, [s[off : off + n].tobytes() for s in srcs])
            for dst, payload in zip(dsts, payloads):
                dst[off : off + n] = np.frombuffer(payload, dtype=np.uint8)

        return run

    def update_kernel(self, index: int, src: np.ndarray, dsts: list[np.ndarray], first: bool) -> _ChunkFn:
        data = tuple(range(self._k))
        parity = tuple(range(self._k, self._k + self._m))

        def run(off: int, n: int) -> None:
            # The code is linear: this source's share of the parity is the
            # parity of a stripe whose other data pieces are zero.
            zero = bytes(n)
            blocks = [src[off : off + n].tobytes() if q == index else zero for q in data]
            for dst, payload in zip(dsts, self._code(data, parity, blocks)):
                share = np.frombuffer(payload, dtype=np.uint8)
                if first:
                    dst[off : off + n] = share
                else:
                    np.bitwise_xor(dst[off : off + n], share, out=dst[off : off + n])

        return run


# --------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Codec:
    """Reed-Solomon ``k + m`` code applied in place to caller-owned pieces.

    Args:
        k: data pieces per stripe (>= 1).
        m: parity pieces per stripe (>= 1); ``k + m <= 255``.
        threads: workers for the chunks of one call; ``None`` uses every
            core this process may run on, ``1`` runs in the calling thread.
        chunk_bytes: bytes of each piece handed to one kernel call. Multiples
            of 64 keep ISA-L on its vector path. 4 MiB (half the data plane's frame)
            keeps the per-call cost (~20 us of ctypes) near 1% on one core;
            1 MiB measured 8% slower on 4+2 here.
        backend: ``"auto"`` (ISA-L when found, else pyeclib), ``"isal"`` or
            ``"pyeclib"``.

    Raises:
        InvalidRequestError: an argument is out of range.
        CodecError: the requested backend cannot be used.

    A codec is safe to share between threads; :meth:`close` stops its pool.
    """

    def __init__(
        self,
        k: int,
        m: int,
        *,
        threads: int | None = None,
        chunk_bytes: int = 4 << 20,
        backend: str = "auto",
    ) -> None:
        if k < 1 or m < 1 or k + m > MAX_PIECES:
            raise InvalidRequestError(f"need k >= 1, m >= 1 and k + m <= {MAX_PIECES}; got k={k}, m={m}")
        if threads is not None and threads < 1:
            raise InvalidRequestError(f"threads must be >= 1 or None, got {threads}")
        if not 1 <= chunk_bytes <= _isal.MAX_CALL_BYTES:
            raise InvalidRequestError(f"chunk_bytes must be in [1, {_isal.MAX_CALL_BYTES}], got {chunk_bytes}")
        if backend not in _BACKENDS:
            raise InvalidRequestError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self._k = k
        self._m = m
        self._chunk_bytes = chunk_bytes
        self._backend = self._make_backend(backend)
        self._threads = (threads or _default_threads()) if self._backend.parallel else 1
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="sg-codec")
            if self._threads > 1
            else None
        )
        logger.debug(
            "codec k=%d m=%d backend=%s threads=%d chunk_bytes=%d",
            k, m, self._backend.name, self._threads, chunk_bytes,
        )

    def _make_backend(self, backend: str) -> _IsalBackend | _PyeclibBackend:
        lib = _isal.load() if backend != "pyeclib" else None
        if lib is not None:
            return _IsalBackend(lib, self._k, self._m)
        if backend == "isal":
            raise CodecError("backend='isal' requested but no ISA-L library could be loaded")
        return _PyeclibBackend(self._k, self._m)

    @property
    def k(self) -> int:
        return self._k

    @property
    def m(self) -> int:
        return self._m

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def chunk_bytes(self) -> int:
        return self._chunk_bytes

    @property
    def backend(self) -> str:
        """``"isal"`` or ``"pyeclib"``: the implementation in use."""
        return self._backend.name

    # -- encoding ----------------------------------------------------------

    def encode(self, data: Sequence[Buffer], parity: Sequence[Buffer]) -> None:
        """Fill the ``m`` pieces of ``parity`` from the ``k`` pieces of ``data``."""
        self.encode_range(data, parity, 0, None)

    def encode_range(
        self, data: Sequence[Buffer], parity: Sequence[Buffer], start: int = 0, stop: int | None = None
    ) -> None:
        """Encode bytes ``[start, stop)`` of every piece; the rest is untouched.

        Each byte position of a stripe is coded independently, so a caller
        receiving all ``k`` data pieces in step (e.g. frame by frame) can
        encode each range as soon as all pieces hold it, overlapping the
        transfer with the coding.
        """
        srcs = self._pieces(dict(enumerate(data)), self._k, "data", writable=False)
        dsts = self._pieces(dict(enumerate(parity)), self._m, "parity", writable=True)
        start, stop = _check_range(start, stop, _common_size({**srcs, **{self._k + j: v for j, v in dsts.items()}}))
        data_idx = tuple(range(self._k))
        parity_idx = tuple(range(self._k, self._k + self._m))
        self._run(self._backend.kernel(data_idx, parity_idx, list(srcs.values()), list(dsts.values())), start, stop)

    def encode_update(
        self, index: int, piece: Buffer, parity: Sequence[Buffer], start: int = 0, stop: int | None = None, *, first: bool = False
    ) -> None:
        """Add data piece ``index``'s share to bytes ``[start, stop)`` of ``parity``.

        For an encoder whose data pieces arrive from different peers at
        different times: each piece is folded in as it lands, in any order.
        ``parity`` must be zero over the range before the first update, and
        after exactly one update per data piece it equals :meth:`encode`'s.
        ``first``: no share reached the range yet: it is written, not added to,
        whatever ``parity`` held there (coding/coverage.py).
        """
        if not 0 <= index < self._k:
            raise InvalidRequestError(f"data piece index {index} is outside 0..{self._k - 1}")
        src = _view(piece, writable=False, what=f"data piece {index}")
        dsts = self._pieces(dict(enumerate(parity)), self._m, "parity", writable=True)
        start, stop = _check_range(start, stop, _common_size({index: src, **{self._k + j: v for j, v in dsts.items()}}))
        self._run(self._backend.update_kernel(index, src, list(dsts.values()), first), start, stop)

    # -- decoding ----------------------------------------------------------

    def decode(self, pieces: Mapping[int, Buffer], out: Mapping[int, Buffer]) -> None:
        """Rebuild the pieces keyed in ``out`` from the surviving ``pieces``.

        Args:
            pieces: piece index -> buffer for at least ``k`` available pieces
                (data ``0..k-1`` or parity ``k..k+m-1``).
            out: piece index -> writable buffer for each piece to rebuild.

        Raises:
            InsufficientPiecesError: fewer than ``k`` pieces are available.
            InvalidRequestError: bad indices, lengths or buffers.
        """
        self.decode_range(pieces, out, 0, None)

    def decode_range(
        self, pieces: Mapping[int, Buffer], out: Mapping[int, Buffer], start: int = 0, stop: int | None = None
    ) -> None:
        """:meth:`decode` restricted to bytes ``[start, stop)`` of every piece."""
        n = self._k + self._m
        for idx in (*pieces, *out):
            if not 0 <= idx < n:
                raise InvalidRequestError(f"piece index {idx} is outside 0..{n - 1}")
        if len(pieces) < self._k:
            raise InsufficientPiecesError(
                f"need {self._k} pieces of a k={self._k}, m={self._m} stripe to decode, "
                f"have {len(pieces)}: {sorted(pieces)}"
            )
        both = set(pieces) & set(out)
        if both:
            raise InvalidRequestError(f"pieces {sorted(both)} are both available and to be rebuilt")
        # Any k survivors determine the stripe; the lowest indices favour
        # data pieces and keep the set of cached tables small.
        sources = tuple(sorted(pieces)[: self._k])
        outputs = tuple(sorted(out))
        srcs = self._pieces({i: pieces[i] for i in sources}, None, "piece", writable=False)
        dsts = self._pieces({i: out[i] for i in outputs}, None, "output piece", writable=True)
        start, stop = _check_range(start, stop, _common_size({**srcs, **dsts}))
        if outputs:
            self._run(self._backend.kernel(sources, outputs, list(srcs.values()), list(dsts.values())), start, stop)

    # -- plumbing ----------------------------------------------------------

    @staticmethod
    def _pieces(bufs: Mapping[int, Buffer], count: int | None, what: str, *, writable: bool) -> dict[int, np.ndarray]:
        if count is not None and len(bufs) != count:
            raise InvalidRequestError(f"expected {count} {what} pieces, got {len(bufs)}")
        return {i: _view(b, writable=writable, what=f"{what} {i}") for i, b in bufs.items()}

    def _run(self, fn: _ChunkFn, start: int, stop: int) -> None:
        """Apply ``fn`` to ``[start, stop)`` in ``chunk_bytes`` chunks, in parallel if allowed."""
        spans = [(off, min(self._chunk_bytes, stop - off)) for off in range(start, stop, self._chunk_bytes)]
        try:
            if self._pool is None or len(spans) < 2:
                for off, n in spans:
                    fn(off, n)
                return
            futures = [self._pool.submit(fn, off, n) for off, n in spans]
            # Wait for every chunk before raising, so that no worker is still
            # writing into the caller's buffers when the call returns.
            concurrent.futures.wait(futures)
            for f in futures:
                f.result()
        except ctypes.ArgumentError as exc:
            raise CodecError(f"ISA-L call rejected its arguments: {exc}") from exc

    def close(self) -> None:
        """Stop the worker threads; later calls run in the calling thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Codec:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Codec(k={self._k}, m={self._m}, backend={self._backend.name!r}, threads={self._threads})"


def _load_quietly() -> None:
    """Load ISA-L ahead of need; a failure is raised again, and reported, at first use."""
    try:
        _isal.load()
    except Exception:  # noqa: BLE001 - the codec's own call raises it where it matters
        pass


class Codecs:
    """One :class:`Codec` per ``(k, m)``, made on first use and kept (one thread each: the
    daemon's calls already run in parallel, one per stripe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codecs: dict[tuple[int, int], Codec] = {}
        # Finding the library runs ldconfig and gcc (ctypes.util.find_library): ~0.1 s
        # that a replacement node's first decode would otherwise wait for, in its rebuild.
        threading.Thread(target=_load_quietly, name="sg-isal-load", daemon=True).start()

    def get(self, k: int, m: int) -> "Codec":
        with self._lock:
            codec = self._codecs.get((k, m))
            if codec is None:
                codec = self._codecs[(k, m)] = Codec(k, m, threads=1)
            return codec

    def close(self) -> None:
        with self._lock:
            for codec in self._codecs.values():
                codec.close()
            self._codecs.clear()
