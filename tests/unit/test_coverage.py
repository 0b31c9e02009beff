"""coding/coverage.py: which ranges of a parity piece a share has reached, so that the
encoder writes the first share of each range and adds the later ones."""

from __future__ import annotations

import random

from shardguard.daemon.coding.coverage import Coverage


def test_frames_in_order_write_once_then_add() -> None:
    c = Coverage()
    assert c.take(0, 4) == [(0, 4, True)]  # source A's first frame
    assert c.take(0, 4) == [(0, 4, False)]  # source B's
    assert c.take(4, 4) == [(4, 8, True)]
    assert c.take(2, 10) == [(2, 8, False), (8, 12, True)]  # unaligned, past the others
    assert c.take(5, 0) == []
    assert c.gaps(16) == [(12, 16)]
    assert c.gaps(12) == [] and c.gaps(6) == []


def test_a_frame_over_several_ranges_is_split_at_each_edge() -> None:
    c = Coverage()
    c.take(2, 2)
    c.take(6, 2)
    assert c.gaps(10) == [(0, 2), (4, 6), (8, 10)]
    assert c.take(0, 10) == [(0, 2, True), (2, 4, False), (4, 6, True), (6, 8, False),
                             (8, 10, True)]
    assert c.gaps(10) == []
    assert c.take(3, 4) == [(3, 7, False)]


def test_any_order_against_a_byte_map() -> None:
    """Random frames (overlapping, touching, out of order): each part says whether a
    share reached its bytes before, parts tile the frame, and gaps are the bytes no
    frame reached."""
    rng = random.Random(1)
    for _ in range(2000):
        length = rng.randint(1, 120)
        c, seen = Coverage(), [False] * length
        for _ in range(rng.randint(0, 10)):
            off = rng.randint(0, length - 1)
            n = rng.randint(0, length - off)
            pos = off
            for lo, hi, first in c.take(off, n):
                assert lo == pos < hi
                assert all(seen[x] != first for x in range(lo, hi))
                pos = hi
            assert pos == off + n
            seen[off:off + n] = [True] * n
        gap = [False] * length
        for lo, hi in c.gaps(length):
            gap[lo:hi] = [True] * (hi - lo)
        assert gap == [not s for s in seen]
