"""The protection state of this node, per job: stripes being encoded, parity being received,
reports being collected, a failed catch-up. Every role reads and changes it here.

Kept in memory only: a daemon that restarts mid-step loses the step in flight (the
trainers give it up and take the next), never a restorable one (that lives in the
store, the step metadata and the parity files).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from shardguard.daemon.coding.coverage import Coverage
from shardguard.daemon.coding.parity_sums import ParitySums
from shardguard.daemon.coding.placement import GroupLayout
from shardguard.daemon.errors import ShardguardError, SupersededError
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import StepMeta, StripeKey, StripeReport, seal_token


@dataclass
class Encoding:
    """An encoder's stripe of one step: the sources' offers, the bytes in, the parity out."""

    group: GroupLayout
    stripe: int
    #: The job's launch its offers were sealed in (OfferRequest.epoch): one only.
    epoch: int = 0
    offers: dict[int, ppb.OfferRequest] = field(default_factory=dict)
    got: dict[int, int] = field(default_factory=dict)
    piece_bytes: int = 0
    #: Not cleared: each range is written by the first share to reach it (``coverage``).
    parity: list[np.ndarray] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)
    #: The parity's CRC32C, made chunk by chunk as each becomes final (set when ready).
    sums: ParitySums | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    #: A source sealed the step again (a relaunch) after this stripe was under way: it
    #: is replaced by a new encoding; its frames are refused, its parity never reported.
    superseded: bool = False
    #: Held while a frame is folded in and while the encoding is superseded.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: This encoding among the stripe's (parity forwards carry it to their holders).
    ident: int = field(default_factory=lambda: secrets.randbits(63))


@dataclass
class Holding:
    """A parity holder's piece of one step, arriving from its encoder."""

    piece: np.ndarray
    crc: int
    #: The encoding it comes from (:attr:`Encoding.ident`): another one's piece restarts it.
    encoding: int = 0
    epoch: int = 0  # the encoding's launch
    got: int = 0


@dataclass
class Collected:
    """What a group leader (and the root) collected of one step."""

    stripes: dict[StripeKey, StripeReport] = field(default_factory=dict)
    parity: set[tuple[StripeKey, int]] = field(default_factory=set)
    #: The group's metadata, once every stripe and parity piece of it is stored.
    meta: StepMeta | None = None
    #: The launch the leader's reports above are of (a newer launch's replace them).
    epoch: int = 0
    #: The root's: the groups that stored the step; committed once all did.
    groups: set[int] = field(default_factory=set)
    committed: bool = False
    groups_epoch: int = 0  # the launch the root's groups are of


@dataclass
class JobState:
    """One job's protection state on this node (keys start with the step)."""

    encodings: dict[tuple[int, int, int], Encoding] = field(default_factory=dict)
    holdings: dict[tuple[int, int, int, int], Holding] = field(default_factory=dict)
    collected: dict[int, Collected] = field(default_factory=dict)
    #: Why the last catch-up failed; restore raises it on every rank until one succeeds.
    failure: ShardguardError | None = None
    #: The newest launch whose offers this node took as an encoder: an older launch's
    #: are refused (SupersededError), its encodings void.
    epoch: int = 0


class ProtectionState:
    """Every job's :class:`JobState`, one lock, and the condition pushed bytes signal."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # Bytes of pushed pieces arriving (data at encoders, parity at holders): a sender
        # waits on it through the peer ``Received`` call to learn that a piece arrived.
        self.arrived = threading.Condition()
        self._jobs: dict[str, JobState] = {}

    def job(self, job: str) -> JobState:
        with self.lock:
            st = self._jobs.get(job)
            if st is None:
                st = self._jobs[job] = JobState()
            return st

    def peek(self, job: str) -> JobState | None:
        with self.lock:
            return self._jobs.get(job)

    def failure(self, job: str) -> ShardguardError | None:
        st = self.peek(job)
        return None if st is None else st.failure

    def set_failure(self, job: str, exc: ShardguardError | None) -> None:
        self.job(job).failure = exc

    def release_before(self, job: str, step: int) -> None:
        """Forget the stripes and parity of steps before ``step``, and their reports."""
        with self.lock:
            st = self._jobs.get(job)
            if st is None:
                return
            for table in (st.encodings, st.holdings):
                for key in [k for k in table if k[0] < step]:
                    del table[key]
            for s in [s for s in st.collected if s <= step]:
                del st.collected[s]

    def drop(self, job: str) -> None:
        with self.lock:
            self._jobs.pop(job, None)

    def wait_received(self, job: str, step: int, group: int, stripe: int, index: int,
                      want: int, wait_s: float, seal: int = 0) -> int:
        """Bytes of a pushed piece that arrived, once ``want`` did or ``wait_s`` passed.

        Raises:
            SupersededError: ``seal`` (non-zero) names a data piece's seal that its stripe
                no longer holds: the stripe started over (the sender offers again).
        """
        deadline = time.monotonic() + wait_s
        with self.arrived:
            while True:
                got = self.received(job, step, group, stripe, index, seal)
                left = deadline - time.monotonic()
                if got >= want or left <= 0:
                    return got
                self.arrived.wait(left)

    def received(self, job: str, step: int, group: int, stripe: int, index: int,
                 seal: int = 0) -> int:
        """Bytes of a pushed piece that arrived: parity at its holder, data at its encoder."""
        st = self.peek(job)
        if st is None:
            return 0
        held = st.holdings.get((step, group, stripe, index))
        if held is not None:
            return held.got
        enc = st.encodings.get((step, group, stripe))
        if seal and enc is not None:
            offer = enc.offers.get(index)
            if enc.superseded or offer is None or seal_token(offer.layout) != seal:
                raise SupersededError(f"job {job} step {step} group {group} stripe {stripe} "
                                      f"piece {index}: the stripe started over with another "
                                      f"seal; offer again")
        return enc.got.get(index, 0) if enc is not None else 0
