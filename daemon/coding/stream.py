"""Decoding a piece of a stripe while its sources arrive (a rebuild, docs/design.md §3).

A rebuild gets ``k`` pieces of a stripe from ``k`` nodes; their bytes arrive frame by
frame, each source at its own pace and, for all this class cares, in any order.
:class:`StripeStream` decodes each byte range as soon as all ``k`` sources hold it,
straight into the destination (the slot being rebuilt, or a parity file), so decoding
overlaps the transfer and no piece is staged whole (a file destination takes each
decoded range from a buffer of :data:`CHUNK_BYTES`): frames are read in place (the data
plane's received frames, or views of this node's own memory) and dropped once decoded.

Integrity: the decoded piece's CRC32C is made as it is written (:attr:`crc`), and must
equal the stripe metadata's before the caller uses it: that check alone decides whether
the bytes are right. A corrupt source changes the output wherever its coefficient in
the decode is non-zero (where it is zero the output does not depend on it), so a wrong
output is caught as surely as a wrong source would be. With ``check_sources`` each
source's CRC32C is also made frame by frame as it lands (by the thread that feeds it),
which names *which* source is bad: :meth:`StripeStream.run` returns the sources that
failed (fetch error, wrong length, checksum), and bytes decoded with a failed source
are never accepted -- the caller decodes the piece again without it, which overwrites
the destination, or gives up. Without it (a rebuild's first try,
roles/rebuild_pieces.py) only lengths and fetch errors are sources' failures; a decoded
piece whose CRC fails is decoded again with the sources checked. That saves reading
``k`` times the piece once more: on a rebuild of a lost 1 GiB node (4 local nodes, 2
cores) the sources' checksums were ~7 % of the replacement daemon's CPU (``perf
record``, 2026-12-06).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardguard.daemon.coding.checksum import crc32c, crc32c_combine
from shardguard.daemon.coding.codec import Codec
from shardguard.daemon.coding.dest import Dest, as_dest
from shardguard.daemon.errors import CorruptionError, ShardguardError

#: Bytes decoded per codec call (and the size of the zeros a short source is padded with).
CHUNK_BYTES = 4 << 20
#: How far a source may run ahead of the decoded point (waiting for a slower source of the
#: stripe) before :meth:`StripeStream.feed` blocks: its feeder stops receiving, and the
#: data plane's receive window then stops the sender (whose frames are views of its
#: memory, not copies), so the frames held stay bounded whatever the sources' pace.
#: Every byte held is a received frame's buffer, which a new daemon faults in at its
#: first use: 32 -> 16 MiB here and 4 -> 2 frames in a fetch's window took a lost node's
#: rebuild (2 stripes of 3 sources at once) from ~122k to ~99k page faults in the
#: replacement daemon and from 2100 to 2014 ms (medians of 9, ``bench/bench_cluster.py
#: --gib 1 --steps 4 --rebuilds 3``, 3 alternating runs each, 2026-12-06).
AHEAD_BYTES = 16 << 20
_ZEROS = np.zeros(CHUNK_BYTES, dtype=np.uint8)
_ZEROS.flags.writeable = False


class StreamClosed(ShardguardError):
    """The stream is done with (decoded, or given up): a late frame is not wanted."""


class _Source:
    """One source piece: its frames past the decoded point, and its running checksum."""

    def __init__(self, length: int, crc: int) -> None:
        self.length, self.want_crc = length, crc
        self.pending: dict[int, tuple[np.ndarray, int]] = {}  # off -> (bytes, crc): early frames
        self.frames: list[tuple[int, np.ndarray]] = []  # contiguous from the decoded point
        self.mark = 0  # bytes [0, mark) arrived
        self.crc = 0  # of bytes [0, mark)
        self.done = False
        self.error: BaseException | None = None

    def avail(self, plen: int) -> int:
        """Bytes of the (zero-padded) piece that can be decoded from."""
        return plen if self.mark >= self.length else self.mark


class StripeStream:
    """Rebuilds bytes ``[0, length)`` of piece ``output`` of a stripe from the ``k``
    pieces ``sources`` (index -> (real length, CRC32C)) as their frames are fed; the
    sources' CRCs are checked only with ``check_sources``.

    Bytes ``[dest_off, dest_off + len(dest))`` of the output land in ``dest`` (memory,
    decoded into in place, or a file, each range decoded into a buffer and written from
    it: coding/dest.py); the rest of ``[0, length)`` is decoded into scratch memory and
    only checksummed (a piece shared by two ranks). ``plen`` is the stripe's piece length: a source shorter than
    it reads as zeros past its end. Thread-safe: any thread may :meth:`feed`,
    :meth:`done` or :meth:`fail`; one thread calls :meth:`run`.
    """

    def __init__(self, codec: Codec, sources: Mapping[int, tuple[int, int]], output: int,
                 length: int, plen: int, dest: Dest | np.ndarray, dest_off: int = 0,
                 check_sources: bool = True) -> None:
        dest = as_dest(dest)
        if len(sources) != codec.k:
            raise ValueError(f"a stripe decodes from {codec.k} pieces, not {len(sources)}")
        if output in sources or not 0 <= length <= plen:
            raise ValueError(f"cannot decode piece {output} of {length} bytes from {sorted(sources)}")
        if dest_off < 0 or dest_off + len(dest) > length:
            raise ValueError(f"destination [{dest_off}, {dest_off + len(dest)}) is outside "
                             f"the {length}-byte piece")
        self.codec, self.output, self.length, self.plen = codec, output, length, plen
        self.dest, self.dest_off = dest, dest_off
        self.check_sources = check_sources
        self._src = {i: _Source(n, c) for i, (n, c) in sources.items()}
        for i, s in self._src.items():
            if s.length > plen:
                raise ValueError(f"source {i} of {s.length} bytes is longer than the piece")
            s.done = s.length == 0
        self._cond = threading.Condition()
        self._closed = False
        self._scratch: np.ndarray | None = None
        self.crc = 0  # of the decoded bytes [0, length), once run() succeeded
        self.decoded = 0  # bytes [0, decoded) of the output are decoded

    # -------------------------------------------------------------- feeders

    def feed(self, index: int, off: int, buf: Any) -> None:
        """Bytes ``[off, off + len(buf))`` of source ``index`` arrived (read in place and
        referenced until decoded).

        Raises:
            StreamClosed: the stream no longer wants bytes (the caller stops fetching).
        """
        arr = np.frombuffer(buf, dtype=np.uint8)
        if not arr.size:
            return
        # Here, in the feeding thread (ISA-L drops the GIL).
        crc = crc32c(arr) if self.check_sources else 0
        with self._cond:
            if self._closed:
                raise StreamClosed("the stripe is no longer being decoded")
            s = self._src[index]
            if s.error is not None:
                raise StreamClosed(f"source {index} already failed")
            if off < s.mark or off + arr.size > s.length or off in s.pending:
                s.error = CorruptionError(
                    f"bytes [{off}, {off + arr.size}) of a {s.length}-byte piece arrived "
                    f"twice or past its end")
                self._cond.notify_all()
                raise StreamClosed(str(s.error))
            s.pending[off] = (arr, crc)
            moved = False
            while s.mark in s.pending:
                part, c = s.pending.pop(s.mark)
                s.frames.append((s.mark, part))
                if self.check_sources:
                    s.crc = crc32c_combine(s.crc, c, part.size)
                s.mark += part.size
                moved = True
            if moved:
                self._cond.notify_all()
            # Ahead by what it holds in order (a frame that came early is no lead).
            while s.mark - self.decoded > AHEAD_BYTES and not self._closed and s.error is None:
                self._cond.wait()

    def done(self, index: int, total: int) -> None:
        """Source ``index`` sent everything it has: ``total`` bytes."""
        with self._cond:
            s = self._src[index]
            if s.error is None and total != s.length:
                s.error = CorruptionError(f"sent {total} bytes of a {s.length}-byte piece")
            s.done = True
            self._cond.notify_all()

    def fail(self, index: int, exc: BaseException) -> None:
        """Source ``index`` cannot be had (its fetch failed)."""
        with self._cond:
            s = self._src[index]
            if s.error is None:
                s.error = exc
            s.done = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop: later feeds raise StreamClosed and held frames are dropped."""
        with self._cond:
            self._closed = True
            for s in self._src.values():
                s.pending.clear()
                s.frames.clear()
            self._cond.notify_all()

    # -------------------------------------------------------------- decoder

    def run(self, abort: threading.Event | None = None) -> dict[int, BaseException]:
        """Decode as bytes arrive until the piece is decoded or a source fails; returns
        the failed sources (index -> why), empty on success. Closes the stream.
        ``abort``, when set, stops it (checked whenever it waits)."""
        try:
            pos = 0
            while True:
                with self._cond:
                    while True:
                        bad = self._failures()
                        if bad:
                            return bad
                        if pos >= self.length and all(s.done for s in self._src.values()):
                            return {}
                        ready = min(min(s.avail(self.plen) for s in self._src.values()),
                                    self.length)
                        if ready > pos:
                            break
                        if abort is not None and abort.is_set():
                            return {i: StreamClosed("rebuild aborted") for i in self._src}
                        self._cond.wait(0.5 if abort is not None else None)
                    frames = {i: self._take(s, ready) for i, s in self._src.items()}
                self._decode(pos, ready, frames)
                pos = ready
                with self._cond:
                    self.decoded = pos
                    self._cond.notify_all()
        finally:
            self.close()

    def _failures(self) -> dict[int, BaseException]:
        bad = {}
        for i, s in self._src.items():
            if s.error is not None:
                bad[i] = s.error
            elif s.done and s.mark != s.length:
                bad[i] = CorruptionError(f"{s.mark} bytes of a {s.length}-byte piece arrived")
            elif s.done and self.check_sources and s.crc != s.want_crc:
                bad[i] = CorruptionError("checksum fails")
        return bad

    @staticmethod
    def _take(s: _Source, upto: int) -> list[tuple[int, np.ndarray]]:
        """The source's frames that bytes below ``upto`` need (those reaching past it stay)."""
        out = list(s.frames)
        s.frames = [f for f in s.frames if f[0] + f[1].size > upto]
        return out

    def _decode(self, lo: int, hi: int, frames: dict[int, list[tuple[int, np.ndarray]]]) -> None:
        pos = lo
        at = dict.fromkeys(frames, 0)
        while pos < hi:
            end = min(hi, pos + CHUNK_BYTES)
            # Where the destination starts or ends, a codec call stops.
            for edge in (self.dest_off, self.dest_off + len(self.dest)):
                if pos < edge < end:
                    end = edge
            views: dict[int, np.ndarray] = {}
            spans: dict[int, tuple[np.ndarray, int]] = {}
            for i, s in self._src.items():
                if pos >= s.length:
                    spans[i] = (_ZEROS, pos)
                    end = min(end, pos + _ZEROS.size)
                    continue
                fl = frames[i]
                while fl[at[i]][0] + fl[at[i]][1].size <= pos:
                    at[i] += 1
                f_off, arr = fl[at[i]]
                spans[i] = (arr, f_off)
                end = min(end, f_off + arr.size)
            for i, (arr, f_off) in spans.items():
                views[i] = arr[pos - f_off:end - f_off] if arr is not _ZEROS else _ZEROS[:end - pos]
            inside = self.dest_off <= pos and end <= self.dest_off + len(self.dest)
            out = self.dest.direct(pos - self.dest_off, end - self.dest_off) if inside else None
            staged = out is None
            if staged:
                if self._scratch is None:
                    self._scratch = np.empty(CHUNK_BYTES, dtype=np.uint8)
                out = self._scratch[:end - pos]
            self.codec.decode(views, {self.output: out})
            c = crc32c(out)
            self.crc = crc32c_combine(self.crc, c, out.size)
            if inside and staged:  # a file destination: written from the buffer, still in cache
                self.dest.write(pos - self.dest_off, out, c)
            pos = end
