"""coding/parity_sums.py: the encoder's parity CRC, made chunk by chunk as each chunk's
last share is folded in, equals the CRC of the parity it keeps."""

from __future__ import annotations

import concurrent.futures
import random
import threading

import numpy as np
import pytest

from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codec
from shardguard.daemon.coding.coverage import Coverage
from shardguard.daemon.coding.parity_sums import ParitySums


def _encode(rng: random.Random, k: int, m: int, reals: list[int], piece: int, chunk: int,
            frame: int, stale: int, pool: concurrent.futures.Executor | None = None
            ) -> tuple[list[np.ndarray], ParitySums]:
    """Fold ``k`` sources' frames in a random interleaving, as roles/encoder.py does, into
    parity buffers holding an older step's bytes (``stale``), and clear the gaps."""
    codec = Codec(k, m, threads=1)
    data = [np.frombuffer(rng.randbytes(r), dtype=np.uint8) for r in reals]
    parity = [np.full(piece, stale, dtype=np.uint8) for _ in range(m)]
    sums, cov = ParitySums(piece, reals, m, chunk_bytes=chunk, pool=pool), Coverage()
    frames = [[(q, off, min(frame, r - off)) for off in range(0, r, frame)]
              for q, r in enumerate(reals)]
    while any(frames):
        q = rng.choice([i for i, f in enumerate(frames) if f])
        _, off, n = frames[q].pop(0)  # each source's frames in order, sources interleaved
        for lo, hi, first in cov.take(off, n):
            codec.encode_update(q, data[q][lo:hi], [p[lo:hi] for p in parity], first=first)
            sums.folded(lo, hi, parity)
    for lo, hi in cov.gaps(piece):
        for p in parity:
            p[lo:hi] = 0
    # the parity is the code's, whatever order the shares came in
    want = [np.zeros(piece, dtype=np.uint8) for _ in range(m)]
    codec.encode([np.pad(d, (0, piece - len(d))) for d in data], want)
    for p, w in zip(parity, want):
        assert np.array_equal(p, w)
    return parity, sums


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("on_pool", [False, True])
def test_the_crc_made_chunk_by_chunk_is_the_kept_parity_s(seed: int, on_pool: bool) -> None:
    rng = random.Random(seed)
    k, m = rng.choice([(2, 1), (3, 1), (3, 2), (4, 2)])
    chunk = rng.choice([64, 128, 192])
    piece = rng.randint(1, 12) * chunk + rng.choice([0, 64])
    longest = rng.choice([piece, rng.randrange(64, piece + 1, 64)])  # past it: cleared
    reals = [longest] + [rng.randrange(0, longest + 1, 64) for _ in range(k - 1)]
    rng.shuffle(reals)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parity, sums = _encode(rng, k, m, reals, piece, chunk, rng.choice([64, 100, 256]),
                               stale=0xA5, pool=pool if on_pool else None)
        for j, p in enumerate(parity):
            assert sums.crc(j, p) == crc32c(p)


def test_chunks_are_checksummed_as_they_complete_those_past_every_source_at_the_end() -> None:
    """Every chunk below the longest source's end is checksummed as its last share lands;
    those past it (cleared at the end) only when the CRC is asked for."""
    rng = random.Random(7)
    chunk, piece = 128, 128 * 8
    reals = [128 * 5 + 64, 128 * 2, 128 * 5 + 64]  # the end falls inside chunk 5
    parity, sums = _encode(rng, 3, 1, reals, piece, chunk, 96, stale=0xFF)
    assert sums.early() == 5  # chunks 0..4; 5 reaches past every source's end
    assert sums.crc(0, parity[0]) == crc32c(parity[0])


def test_a_fold_into_a_checksummed_chunk_is_checksummed_again() -> None:
    """The protocol never folds a chunk twice, but were it to, the CRC reported is still of
    the bytes kept, not of what the chunk held when it was first complete."""
    par = np.zeros(256, dtype=np.uint8)
    sums = ParitySums(256, [256], 1, chunk_bytes=128)
    par[:128] = 1
    sums.folded(0, 128, [par])
    assert sums.early() == 1
    par[10] = 9
    sums.folded(0, 20, [par])  # a second share over part of chunk 0
    assert sums.early() == 0
    par[128:] = 3
    sums.folded(128, 256, [par])
    assert sums.crc(0, par) == crc32c(par)


def test_an_empty_stripe_and_a_wrong_length() -> None:
    sums = ParitySums(0, [0, 0], 1)
    assert sums.crc(0, np.zeros(0, dtype=np.uint8)) == crc32c(b"") == 0
    with pytest.raises(ValueError, match="expected 0"):
        sums.crc(0, np.zeros(4, dtype=np.uint8))


def test_a_chunk_still_queued_on_the_pool_is_checksummed_by_the_caller() -> None:
    """The encoder finishes a stripe on the same pool its chunks are checksummed on: a
    chunk's CRC still queued behind busy workers is taken back and made by the caller,
    never waited for."""
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait)  # the only worker is busy until the end
        par = np.frombuffer(random.Random(2).randbytes(256), dtype=np.uint8).copy()
        sums = ParitySums(256, [256], 1, chunk_bytes=128, pool=pool)
        sums.folded(0, 256, [par])
        assert sums.early() == 2
        assert sums.crc(0, par) == crc32c(par)
        gate.set()
