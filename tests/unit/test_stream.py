"""StripeStream (daemon/coding/stream.py): a piece decoded while its k sources arrive."""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest

from shardguard.daemon.coding import stream as stream_mod
from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codec
from shardguard.daemon.coding.dest import FileDest, WrittenCrcs
from shardguard.daemon.coding.stream import StreamClosed, StripeStream
from shardguard.daemon.errors import CorruptionError, PeerUnavailableError

K, M = 3, 2
PLEN = (9 << 20) + 4096


@pytest.fixture(scope="module")
def stripe() -> tuple[Codec, list[np.ndarray], list[int]]:
    """k data pieces (the last one short: zero past its end) and their m parity pieces."""
    codec = Codec(K, M, threads=1)
    rng = np.random.default_rng(7)
    lens = [PLEN, PLEN, PLEN - 123457, PLEN, PLEN]
    pieces = [np.zeros(PLEN, np.uint8) for _ in range(K + M)]
    for i in range(K):
        pieces[i][:lens[i]] = rng.integers(0, 256, lens[i], dtype=np.uint8)
    codec.encode(pieces[:K], pieces[K:])
    return codec, pieces, lens


def frames(piece: np.ndarray, n: int, size: int) -> list[tuple[int, np.ndarray]]:
    return [(o, piece[o:min(o + size, n)]) for o in range(0, n, size)]


def make(stripe, sources, q, dest, dest_off=0, check_sources=True) -> StripeStream:
    codec, pieces, lens = stripe
    return StripeStream(codec, {i: (lens[i], crc32c(pieces[i][:lens[i]])) for i in sources}, q,
                        lens[q], PLEN, dest, dest_off, check_sources)


def feed_all(st: StripeStream, stripe, sources, shuffle: bool, size: int = 1 << 20,
             spoil: int | None = None) -> list[threading.Thread]:
    _, pieces, lens = stripe

    def one(i: int) -> None:
        fl = frames(pieces[i], lens[i], size)
        if shuffle:
            random.Random(i).shuffle(fl)
        try:
            for off, buf in fl:
                if i == spoil and off == 0:
                    buf = buf.copy()
                    buf[5] ^= 1
                st.feed(i, off, buf)
        except StreamClosed:
            return
        st.done(i, lens[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in sources]
    for t in threads:
        t.start()
    return threads


@pytest.mark.parametrize("q,sources", [(0, [1, 2, 3]), (2, [0, 3, 4]), (4, [0, 1, 2]),
                                       (1, [0, 2, 4])])
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "out-of-order"])
def test_decodes_into_the_destination_as_frames_arrive(stripe, q, sources, shuffle) -> None:
    _, pieces, lens = stripe
    dest = np.zeros(lens[q], np.uint8)
    st = make(stripe, sources, q, dest)
    threads = feed_all(st, stripe, sources, shuffle)
    assert st.run() == {}
    for t in threads:
        t.join()
    assert np.array_equal(dest, pieces[q][:lens[q]])
    assert st.crc == crc32c(pieces[q][:lens[q]])


def test_a_destination_window_gets_its_bytes_and_the_rest_is_only_checksummed(stripe) -> None:
    _, pieces, lens = stripe
    lo, hi = 3 * 4096 + 5, lens[0] - (1 << 20) - 11
    dest = np.zeros(lens[0] + 64, np.uint8)
    st = make(stripe, [1, 2, 3], 0, dest[32:32 + hi - lo], lo)
    threads = feed_all(st, stripe, [1, 2, 3], shuffle=True, size=(3 << 20) + 1)
    assert st.run() == {}
    for t in threads:
        t.join()
    assert np.array_equal(dest[32:32 + hi - lo], pieces[0][lo:hi])
    assert not dest[:32].any() and not dest[32 + hi - lo:].any()
    assert st.crc == crc32c(pieces[0][:lens[0]])


def test_a_file_destination_gets_its_window_written_and_each_write_recorded(stripe,
                                                                           tmp_path) -> None:
    # A rebuild's slot or parity file: decoded into a buffer, written with pwrite at the
    # destination's base; the CRCs recorded as written tile the window exactly.
    _, pieces, lens = stripe
    lo, hi, base = 4096 + 3, lens[0] - 77, 1000
    path = tmp_path / "slot"
    path.write_bytes(b"\xee" * (base + hi - lo + 50))
    fd = os.open(path, os.O_RDWR)
    crcs = WrittenCrcs(marks=(base + 5 * (1 << 20) + 1,))  # a mark inside a chunk
    try:
        with FileDest(fd, base, hi - lo, crcs) as dest:
            st = make(stripe, [1, 3, 4], 0, dest, lo)
            threads = feed_all(st, stripe, [1, 3, 4], shuffle=True, size=(2 << 20) + 7)
            assert st.run() == {}
            for t in threads:
                t.join()
    finally:
        os.close(fd)
    got = path.read_bytes()
    assert got[base:base + hi - lo] == pieces[0][lo:hi].tobytes()
    assert got[:base] == b"\xee" * base and got[base + hi - lo:] == b"\xee" * 50
    assert st.crc == crc32c(pieces[0][:lens[0]])
    assert crcs.crc(base, base + hi - lo) == crc32c(pieces[0][lo:hi])
    mark = base + 5 * (1 << 20) + 1
    assert crcs.crc(base, mark) == crc32c(pieces[0][lo:lo + mark - base])


