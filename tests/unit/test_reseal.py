"""A step sealed again (a relaunch resumed before it) while its older seal is still being
protected: the encoder, the parity holder and the group leader keep one seal, never a mix
(daemon/roles/encoder.py, holder.py, leader.py).

Found in test_cluster's lose-node runs: node 3 was killed while the others sealed step 3;
the relaunch sealed step 3 again, and the survivors' older sends, blocked in their offers,
were released by the newer offers and pushed their bytes into the same stripe a second
time. The stripe never completed and step 3 was never restorable (the trainers waited
SHARDGUARD_PROTECT_TIMEOUT_S and the last step went unprotected). These tests drive the
real roles with in-memory pieces and a recording reporter.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codecs
from shardguard.daemon.errors import SupersededError
from shardguard.daemon.roles.encoder import Encoder
from shardguard.daemon.roles.holder import Holder
from shardguard.daemon.roles.leader import GroupLeader
from shardguard.daemon.roles.state import ProtectionState
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.arena import SlotDesc, SlotState
from shardguard.proto.meta import (
    NodeLayout,
    PieceMeta,
    RankEntry,
    StripeReport,
    Topology,
    seal_token,
)

JOB = "job"
STEP = 3
PLEN = 4096


class _Metrics:
    @contextlib.contextmanager
    def encoding(self, job: str, nbytes: int) -> Any:
        yield

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


@dataclass
class _Rec:
    topology: Topology


class _Store:
    budget_bytes = 1 << 30

    def __init__(self, topo: Topology) -> None:
        self.rec, self.metrics = _Rec(topo), _Metrics()

    def job(self, job: str) -> _Rec:
        return self.rec

    def latest(self, job: str) -> int | None:
        return 2


class _Pieces:
    """In-memory parity buffers; not asked to clear them, they hold stale bytes (a pool
    file of an older step)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(11)

    def _buffer(self, nbytes: int, clear: bool) -> np.ndarray:
        return np.zeros(nbytes, dtype=np.uint8) if clear else \
            self.rng.integers(0, 256, nbytes, dtype=np.uint8)

    def create(self, job: str, step: int, group: int, stripe: int, index: int,
               nbytes: int, clear: bool = True) -> np.ndarray:
        return self._buffer(nbytes, clear)

    def scratch(self, job: str, group: int, stripe: int, j: int, nbytes: int,
                clear: bool = True) -> np.ndarray:
        return self._buffer(nbytes, clear)


class _Reporter:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, job: str, step: int, topo: Topology, report: Any) -> None:
        self.sent.append(report)


class _Stalls:
    def __init__(self) -> None:
        self.errors: list[Any] = []

    def record_error(self, job: str, exc: BaseException, what: str) -> None:
        self.errors.append(exc)


class _Inline(concurrent.futures.Executor):
    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def _topo(me: int) -> Topology:
    return Topology(tuple((f"127.0.0.1:{100 + i}", f"127.0.0.1:{200 + i}") for i in range(4)),
                    me, 4, 1)


def _layout(node: int, generation: int) -> bytes:
    return NodeLayout(PLEN, PLEN, (RankEntry(node, 0, PLEN, PLEN, SlotDesc(
        SlotState.RESTORABLE, STEP, PLEN - 100, PLEN - 100, 100, 0, 0, generation)),)).encode()


def _encoder(me: int = 0) -> tuple[Encoder, _Reporter, _Stalls]:
    reporter, stalls = _Reporter(), _Stalls()
    enc = Encoder(_Store(_topo(me)), ProtectionState(), _Pieces(), Codecs(),  # type: ignore[arg-type]
                  None, None, reporter, _Inline(), stalls, 5.0)  # type: ignore[arg-type]
    return enc, reporter, stalls


def _offer(q: int, node: int, generation: int) -> ppb.OfferRequest:
    return ppb.OfferRequest(job=JOB, step=STEP, stripe=0, group=0, index=q, node=node,
                            piece_bytes=PLEN, real_bytes=PLEN, crc=0,
                            layout=_layout(node, generation))


