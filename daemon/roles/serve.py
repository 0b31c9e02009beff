"""Reading a piece this node holds for a step: a data piece out of its ranks' sealed slots, a
parity piece out of its file. The data plane serves fetches with it; rebuild and verify
read local pieces with it."""

from __future__ import annotations

from typing import Any, Iterable

from shardguard.daemon.base.metrics import Metrics
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import slice_segments
from shardguard.daemon.errors import InvalidRequestError, NotRestorableError
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.dataplane import reply_chunks
from shardguard.proto.meta import StepMeta


class PieceReader:
    """Pieces of restorable steps, read in place (views of arena or parity memory)."""

    def __init__(self, store: Store, pieces: PieceFiles, metas: StepMetas,
                 metrics: Metrics) -> None:
        self.store, self.pieces, self.metas, self.metrics = store, pieces, metas, metrics

    def read(self, job: str, step: int, group: int, stripe: int, index: int,
             meta: StepMeta | None = None) -> list[memoryview]:
        """The real bytes of a piece of the restorable step (or of the step of ``meta``,
        which a rebuild here is making restorable)."""
        meta = self.metas.get(job) if meta is None else meta
        if meta is None or meta.step != step:
            raise NotRestorableError(f"job {job}: step {step} is not the restorable step here")
        try:
            piece = meta.stripes[(group, stripe)].pieces[index]
            k = placement.placement_of(meta.code).groups[group].k
        except (KeyError, IndexError):
            raise InvalidRequestError(f"job {job} step {step} has no piece {index} of group "
                                      f"{group} stripe {stripe}") from None
        if index >= k:
            return [self.pieces.read(job, step, group, stripe, index)]
        lay = meta.layouts[piece.node]
        segs = [self.store.sealed_slot(job, r.rank, step)[0][:r.used] for r in lay.ranks]
        start = index * lay.plen
        return slice_segments(segs, start, start + piece.len)

    def serve_fetch(self, header: dict[str, Any]) -> Iterable[list[Any]]:
        """The data plane's answer to a ``fetch``: the piece in ``chunk`` messages."""
        bufs = self.read(header["job"], int(header["step"]), int(header["group"]),
                         int(header["stripe"]), int(header["index"]))
        total = sum(len(b) for b in bufs)
        self.metrics.bytes_sent(header["job"], "fetch", total)
        return reply_chunks(header.get("req"), bufs, total)
