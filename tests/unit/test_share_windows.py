"""coding/share_windows.py and the encoder's folds (roles/encoder.py): frames are held by
window until every source's share of it is in, then the window's parity is written from
all of them at once; whatever the frames' cuts and order, the parity and its CRC are the
code's."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codec
from shardguard.daemon.coding.parity_sums import ParitySums
from shardguard.daemon.coding.placement import GroupLayout
from shardguard.daemon.coding.share_windows import Frame, ShareWindows
from shardguard.daemon.roles.encoder import _fold_one, _fold_window
from shardguard.daemon.roles.state import Encoding
from shardguard.daemon.transport.dataplane import chunks


def _frame(q: int, off: int, n: int) -> Frame:
    return Frame(q, off, memoryview(bytes(n)))


def test_a_window_is_released_when_every_source_s_share_is_in() -> None:
    w = ShareWindows([32, 32, 32], window=8, limit_bytes=1 << 20)
    assert w.add(_frame(0, 0, 8)) == (None, [])
    assert w.add(_frame(2, 0, 4)) == (None, [])
    assert w.add(_frame(1, 0, 8)) == (None, [])
    assert w.held_bytes == 20
    window, alone = w.add(_frame(2, 4, 4))  # source 2's share came in two frames
    assert alone == [] and window is not None and (window.lo, window.hi) == (0, 8)
    parts = window.parts(3)
    assert [(a, b) for a, b, _ in parts] == [(0, 4), (4, 8)]
    assert all(len(views) == 3 and all(len(v) == b - a for v in views) for a, b, views in parts)
    assert w.held_bytes == 0


def test_frames_that_cannot_wait_are_folded_alone() -> None:
    w = ShareWindows([32, 32, 20], window=8, limit_bytes=1 << 20)
    f = _frame(0, 16, 8)  # window 2 ends past source 2's end (20): never every source's
    assert w.add(f) == (None, [f])
    f = _frame(1, 4, 8)  # across a window's edge
    assert w.add(f) == (None, [f])
    assert w.add(_frame(0, 8, 0))[1]  # empty
    assert w.held_bytes == 0


def test_past_the_limit_the_oldest_window_is_handed_back_and_never_held_again() -> None:
    w = ShareWindows([64, 64], window=8, limit_bytes=16)
    a, b = _frame(0, 0, 8), _frame(0, 8, 8)
    assert w.add(a) == (None, [])
    assert w.add(b) == (None, [])
    c = _frame(0, 16, 8)
    assert w.add(c) == (None, [a])  # 24 held > 16: window 0 goes
    late = _frame(1, 0, 8)
    assert w.add(late) == (None, [late])  # window 0 is folded one by one from now on
    assert w.drain() == [b, c] and w.held_bytes == 0


def test_overlapping_frames_are_not_taken_for_a_window() -> None:
    w = ShareWindows([16, 16], window=8, limit_bytes=1 << 20)
    w.add(_frame(0, 0, 8))
    w.add(_frame(1, 0, 4))
    window, alone = w.add(_frame(1, 0, 4))  # the same bytes twice: 8 in, a hole at 4..8
    assert window is None and len(alone) == 3


def _encoding(k: int, m: int, reals: list[int], piece: int, limit: int, window: int,
              stale: int) -> Encoding:
    enc = Encoding(GroupLayout(0, tuple(range(k + m)), m), 0)
    enc.piece_bytes = piece
    enc.parity = [np.full(piece, stale, dtype=np.uint8) for _ in range(m)]
    enc.sums = ParitySums(piece, reals, m, chunk_bytes=window)
    enc.windows = ShareWindows(reals, window, limit)
    return enc


@pytest.mark.parametrize("seed", range(16))
def test_the_parity_is_the_code_s_whatever_the_cuts_and_order(seed: int) -> None:
    """Sources whose pieces span several slots (frames cut short at slot ends), shorter
    sources, interleavings, a small hold limit, and a sender that does not cut at window
    edges: the parity kept and its CRC are the code's, as the encoder folds them."""
    rng = random.Random(seed)
    k, m = rng.choice([(2, 1), (3, 1), (3, 2)])
    window = rng.choice([64, 128])
    piece = rng.randint(2, 10) * window + rng.choice([0, 64])
    reals = [piece if q == 0 else rng.choice([piece, rng.randrange(0, piece + 1, 32)])
             for q in range(k)]
    rng.shuffle(reals)
    limit = rng.choice([1 << 20, window * k, window])
    aligned = rng.random() < 0.8
    codec = Codec(k, m, threads=1)
    enc = _encoding(k, m, reals, piece, limit, window, stale=0x5A)
    data = [np.frombuffer(rng.randbytes(r), dtype=np.uint8) for r in reals]
    queues = []
    for q, d in enumerate(data):
        cuts = sorted({0, len(d), *(rng.randrange(0, len(d) + 1) for _ in range(2))})
        segs = [memoryview(d[a:b]) for a, b in zip(cuts, cuts[1:])]  # a node's slots
        if aligned:
            frames = list(chunks(segs, window))
        else:  # an old sender: a frame per window from each slot's start
            frames, off = [], 0
            for seg in segs:
                for s in range(0, len(seg), window):
                    frames.append((off, seg[s:s + window]))
                    off += len(seg[s:s + window])
        queues.append([Frame(q, off, part) for off, part in frames])
    while any(queues):
        q = rng.choice([i for i, f in enumerate(queues) if f])
        window_done, alone = enc.windows.add(queues[q].pop(0))
        for f in alone:
            _fold_one(codec, enc, f)
        if window_done is not None:
            _fold_window(codec, enc, window_done)
    for f in enc.windows.drain():
        _fold_one(codec, enc, f)
    for lo, hi in enc.coverage.gaps(piece):
        for p in enc.parity:
            p[lo:hi] = 0
    want = [np.zeros(piece, dtype=np.uint8) for _ in range(m)]
    codec.encode([np.pad(d, (0, piece - len(d))) for d in data], want)
    for j, (p, w) in enumerate(zip(enc.parity, want)):
        assert np.array_equal(p, w)
        assert enc.sums.crc(j, p) == crc32c(w)