def _offer_all(enc: Encoder, offers: list[ppb.OfferRequest]) -> list[Any]:
    """Offer together (each offer waits for the stripe's k); each one's answer or error."""
    out: list[Any] = [None] * len(offers)

    def one(i: int) -> None:
        try:
            out[i] = enc.offer(offers[i])
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(offers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def _offer_in_thread(enc: Encoder, results: dict[int, Any], key: int,
                     req: ppb.OfferRequest) -> threading.Thread:
    """Offer on a thread of its own (an offer waits for the stripe's k); its answer or
    error lands in ``results[key]``."""
    def run() -> None:
        try:
            results[key] = enc.offer(req)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[key] = exc
    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_offers(enc: Encoder, n: int) -> None:
    """Until stripe 0 holds ``n`` offers."""
    for _ in range(1000):
        e = enc.state.job(JOB).encodings.get((STEP, 0, 0))
        if e is not None and len(e.offers) >= n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"stripe 0 never held {n} offers")


def _frame(enc: Encoder, offer: ppb.OfferRequest, data: np.ndarray, off: int, n: int) -> None:
    enc.on_data({"job": JOB, "step": STEP, "group": 0, "stripe": 0, "index": offer.index,
                 "off": off, "n": n, "seal": seal_token(offer.layout)},
                memoryview(data[off:off + n].tobytes()))


def test_a_newer_seal_restarts_a_stripe_under_way_and_the_older_bytes_are_refused() -> None:
    enc, reporter, _ = _encoder()
    sources = [1, 2, 3]  # stripe 0 of a 4-node group: encoded at node 0
    rng = np.random.default_rng(3)
    old_data = [rng.integers(0, 256, PLEN, dtype=np.uint8) for _ in sources]
    new_data = [rng.integers(0, 256, PLEN, dtype=np.uint8) for _ in sources]
    old = [_offer(q, n, 1) for q, n in enumerate(sources)]
    assert _offer_all(enc, old) == [PLEN] * 3
    _frame(enc, old[0], old_data[0], 0, 1024)  # the older seal's bytes are under way

    # The relaunch seals step 3 again: piece 0's new offer restarts the stripe ...
    new = [_offer(q, n, 2) for q, n in enumerate(sources)]
    assert _offer_all(enc, new) == [PLEN] * 3
    # ... and what is left of the older seal's send is refused, not folded in.
    with pytest.raises(SupersededError):
        _frame(enc, old[1], old_data[1], 0, PLEN)
    for q in range(3):
        _frame(enc, new[q], new_data[q], 0, PLEN)
    assert len(reporter.sent) == 1
    rep = reporter.sent[0]
    assert {n: lay for n, lay in rep.layouts.items()} == {
        n: NodeLayout.decode(_layout(n, 2)) for n in sources}
    want = np.zeros(PLEN, dtype=np.uint8)
    Codecs().get(3, 1).encode([d.data for d in new_data], [want.data])
    assert rep.pieces[3].crc == crc32c(want)  # the newer seal's parity alone


def test_parity_from_frames_in_any_order_over_a_stale_file_is_the_stripes_parity() -> None:
    """The encoder writes each range's first share and adds the others (parity files are
    reused uncleared, coding/coverage.py): frames of uneven sources in a shuffled order,
    split unaligned, give the parity that encoding the zero-padded pieces gives, and the
    bytes past every source's end are zero."""
    enc, reporter, stalls = _encoder()
    rng = np.random.default_rng(4)
    lengths = [PLEN - 96, PLEN - 1000, 3001]  # no source reaches the piece's last 96 bytes
    data = [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]
    offers = [ppb.OfferRequest(job=JOB, step=STEP, stripe=0, group=0, index=q, node=node,
                               piece_bytes=PLEN, real_bytes=lengths[q], crc=0,
                               layout=_layout(node, 1)) for q, node in enumerate([1, 2, 3])]
    assert _offer_all(enc, offers) == [PLEN] * 3
    frames = []
    for q, n in enumerate(lengths):
        cuts = sorted({0, n, *rng.integers(1, n, 5).tolist()})
        frames += [(q, lo, hi - lo) for lo, hi in zip(cuts, cuts[1:])]
    for i in rng.permutation(len(frames)):
        q, off, n = frames[i]
        _frame(enc, offers[q], data[q], off, n)
    assert not stalls.errors and len(reporter.sent) == 1
    padded = [np.concatenate([d, np.zeros(PLEN - len(d), np.uint8)]) for d in data]
    want = np.zeros(PLEN, dtype=np.uint8)
    Codecs().get(3, 1).encode([p.data for p in padded], [want.data])
    assert not want[-96:].any()
    assert reporter.sent[0].pieces[3].crc == crc32c(want)