def test_a_source_that_fails_its_checksum_is_named_not_accepted(stripe) -> None:
    dest = np.zeros(stripe[2][0], np.uint8)
    st = make(stripe, [1, 2, 3], 0, dest)
    threads = feed_all(st, stripe, [1, 2, 3], shuffle=False, spoil=3)
    bad = st.run()
    for t in threads:
        t.join()
    assert list(bad) == [3] and isinstance(bad[3], CorruptionError)


@pytest.mark.parametrize("q,sources,spoil", [(0, [1, 2, 3], 3), (0, [1, 2, 3], 1),
                                             (4, [0, 1, 2], 2), (2, [0, 3, 4], 4)])
def test_unchecked_sources_a_corrupt_one_shows_in_the_decoded_checksum(stripe, q, sources,
                                                                       spoil) -> None:
    """Without the sources' checksums nothing names the bad source, but the decoded piece's
    checksum is not the stripe's: the caller (roles/rebuild_pieces.py) decodes again with
    the sources checked. With every source good, the same stream's checksum is right."""
    _, pieces, lens = stripe
    for bad in (spoil, None):
        dest = np.zeros(lens[q], np.uint8)
        st = make(stripe, sources, q, dest, check_sources=False)
        threads = feed_all(st, stripe, sources, shuffle=False, spoil=bad)
        assert st.run() == {}
        for t in threads:
            t.join()
        good = crc32c(pieces[q][:lens[q]])
        if bad is None:
            assert st.crc == good and np.array_equal(dest, pieces[q][:lens[q]])
        else:
            assert st.crc != good


def test_a_failed_or_short_source_ends_the_stream(stripe) -> None:
    _, pieces, lens = stripe
    st = make(stripe, [1, 2, 3], 0, np.zeros(lens[0], np.uint8))
    st.fail(2, PeerUnavailableError("gone"))
    st.feed(1, 0, pieces[1][:1 << 20])
    st.done(3, 5)  # a source that says it sent 5 bytes of a longer piece
    bad = st.run()
    assert set(bad) == {2, 3} and isinstance(bad[2], PeerUnavailableError)
    with pytest.raises(StreamClosed):  # late frames are refused: the feeder stops
        st.feed(1, 1 << 20, pieces[1][1 << 20:2 << 20])


def test_bytes_past_the_piece_or_twice_are_refused(stripe) -> None:
    _, pieces, lens = stripe
    st = make(stripe, [1, 2, 3], 0, np.zeros(lens[0], np.uint8))
    st.feed(2, 0, pieces[2][:4096])
    with pytest.raises(StreamClosed):
        st.feed(2, 0, pieces[2][:4096])
    assert isinstance(st.run()[2], CorruptionError)


def test_a_source_far_ahead_waits_for_the_slowest(stripe, monkeypatch) -> None:
    """The frames held stay bounded: a source more than AHEAD_BYTES past the decoded point
    blocks its feeder until the slow source catches up, and nothing deadlocks."""
    monkeypatch.setattr(stream_mod, "AHEAD_BYTES", 2 << 20)
    _, pieces, lens = stripe
    dest = np.zeros(lens[0], np.uint8)
    st = make(stripe, [1, 2, 3], 0, dest)
    decoder = threading.Thread(target=lambda: result.append(st.run()))
    result: list[dict] = []
    decoder.start()
    fast = feed_all(st, stripe, [1, 2], shuffle=False)
    fast[0].join(timeout=2)
    assert fast[0].is_alive()  # blocked: source 3 has sent nothing
    assert st.decoded == 0
    slow = feed_all(st, stripe, [3], shuffle=False)
    for t in fast + slow + [decoder]:
        t.join()
    assert result == [{}]
    assert np.array_equal(dest, pieces[0][:lens[0]])


def test_abort_stops_a_stream_waiting_for_bytes(stripe) -> None:
    st = make(stripe, [1, 2, 3], 0, np.zeros(stripe[2][0], np.uint8))
    abort = threading.Event()
    abort.set()
    bad = st.run(abort)
    assert set(bad) == {1, 2, 3} and all(isinstance(e, StreamClosed) for e in bad.values())
