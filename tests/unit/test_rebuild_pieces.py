"""roles/rebuild_pieces.py ``PieceSource.decode_into``: a lost piece decoded from ``k``
others of its stripe and checked against its checksum; where it fails, decoded again with
every source checksummed as it lands: a corrupt source is named and replaced by the next
piece, and a decoded piece whose own checksum fails with every source passing is refused. The
transport is faked here (pieces served from memory frame by frame); the real one, with a
real corrupt parity file, is tests/integration/test_cluster.py's
``test_a_lost_node_is_rebuilt_past_corrupt_source_pieces``."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np
import pytest

from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codec, Codecs
from shardguard.daemon.errors import CorruptionError
from shardguard.daemon.roles.rebuild_pieces import PieceSource
from shardguard.proto.meta import Code, PieceMeta, StepMeta, StripeMeta

G, M = 5, 2
K = G - M
PLEN = (3 << 20) + 517
FRAME = 1 << 20
STRIPE = 1


class FakePlane:
    """Serves each node's pieces from memory in 1 MiB frames, counting the fetches."""

    def __init__(self, pieces: dict[tuple[int, int], np.ndarray]) -> None:
        self.pieces = pieces
        self.fetches: list[int] = []
        self._lock = threading.Lock()

    def fetch_frames(self, address: str, hdr: dict[str, Any],
                     on_frame: Callable[[int, Any, int], None]) -> int:
        piece = self.pieces[(hdr["stripe"], hdr["index"])]
        with self._lock:
            self.fetches.append(hdr["index"])
        for off in range(0, piece.size, FRAME):
            on_frame(off, piece[off:off + FRAME], piece.size)
        return piece.size


class NoMetrics:
    """The metrics the decode path reports to, discarded."""

    def bytes_received(self, job: str, kind: str, n: int) -> None:
        pass


@pytest.fixture
def stripe() -> tuple[placement.GroupLayout, StepMeta, list[np.ndarray]]:
    code = Code(nodes=G, group_size=G, parity=M)
    grp = placement.placement_of(code).groups[0]
    rng = np.random.default_rng(11)
    pieces = [np.zeros(PLEN, np.uint8) for _ in range(G)]
    for i in range(K):
        pieces[i][:] = rng.integers(0, 256, PLEN, dtype=np.uint8)
    Codec(K, M, threads=1).encode(pieces[:K], pieces[K:])
    infos = {i: PieceMeta(node=grp.nodes[grp.holder(STRIPE, i)], len=PLEN, crc=crc32c(pieces[i]))
             for i in range(G)}
    meta = StepMeta(job="j", step=3, code=code, group=0,
                    members={n: (f"c{n}", f"d{n}") for n in grp.nodes}, layouts={},
                    stripes={(0, STRIPE): StripeMeta(plen=PLEN, pieces=infos)})
    return grp, meta, pieces


def decode(stripe, served: list[np.ndarray], q: int,
           plane: FakePlane | None = None) -> tuple[np.ndarray, FakePlane]:
    grp, meta, _ = stripe
    plane = plane or FakePlane({(STRIPE, i): p for i, p in enumerate(served)})
    source = PieceSource(reader=None, plane=plane, codecs=Codecs(), metrics=NoMetrics())
    lost = meta.stripes[(0, STRIPE)].pieces[q].node
    alive = {n: f"tcp://node-{n}" for n in grp.nodes if n != lost}
    dest = np.zeros(PLEN, np.uint8)
    source.decode_into("j", meta, grp, STRIPE, q, alive, dest, 0, PLEN, threading.Event())
    return dest, plane


def test_nothing_corrupt_each_source_is_fetched_once(stripe) -> None:
    _, _, pieces = stripe
    dest, plane = decode(stripe, pieces, q=0)
    assert np.array_equal(dest, pieces[0])
    assert sorted(plane.fetches) == [1, 2, 3]  # the data pieces first, then parity 3


def test_a_corrupt_source_is_named_and_replaced_by_the_next_piece(stripe, caplog) -> None:
    _, _, pieces = stripe
    served = [p.copy() for p in pieces]
    served[2][FRAME + 7] ^= 0x40  # one bit of a data source
    with caplog.at_level(logging.WARNING, logger="shardguard.daemon.roles.rebuild"):
        dest, plane = decode(stripe, served, q=0)
    assert np.array_equal(dest, pieces[0])  # overwritten by the good decode
    # (1, 2, 3) unchecked: the decoded piece fails; (1, 2, 3) with the sources checked
    # names 2; then the next piece in its place: (1, 3, 4).
    assert sorted(plane.fetches[:3]) == [1, 2, 3]
    assert sorted(plane.fetches[3:6]) == [1, 2, 3]
    assert sorted(plane.fetches[6:]) == [1, 3, 4]
    assert "decoding it again with every source checked" in caplog.text
    assert "piece 2 from node" in caplog.text and "checksum fails" in caplog.text


def test_a_decoded_piece_that_fails_with_every_source_passing_is_refused(stripe) -> None:
    """The sources hold, yet the output does not (the metadata's CRC of the lost piece is
    wrong): nothing is guessed."""
    grp, meta, pieces = stripe
    info = meta.stripes[(0, STRIPE)]
    bad = dict(info.pieces)
    bad[0] = PieceMeta(node=bad[0].node, len=PLEN, crc=bad[0].crc ^ 1)
    stripe = (grp, StepMeta(job=meta.job, step=meta.step, code=meta.code, group=0,
                            members=meta.members, layouts={},
                            stripes={(0, STRIPE): StripeMeta(plen=PLEN, pieces=bad)}), pieces)
    plane = FakePlane({(STRIPE, i): p for i, p in enumerate(pieces)})
    with pytest.raises(CorruptionError, match="decoded piece 0 of stripe 1: checksum fails"):
        decode(stripe, pieces, q=0, plane=plane)
    # Decoded once unchecked, once with every source checked (all pass): then refused.
    assert sorted(plane.fetches) == [1, 1, 2, 2, 3, 3]