def _waiting(enc: Encoder, target: Any) -> threading.Thread:
    """``target`` on a thread of its own, returned once it waits in ``wait_received``."""
    t = threading.Thread(target=target)
    t.start()
    for _ in range(1000):
        if enc.state.arrived._waiters:  # type: ignore[attr-defined]
            return t
        threading.Event().wait(0.01)
    raise AssertionError("the sender never waited")


def test_a_sender_waiting_for_its_piece_is_woken_when_it_completes() -> None:
    """Frames wake the senders' ``Received`` waits only when a piece is complete (not
    once per frame); the wait then returns at once, not at its deadline."""
    enc, _, _ = _encoder()
    offers = [_offer(q, n, 1) for q, n in enumerate([1, 2, 3])]
    assert _offer_all(enc, offers) == [PLEN] * 3
    data = np.random.default_rng(6).integers(0, 256, PLEN, dtype=np.uint8)
    got: dict[str, int] = {}

    def wait() -> None:
        got["n"] = enc.state.wait_received(JOB, STEP, 0, 0, 0, PLEN, 60.0,
                                           seal_token(offers[0].layout))

    t = _waiting(enc, wait)
    _frame(enc, offers[0], data, 0, 1024)
    t.join(0.2)
    assert t.is_alive()  # a part of the piece: still waiting
    _frame(enc, offers[0], data, 1024, PLEN - 1024)
    t.join(10)  # far below the wait's 60 s: woken, not timed out
    assert not t.is_alive() and got == {"n": PLEN}


def test_a_sender_waiting_on_a_stripe_that_starts_over_is_told_at_once() -> None:
    enc, _, _ = _encoder()
    old = [_offer(q, n, 1) for q, n in enumerate([1, 2, 3])]
    assert _offer_all(enc, old) == [PLEN] * 3
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            enc.state.wait_received(JOB, STEP, 0, 0, 0, PLEN, 60.0, seal_token(old[0].layout))
        except SupersededError as exc:
            raised.append(exc)

    t = _waiting(enc, wait)
    assert _offer_all(enc, [_offer(q, n, 2) for q, n in enumerate([1, 2, 3])]) == [PLEN] * 3
    t.join(10)
    assert not t.is_alive() and len(raised) == 1


def test_an_older_offer_still_waiting_is_void_once_a_newer_one_completes_the_stripe() -> None:
    """The case CI hit: the older seal's offers wait (node 3 died before offering); the
    relaunch's offers complete the stripe; the older waiters are told they are void
    instead of being released to push their bytes."""
    enc, reporter, _ = _encoder()
    old = [_offer(0, 1, 1), _offer(1, 2, 1)]
    new = [_offer(0, 1, 2), _offer(1, 2, 2), _offer(2, 3, 7)]
    results: dict[int, Any] = {}
    waiters = [_offer_in_thread(enc, results, i, old[i]) for i in range(2)]
    _wait_offers(enc, 2)  # both older offers are in, waiting for node 3's
    assert _offer_all(enc, new) == [PLEN] * 3
    for t in waiters:
        t.join(10)
    assert all(isinstance(r, SupersededError) for r in results.values()), results
    rng = np.random.default_rng(5)
    for q in range(3):
        _frame(enc, new[q], rng.integers(0, 256, PLEN, dtype=np.uint8), 0, PLEN)
    assert len(reporter.sent) == 1


def test_a_holder_takes_a_restarted_stripes_parity_from_its_first_frame() -> None:
    topo = _topo(1)  # stripe 0's parity 1 (m=2 here) is held at position 1
    topo = Topology(topo.nodes, 1, 4, 2)
    reporter, stalls = _Reporter(), _Stalls()
    holder = Holder(_Store(topo), ProtectionState(), _Pieces(), reporter,  # type: ignore[arg-type]
                    _Inline(), stalls)  # type: ignore[arg-type]
    old, new = np.full(PLEN, 1, np.uint8), np.full(PLEN, 2, np.uint8)

    def frame(piece: np.ndarray, encoding: int, off: int, n: int) -> None:
        holder.on_parity({"job": JOB, "step": STEP, "group": 0, "stripe": 0, "index": 3,
                          "plen": PLEN, "crc": crc32c(piece), "encoding": encoding,
                          "off": off, "n": n}, memoryview(piece[off:off + n].tobytes()))

    frame(old, 11, 0, 1024)  # the older encoding's piece, part way
    for off in range(0, PLEN, 1024):
        frame(new, 12, off, 1024)
    assert len(reporter.sent) == 1 and not stalls.errors
    held = holder.state.job(JOB).holdings[(STEP, 0, 0, 3)]
    assert held.encoding == 12 and held.got == PLEN and (held.piece == 2).all()


