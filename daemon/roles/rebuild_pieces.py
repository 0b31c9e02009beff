"""Where a rebuild's bytes come from: a piece fetched whole from the node that holds it
(checksummed as it lands), read in place from this daemon, or decoded from ``k`` others of
its stripe as their frames arrive (coding/stream.py), straight into the destination.

roles/rebuild.py decides which pieces a rebuild needs and where they go; this module only
moves and decodes bytes, and checks every piece it produces against its checksum.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable

import numpy as np

from shardguard.daemon.base.metrics import Metrics
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import crc32c, crc32c_combine
from shardguard.daemon.coding.codec import Codecs
from shardguard.daemon.coding.dest import Dest
from shardguard.daemon.coding.stream import StreamClosed, StripeStream
from shardguard.daemon.errors import (
    CorruptionError,
    InsufficientPiecesError,
    PeerUnavailableError,
    ShardguardError,
)
from shardguard.daemon.roles.serve import PieceReader
from shardguard.daemon.roles.survey import LOCAL
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.proto.meta import PieceMeta, StepMeta

logger = logging.getLogger("shardguard.daemon.roles.rebuild")


def spawn(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """Run ``fn(*args)`` in a thread of its own (a few per rebuild: no pool to deadlock)."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def main() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            fut.set_exception(exc)

    threading.Thread(target=main, name="sg-rebuild", daemon=True).start()
    return fut


def wait_all(futs: list[concurrent.futures.Future[Any]], abort: threading.Event,
              each: Callable[[], None] | None = None) -> list[Any]:
    """Results of ``futs`` in order. On the first error ``abort`` is set, every future is
    waited for (none may still write into the destination), and the error of the first
    future in order that failed for a reason of its own (not the abort) is raised, as a
    serial rebuild would have. ``each`` runs here after each future that succeeded."""
    failed = False
    for fut in concurrent.futures.as_completed(futs):
        if fut.exception() is not None:
            failed = True
            abort.set()
        elif each is not None and not failed:
            try:
                each()
            except BaseException:
                abort.set()
                concurrent.futures.wait(futs)
                raise
    if failed:
        errors = [f.exception() for f in futs if f.exception() is not None]
        raise next((e for e in errors if not isinstance(e, StreamClosed)), errors[0])
    return [f.result() for f in futs]


