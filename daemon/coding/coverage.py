"""Which bytes of a parity piece some data piece's share has reached yet.

An encoder folds each arriving frame of a data piece into the parity (roles/encoder.py).
The first share to reach a byte range is written there (``Codec.encode_update(...,
first=True)``), the later ones added to it, so the parity file need not be cleared
first: a pool file reused from an older step holds that step's parity until every byte
is written again. :class:`Coverage` splits each frame into the part no share has reached
(written) and the part one has (added), whatever order frames come in, and names the
ranges no frame reached at all (past every source's end), which must be cleared before
the parity is checksummed.

Measured (bench/bench_cluster.py, 4 nodes, 1 GiB per node, 2026-12-05): clearing a
reused 341 MiB parity file was a write of the whole file between the last offer and the
first frame, and each first share then read those zeros back.
"""

from __future__ import annotations

import bisect


class Coverage:
    """Disjoint, sorted byte ranges ``[lo, hi)`` that a share has reached."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def take(self, off: int, n: int) -> list[tuple[int, int, bool]]:
        """Mark ``[off, off + n)`` reached; the parts it is made of, in order, as
        ``(lo, hi, first)``: ``first`` where no share had reached those bytes before."""
        if n <= 0:
            return []
        end = off + n
        parts: list[tuple[int, int, bool]] = []
        pos = off
        i = bisect.bisect_right(self._hi, off)  # the first range ending after off
        j = i
        while j < len(self._lo) and self._lo[j] < end:
            lo, hi = self._lo[j], self._hi[j]
            if lo > pos:
                parts.append((pos, lo, True))
            parts.append((max(pos, lo), min(hi, end), False))
            pos = min(hi, end)
            j += 1
        if pos < end:
            parts.append((pos, end, True))
        # Ranges i..j-1 overlap [off, end); merge them, and touching neighbours, into one.
        new_lo = min(off, self._lo[i]) if i < j else off
        new_hi = max(end, self._hi[j - 1]) if i < j else end
        if i > 0 and self._hi[i - 1] == new_lo:
            i -= 1
            new_lo = self._lo[i]
        if j < len(self._lo) and self._lo[j] == new_hi:
            new_hi = self._hi[j]
            j += 1
        self._lo[i:j] = [new_lo]
        self._hi[i:j] = [new_hi]
        return parts

    def gaps(self, length: int) -> list[tuple[int, int]]:
        """The ranges of ``[0, length)`` no share reached."""
        out, pos = [], 0
        for lo, hi in zip(self._lo, self._hi):
            if lo >= length:
                break
            if lo > pos:
                out.append((pos, lo))
            pos = max(pos, hi)
        if pos < length:
            out.append((pos, length))
        return out