def _stripe(stripe: int, gens: dict[int, int]) -> StripeReport:
    return StripeReport(0, stripe, PLEN, {0: PieceMeta(1, PLEN, 0)},
                        {n: NodeLayout.decode(_layout(n, g)) for n, g in gens.items()})


def test_the_leader_builds_a_steps_metadata_from_one_seal_of_each_node() -> None:
    topo = _topo(0)
    reporter = _Reporter()
    leader = GroupLeader(_Store(topo), ProtectionState(), None, reporter,  # type: ignore[arg-type]
                         _Inline(), 5.0)
    # The older seal: stripes 0 and 1 reported before the relaunch.
    leader.report(JOB, STEP, _stripe(0, {1: 1, 2: 1, 3: 1}))
    leader.report(JOB, STEP, _stripe(1, {2: 1, 3: 1, 0: 1}))
    # The newer seal of every node: stripe 2 names node 0's and 3's newer layouts, which
    # voids both older reports; the group completes only once its 4 stripes are of it.
    leader.report(JOB, STEP, _stripe(2, {3: 2, 0: 2, 1: 2}))
    col = leader.state.job(JOB).collected[STEP]
    assert set(col.stripes) == {(0, 2)}
    leader.report(JOB, STEP, _stripe(3, {0: 2, 1: 2, 2: 2}))
    leader.report(JOB, STEP, _stripe(0, {1: 2, 2: 2, 3: 2}))
    assert not reporter.sent
    leader.report(JOB, STEP, _stripe(1, {2: 2, 3: 2, 0: 2}))
    assert len(reporter.sent) == 1 and col.meta is not None
    assert {n: lay.ranks[0].record.generation for n, lay in col.meta.layouts.items()} == \
        {0: 2, 1: 2, 2: 2, 3: 2}


def test_offers_of_two_seals_that_made_a_stripe_ready_are_sorted_out_by_offering_again(
        ) -> None:
    """test_cluster lose-node1's order: the older seal's offers of nodes 1 and 3 wait
    (node 2 was lost); the relaunch's node 1 replaces its own, the replacement node 2's
    completes the stripe with node 3's older offer still in it. Node 3's newer offer
    then starts the stripe over; the newer sources learn it from ``Received`` (their
    seal is no longer the stripe's) and offer again, and the stripe completes with the
    newer seal alone."""
    enc, reporter, _ = _encoder()
    old = {1: _offer(0, 1, 1), 3: _offer(2, 3, 1)}
    new = {1: _offer(0, 1, 2), 2: _offer(1, 2, 2), 3: _offer(2, 3, 2)}
    results: dict[int, Any] = {}

    def offer(key: int, req: ppb.OfferRequest) -> threading.Thread:
        return _offer_in_thread(enc, results, key, req)

    def offers_in(n: int) -> None:
        _wait_offers(enc, n)

    t_old1, t_old3 = offer(-1, old[1]), offer(-3, old[3])
    offers_in(2)
    t_new1 = offer(1, new[1])
    offers_in(2)
    t_new2 = offer(2, new[2])  # ready: {1 new, 2 new, 3 old}
    for t in (t_old1, t_old3, t_new1, t_new2):
        t.join(10)
    assert isinstance(results[-1], SupersededError) and results[-3] == PLEN
    assert results[1] == results[2] == PLEN
    t_new3 = offer(3, new[3])  # node 3's newer seal: the stripe starts over
    offers_in(1)

    def received(req: ppb.OfferRequest) -> Any:
        try:
            return enc.state.received(JOB, STEP, 0, 0, req.index, seal_token(req.layout))
        except SupersededError as exc:
            return exc

    assert isinstance(received(new[1]), SupersededError)
    assert isinstance(received(new[2]), SupersededError)
    assert _offer_all(enc, [new[1], new[2]]) == [PLEN, PLEN]  # they offer again
    t_new3.join(10)
    assert results[3] == PLEN and received(new[1]) == 0
    rng = np.random.default_rng(7)
    for req in new.values():
        _frame(enc, req, rng.integers(0, 256, PLEN, dtype=np.uint8), 0, PLEN)
    assert len(reporter.sent) == 1
    assert reporter.sent[0].layouts == {n: NodeLayout.decode(_layout(n, 2)) for n in new}


def _offer_e(q: int, node: int, generation: int, epoch: int) -> ppb.OfferRequest:
    req = _offer(q, node, generation)
    req.epoch = epoch
    return req