class PieceSource:
    """Fetches, reads and decodes the pieces of one job's rebuilds on this node."""

    def __init__(self, reader: PieceReader, plane: DataPlane, codecs: Codecs,
                 metrics: Metrics) -> None:
        self.reader, self.plane, self.codecs, self.metrics = reader, plane, codecs, metrics

    def fetch_into(self, job: str, meta: StepMeta, alive: dict[int, str], group: int,
                    stripe: int, index: int, want: PieceMeta, dest: Dest,
                    dest_off: int) -> None:
        """A piece as its holder has it, bytes [dest_off, ...) written into ``dest`` as they
        arrive and checksummed on the way."""
        what = (f"job {job} step {meta.step} group {group} stripe {stripe} piece {index} from "
                f"node {want.node}")
        crc, pos = 0, 0

        def land(off: int, part: Any, total: int | None = None) -> None:
            nonlocal crc, pos
            arr = np.frombuffer(part, dtype=np.uint8)
            if off != pos or pos + arr.size > want.len:
                raise CorruptionError(f"{what}: bytes [{off}, {off + arr.size}) arrived out of "
                                      f"order or past the {want.len}-byte piece")
            c = crc32c(arr)
            crc = crc32c_combine(crc, c, arr.size)
            lo, hi = max(off, dest_off), min(off + arr.size, dest_off + len(dest))
            if lo < hi:
                dest.write(lo - dest_off, arr[lo - off:hi - off],
                           c if hi - lo == arr.size else None)
            pos += arr.size

        if alive[want.node] == LOCAL:
            for buf in self.read_local(job, meta, group, stripe, index):
                land(pos, buf)
            got = pos
        else:
            hdr = {"job": job, "step": meta.step, "group": group, "stripe": stripe,
                   "index": index, "req": f"{group}/{stripe}/{index}"}
            got = self.plane.fetch_frames(alive[want.node], hdr, land)
            self.metrics.bytes_received(job, "fetch", got)
        if got != want.len:
            raise CorruptionError(f"node {want.node} sent {got} bytes of a {want.len}-byte piece")
        if crc != want.crc:
            raise CorruptionError(f"{what}: checksum fails")

    def read_local(self, job: str, meta: StepMeta, group: int, stripe: int,
                    index: int) -> list[memoryview]:
        """A piece this daemon holds, read in place."""
        try:
            return self.reader.read(job, meta.step, group, stripe, index, meta)
        except (OSError, ShardguardError) as exc:
            raise PeerUnavailableError(f"own piece {group}/{stripe}/{index}: {exc}") from None

    def decode_into(self, job: str, meta: StepMeta, grp: placement.GroupLayout, stripe: int,
                     q: int, alive: dict[int, str], dest: Dest, dest_off: int,
                     length: int, abort: threading.Event) -> None:
        """Piece ``q`` of a stripe decoded from ``k`` others as they arrive: its bytes
        [dest_off, dest_off+len(dest)) into ``dest`` (the rest only checksummed).

        The ``k`` pieces are chosen by placement (data pieces first, those of nodes
        that answered); a piece that cannot be fetched or fails its checksum is
        replaced by the next one and the piece decoded again. The first try checks only
        the decoded piece's checksum (coding/stream.py); when that fails, the piece is
        decoded again with every source checked, which names the bad one.
        """
        info = meta.stripes[(grp.group, stripe)]
        lost = [p for p, node in enumerate(grp.nodes) if node not in alive]
        try:
            first = [i for i in grp.rebuild_sources(stripe, lost) if i != q]
        except InsufficientPiecesError:
            first = []  # the check below names what is missing
        candidates = first + [i for i in range(grp.k + grp.m) if i != q and i not in first]
        missing = [info.pieces[i].node for i in candidates if info.pieces[i].node not in alive]
        usable = [i for i in candidates if info.pieces[i].node in alive]
        check_sources = False
        while True:
            if len(usable) < grp.k:
                gone = sorted(set(missing) | {info.pieces[q].node})
                raise InsufficientPiecesError(
                    f"job {job} step {meta.step}: group {grp.group} cannot be rebuilt: nodes "
                    f"{gone} are lost or hold corrupt pieces, and its parity covers {grp.m}")
            stream = self._stream(job, meta, grp.group, stripe, q, usable[:grp.k], alive,
                                  grp.k, grp.m, dest, dest_off, length, check_sources)
            bad = stream.run(abort)
            if not bad and (check_sources or stream.crc == info.pieces[q].crc):
                break
            if abort.is_set():
                raise StreamClosed("rebuild aborted")
            if not bad:
                logger.warning("stripe %d piece %d decoded from pieces %s fails its checksum: "
                               "decoding it again with every source checked", stripe, q,
                               sorted(usable[:grp.k]), extra={"job": job, "step": meta.step})
                check_sources = True
                continue
            for idx, exc in sorted(bad.items()):
                if not isinstance(exc, (PeerUnavailableError, CorruptionError)):
                    raise exc
                node = info.pieces[idx].node
                logger.warning("stripe %d piece %d from node %d unusable: %s", stripe, idx,
                               node, exc, extra={"job": job, "step": meta.step, "peer": node})
                missing.append(node)
                usable.remove(idx)
        if stream.crc != info.pieces[q].crc:
            raise CorruptionError(f"job {job} step {meta.step}: decoded piece {q} of stripe "
                                  f"{stripe}: checksum fails")

    def _stream(self, job: str, meta: StepMeta, group: int, stripe: int, q: int,
                use: list[int], alive: dict[int, str], k: int, m: int, dest: Dest,
                dest_off: int, length: int, check_sources: bool) -> StripeStream:
        """A stream decoding piece ``q`` from the pieces ``use``, their fetches started."""
        info = meta.stripes[(group, stripe)]
        stream = StripeStream(self.codecs.get(k, m),
                              {i: (info.pieces[i].len, info.pieces[i].crc) for i in use}, q,
                              length, info.plen, dest, dest_off, check_sources)
        local = []
        for idx in use:
            address = alive[info.pieces[idx].node]
            if address == LOCAL:
                local.append(idx)
            else:
                spawn(self._feed, stream, job, meta.step, address, group, stripe, idx)
        for idx in local:  # this node's own pieces, read in place
            try:
                bufs, at = self.read_local(job, meta, group, stripe, idx), 0
                for buf in bufs:
                    stream.feed(idx, at, buf)
                    at += len(buf)
            except (PeerUnavailableError, StreamClosed) as exc:
                stream.fail(idx, exc)
            else:
                stream.done(idx, at)
        return stream

    def _feed(self, stream: StripeStream, job: str, step: int, address: str, group: int,
              stripe: int, index: int) -> None:
        """Fetch a piece into ``stream`` frame by frame (a thread per source)."""
        hdr = {"job": job, "step": step, "group": group, "stripe": stripe, "index": index,
               "req": f"{group}/{stripe}/{index}"}
        try:
            got = self.plane.fetch_frames(address, hdr,
                                          lambda off, part, total: stream.feed(index, off, part))
        except StreamClosed:
            return  # not wanted any more (decoded, or given up)
        except BaseException as exc:  # noqa: BLE001 - the stream's run() reports it
            stream.fail(index, exc)
            return
        self.metrics.bytes_received(job, "fetch", got)
        stream.done(index, got)
