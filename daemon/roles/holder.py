"""The parity holder role: parity ``j >= 1`` of a stripe arrives from its encoder and is kept.

The piece goes straight into its shm file (storage/pieces.py) frame by frame; once
all of it is in and its CRC32C matches what the encoder computed, the holder reports
it to the coordinator. A corrupted piece is not reported: the step is not restorable.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import numpy as np

from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.roles import checks
from shardguard.daemon.roles.leader import Reporter
from shardguard.daemon.roles.state import Holding, ProtectionState
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.store import Store
from shardguard.proto.meta import ParityReport

logger = logging.getLogger(__name__)


class Holder:
    """Keeps the forwarded parity pieces this node holds."""

    def __init__(self, store: Store, state: ProtectionState, pieces: PieceFiles,
                 reporter: Reporter, pool: concurrent.futures.Executor, stalls: Stalls) -> None:
        self.store, self.state, self.pieces = store, state, pieces
        self.reporter, self.pool, self.stalls = reporter, pool, stalls

    def on_parity(self, h: dict[str, Any], payload: memoryview) -> None:
        """A frame of a parity piece (the data plane calls this on its thread)."""
        job, step, group, stripe, index = (h["job"], int(h["step"]), int(h["group"]),
                                           int(h["stripe"]), int(h["index"]))
        topo = checks.topology_of(self.store, job)
        checks.in_flight(self.store, job, step)
        grp = checks.group_of(topo, group, stripe, index)
        if index < grp.k or grp.nodes[grp.holder(stripe, index)] != topo.node_index:
            raise InvalidRequestError(f"node {topo.node_index} does not hold piece {index} of "
                                      f"group {group} stripe {stripe}")
        st = self.state.job(job)
        key = (step, group, stripe, index)
        encoding, epoch = int(h.get("encoding", 0)), int(h.get("epoch", 0))
        with self.state.lock:
            held = st.holdings.get(key)
            if held is None or held.encoding != encoding:
                # New, or the stripe started over (a relaunch sealed the step again): the
                # newer encoding's piece replaces the older one from its first frame.
                plen = int(h["plen"])
                checks.piece_size(plen, self.store.budget_bytes, "plen")
                held = Holding(self.pieces.create(job, step, group, stripe, index, plen),
                               int(h["crc"]), encoding, epoch)
                st.holdings[key] = held
        off, n = int(h["off"]), int(h["n"])
        if n != len(payload) or off < 0 or off + n > len(held.piece):
            raise InvalidRequestError(f"parity frame [{off}, +{n}) outside piece "
                                      f"{(job, *key)}")
        held.piece[off:off + n] = np.frombuffer(payload, dtype=np.uint8)
        with self.state.arrived:
            held.got += n
            if held.got >= len(held.piece):  # its sender waits for the whole piece
                self.state.arrived.notify_all()
        self.store.metrics.bytes_received(job, "parity", n)
        if held.got == len(held.piece):
            self.pool.submit(self._finish, job, key, held)

    def _finish(self, job: str, key: tuple[int, int, int, int], held: Holding) -> None:
        step, group, stripe, index = key
        if crc32c(held.piece) != held.crc:
            logger.error("parity %s arrived corrupted", key, extra={"job": job, "step": step})
            return
        try:
            topo = checks.topology_of(self.store, job)
            self.reporter.send(job, step, topo, ParityReport(group, stripe, index, held.epoch))
        except Exception as exc:  # noqa: BLE001 - the step is never restorable; say why
            logger.warning("parity %s: report failed: %s", key, exc,
                           extra={"job": job, "step": step})
            self.stalls.record_error(job, exc, f"reporting parity {index} of group {group} "
                                               f"stripe {stripe} of step {step}")