def test_a_newer_launchs_first_offer_voids_the_older_launchs_stripes() -> None:
    """Offers carry the job's launch (RegisterRequest.epoch, one more than any daemon
    held at connect): the first offer of launch 2 voids launch 1's stripes, whichever
    node's offer comes first; launch 1's waiting offers are answered SupersededError and
    a late one is refused at once, so no stripe ever holds offers of two launches."""
    enc, reporter, _ = _encoder()
    results: dict[int, Any] = {}

    def offer(key: int, req: ppb.OfferRequest) -> threading.Thread:
        return _offer_in_thread(enc, results, key, req)

    waiting = [offer(-1, _offer_e(0, 1, 1, 1)), offer(-3, _offer_e(2, 3, 1, 1))]
    _wait_offers(enc, 2)
    new = [_offer_e(1, 2, 5, 2)]  # the replacement node's offer comes first
    t2 = offer(2, new[0])
    for t in waiting:
        t.join(10)
    assert isinstance(results[-1], SupersededError) and isinstance(results[-3], SupersededError)
    with pytest.raises(SupersededError, match="launch 1"):
        enc.offer(_offer_e(0, 1, 1, 1))  # late: refused at once
    new += [_offer_e(0, 1, 2, 2), _offer_e(2, 3, 2, 2)]
    assert _offer_all(enc, new[1:]) == [PLEN, PLEN]
    t2.join(10)
    assert results[2] == PLEN
    rng = np.random.default_rng(9)
    for req in new:
        _frame(enc, req, rng.integers(0, 256, PLEN, dtype=np.uint8), 0, PLEN)
    assert len(reporter.sent) == 1 and reporter.sent[0].epoch == 2


def test_the_leader_and_root_keep_the_newest_launchs_reports() -> None:
    topo = _topo(0)
    reporter = _Reporter()
    leader = GroupLeader(_Store(topo), ProtectionState(), None, reporter,  # type: ignore[arg-type]
                         _Inline(), 5.0)

    def stripe(s: int, gen: int, epoch: int) -> StripeReport:
        r = _stripe(s, {n: gen for n in range(4) if n != s})
        return StripeReport(r.group, r.stripe, r.plen, r.pieces, r.layouts, epoch)

    leader.report(JOB, STEP, stripe(0, 1, 1))
    leader.report(JOB, STEP, stripe(1, 1, 1))
    leader.report(JOB, STEP, stripe(2, 2, 2))  # launch 2: launch 1's reports are void
    leader.report(JOB, STEP, stripe(3, 1, 1))  # a late one of launch 1: ignored
    col = leader.state.job(JOB).collected[STEP]
    assert set(col.stripes) == {(0, 2)} and col.epoch == 2
    for s in (0, 1, 3):
        leader.report(JOB, STEP, stripe(s, 2, 2))
    assert [(r.group, r.epoch) for r in reporter.sent] == [(0, 2)]
    assert col.meta is not None and all(
        lay.ranks[0].record.generation == 2 for lay in col.meta.layouts.values())


def test_the_root_commits_a_step_from_the_newest_launchs_groups_only() -> None:
    """Two groups of 4 (8 nodes): group 1 stored the step in launch 1, then the job was
    relaunched; launch 2's group 0 alone must not complete the step with launch 1's
    group 1, and a late launch-1 report changes nothing."""
    from shardguard.daemon.roles.root import Root

    topo = Topology(tuple((f"127.0.0.1:{100 + i}", f"127.0.0.1:{200 + i}") for i in range(8)),
                    0, 4, 1)
    committed: list[tuple[str, int]] = []

    class _Peers:
        def stub(self, address: str) -> Any:
            class _S:
                def Commit(self, req: Any, timeout: float) -> None:
                    committed.append((address, req.step))
            return _S()

    root = Root(_Store(topo), ProtectionState(), _Peers(), _Inline(), 5.0)  # type: ignore[arg-type]
    root.commit_here = lambda job, step, token: committed.append(("here", step))
    root.group_stored(JOB, STEP, 1, 1)
    root.group_stored(JOB, STEP, 0, 2)  # launch 2: launch 1's group 1 is void
    assert committed == []
    root.group_stored(JOB, STEP, 1, 1)  # late, launch 1: ignored
    assert committed == []
    root.group_stored(JOB, STEP, 1, 2)
    assert sorted(committed) == [("127.0.0.1:104", STEP), ("here", STEP)]
