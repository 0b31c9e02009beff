"""An encoder's frames held by aligned window until every source's share of it is in.

Folding each frame into the parity as it lands (``Codec.encode_update``) reads and writes
the parity once per source: for ``k = 3``, a window of parity is written, then read and
written twice more. When every source's bytes of a window are in, one ``Codec.encode``
of the ``k`` shares reads each once and writes the parity once: a third less time on
one core (``bench/bench_codec.py``-style loop, 8 MiB windows: 1.9 -> 1.3 ms), and half
the memory traffic the encoder adds to the receive path's.

Senders cut their frames at multiples of the window in piece offsets
(``transport/dataplane.py`` ``chunks``), so the sources of a stripe meet at the same
window edges; a frame may stop short of an edge (where a rank's slot ends inside a
piece), so a window's share of one source can come in several frames.

What is held is bounded: past ``limit_bytes``, the oldest window's frames are handed back
to be folded one by one, as are the frames of a window that not every source reaches
(a shorter source's end: its share there is zero), a frame across a window edge (a sender
that does not cut at them), and whatever is still held when the stripe's last byte is in.
A window handed back once is never held again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Frame:
    """A received frame of source ``q``: bytes ``[off, off + len(view))`` of its piece."""

    q: int
    off: int
    view: memoryview

    @property
    def end(self) -> int:
        return self.off + len(self.view)


@dataclass
class Window:
    """A window whose every source's share is in: ``[lo, hi)`` of the parity, from
    ``frames`` (each source's, covering the window exactly)."""

    lo: int
    hi: int
    frames: list[Frame] = field(default_factory=list)

    def parts(self, k: int) -> list[tuple[int, int, list[memoryview]]]:
        """The window cut at every frame edge: for each part ``(a, b, views)``, the ``k``
        sources' views of bytes ``[a, b)``, in source order."""
        cuts = sorted({self.lo, self.hi, *(f.off for f in self.frames),
                       *(f.end for f in self.frames)})
        by_q = [sorted((f for f in self.frames if f.q == q), key=lambda f: f.off)
                for q in range(k)]
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            views = []
            for frames in by_q:
                f = next(f for f in frames if f.off <= a and b <= f.end)
                views.append(f.view[a - f.off:b - f.off])
            parts.append((a, b, views))
        return parts


def _tiles(frames: list[Frame], lo: int, hi: int) -> bool:
    """``frames`` cover ``[lo, hi)`` exactly, edge to edge."""
    pos = lo
    for f in sorted(frames, key=lambda f: f.off):
        if f.off != pos:
            return False
        pos = f.end
    return pos == hi


class ShareWindows:
    """The frames of one stripe held by window (see the module's docstring).

    Args:
        reals: each source's real length (its share past it is zero).
        window: the window's bytes (the data plane's frame).
        limit_bytes: bytes held at most before the oldest window is handed back.
    """

    def __init__(self, reals: Sequence[int], window: int, limit_bytes: int) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.reals, self.window, self.limit = list(reals), window, limit_bytes
        self._held: dict[int, list[Frame]] = {}  # window index -> its frames, oldest first
        self._got: dict[int, list[int]] = {}  # window index -> bytes in, per source
        self._alone: set[int] = set()  # windows handed back: their frames fold one by one
        self.held_bytes = 0

    def add(self, frame: Frame) -> tuple[Window | None, list[Frame]]:
        """Take ``frame``: the window it completes (if it does), and the frames to fold one
        by one now (this one, if it cannot be held; the oldest window's, past the limit)."""
        w, k = frame.off // self.window, len(self.reals)
        lo, hi = w * self.window, (w + 1) * self.window
        if not frame.view or frame.end > hi or w in self._alone \
                or any(r < hi for r in self.reals):
            return None, [frame]  # empty, across an edge, handed back, or not every source's
        got = self._got.setdefault(w, [0] * k)
        got[frame.q] += len(frame.view)
        self._held.setdefault(w, []).append(frame)
        self.held_bytes += len(frame.view)
        if all(g == self.window for g in got):
            frames = self._release(w)
            if all(_tiles([f for f in frames if f.q == q], lo, hi) for q in range(k)):
                return Window(lo, hi, frames), []
            self._alone.add(w)  # overlapping frames (never sent): one by one, as they came
            return None, frames
        if any(g > self.window for g in got):  # more than a window of one source
            self._alone.add(w)
            return None, self._release(w)
        spill: list[Frame] = []
        while self.held_bytes > self.limit and self._held:
            oldest = next(iter(self._held))
            self._alone.add(oldest)
            spill += self._release(oldest)
        return None, spill

    def drain(self) -> list[Frame]:
        """Every frame still held (the stripe's bytes are all in): to fold one by one."""
        out: list[Frame] = []
        for w in list(self._held):
            self._alone.add(w)
            out += self._release(w)
        return out

    def _release(self, w: int) -> list[Frame]:
        frames = self._held.pop(w, [])
        self._got.pop(w, None)
        self.held_bytes -= sum(len(f.view) for f in frames)
        return frames