def test_aligned_frames_of_equal_sources_are_all_written_by_window() -> None:
    """The usual case (every node's payload the same size, slots cut anywhere): every
    window that every source reaches is written once from all shares, none folded alone."""
    rng = random.Random(3)
    k, window, piece = 3, 64, 64 * 8
    enc = _encoding(k, 1, [piece] * k, piece, 1 << 20, window, stale=0)
    folded: list[str] = []
    queues = []
    for q in range(k):
        d = np.frombuffer(rng.randbytes(piece), dtype=np.uint8)
        cut = rng.randrange(1, piece)
        queues.append([Frame(q, off, part) for off, part in
                       chunks([memoryview(d[:cut]), memoryview(d[cut:])], window)])
    for i in range(max(len(x) for x in queues)):
        for qu in queues:
            if i < len(qu):
                window_done, alone = enc.windows.add(qu[i])
                folded += ["alone"] * len(alone)
                if window_done is not None:
                    folded.append("window")
    assert folded == ["window"] * 8 and enc.windows.drain() == []


def test_a_window_partly_reached_before_adds_there_and_writes_elsewhere() -> None:
    """``_fold_window`` where a share already reached part of the window (the senders'
    cuts never make it, but the fold must still be the code's): the bytes reached keep
    what they hold and get the shares added, the rest is written over the stale bytes."""
    rng = random.Random(5)
    k, window = 3, 64
    codec = Codec(k, 1, threads=1)
    enc = _encoding(k, 1, [window] * k, window, 1 << 20, window, stale=0xEE)
    data = [np.frombuffer(rng.randbytes(window), dtype=np.uint8) for _ in range(k)]
    extra = np.frombuffer(rng.randbytes(16), dtype=np.uint8)  # a share already in [8, 24)
    want = [np.zeros(window, dtype=np.uint8)]
    codec.encode(data, want)
    enc.coverage.take(8, 16)
    enc.parity[0][8:24] = extra
    done = None
    for q in range(k):
        done, alone = enc.windows.add(Frame(q, 0, memoryview(data[q])))
        assert alone == []
    assert done is not None
    _fold_window(codec, enc, done)
    expect = want[0].copy()
    expect[8:24] ^= extra
    assert np.array_equal(enc.parity[0], expect)
