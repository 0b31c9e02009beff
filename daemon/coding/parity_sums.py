"""An encoder's parity CRC32C, made a chunk at a time as each chunk's last share lands.

The encoder folds every source's frames into the parity as they arrive
(``roles/encoder.py``); a chunk of the parity is final once every source that reaches
into it has had its share of the chunk folded in. Checksumming it then (on a pool
thread, so that the thread receiving frames does no more than before) reads bytes the
fold has just written, likely still in cache, and spreads the work over the transfer
instead of leaving one read of the whole parity (a third of a node's payload, on every
node at once) between the last frame and the stripe's report.

The CRC of the whole parity is the combination of its chunks' (``checksum.combine_blocks``).
A chunk is checksummed only when nothing can write it again: every source's bytes in it
counted (a source's bytes are folded exactly once; the encoder refuses a piece that
overruns its length) and the chunk lies below every source's end, since bytes past it are
cleared when the stripe finishes. A fold into a chunk already checksummed (which the
protocol never makes) drops that chunk's CRC, and it is made again from the final bytes:
the CRC reported is always of the bytes kept.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import numpy as np

from shardguard.daemon.coding.checksum import combine_blocks, crc32c

#: Bytes of parity per CRC: the codec's chunk (a frame is two), small enough to be in
#: cache right after its fold.
CHUNK_BYTES = 4 << 20


class ParitySums:
    """The CRC32C of each parity buffer of one stripe, built as its chunks become final.

    Args:
        piece_bytes: the stripe's parity length.
        reals: each source's real length (its bytes from 0; past it its share is zero).
        parities: how many parity buffers the stripe has (``m``).
        pool: where a final chunk is checksummed; None: in the folding thread.
    """

    def __init__(self, piece_bytes: int, reals: Sequence[int], parities: int,
                 chunk_bytes: int = CHUNK_BYTES,
                 pool: concurrent.futures.Executor | None = None) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.piece_bytes, self.chunk = piece_bytes, chunk_bytes
        count = -(-piece_bytes // chunk_bytes)
        # Bytes below every source's end are final once every source's share of them is in;
        # a chunk reaching past it is cleared at the end and checksummed then.
        self._final_below = min(max(reals, default=0), piece_bytes)
        self._left = [sum(_overlap(i * chunk_bytes, min((i + 1) * chunk_bytes, piece_bytes), 0, r)
                          for r in reals) for i in range(count)]
        self._crcs: list[list[_Crc | None]] = [[None] * count for _ in range(parities)]
        self._pool = pool

    def folded(self, lo: int, hi: int, parity: Sequence[np.ndarray]) -> None:
        """A share of bytes ``[lo, hi)`` was folded into ``parity``: checksum the chunks it
        completed."""
        c = self.chunk
        for i in range(lo // c, -(-hi // c)):
            start, end = i * c, min((i + 1) * c, self.piece_bytes)
            self._left[i] -= _overlap(start, end, lo, hi)
            if self._crcs[0][i] is not None:  # written after it was checksummed
                for crcs in self._crcs:
                    crcs[i] = None
            elif self._left[i] == 0 and end <= self._final_below:
                for crcs, par in zip(self._crcs, parity):
                    view = par[start:end]
                    crcs[i] = crc32c(view) if self._pool is None else \
                        self._pool.submit(crc32c, view)

    def early(self) -> int:
        """Chunks checksummed so far (before the stripe finished)."""
        return sum(x is not None for x in self._crcs[0]) if self._crcs else 0

    def crc(self, j: int, par: np.ndarray) -> int:
        """The CRC32C of parity ``j`` (``par``, now final): the chunks not yet checksummed
        are read now, and every chunk's CRC combined in order."""
        if len(par) != self.piece_bytes:
            raise ValueError(f"parity of {len(par)} bytes, expected {self.piece_bytes}")
        c, parts = self.chunk, []
        for i, known in enumerate(self._crcs[j]):
            part = _result(known) if self._left[i] == 0 else None
            parts.append(crc32c(par[i * c:(i + 1) * c]) if part is None else part)
        return combine_blocks(parts, self.piece_bytes, c)


#: A chunk's CRC: made, or being made on the pool.
_Crc = int | concurrent.futures.Future


def _result(crc: _Crc | None) -> int | None:
    """The chunk's CRC; None where it must be made now: never made, or still queued (taken
    back, so that a caller on the pool never waits for work queued behind itself)."""
    if crc is None or isinstance(crc, int):
        return crc
    if crc.cancel():
        return None
    return crc.result()


def _overlap(a: int, b: int, lo: int, hi: int) -> int:
    return max(0, min(b, hi) - max(a, lo))
