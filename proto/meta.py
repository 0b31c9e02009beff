"""What daemons tell each other about a step, typed: parsed and checked once, at the boundary.

The peer wire carries these as JSON (proto/peer.proto's ``bytes`` fields); inside a
daemon they are frozen dataclasses and nothing is looked up by string key. The
documents, in the order a step meets them (DESIGN §3):

- :class:`NodeLayout`: a source node's payload (its ranks' sealed slots, in rank order)
  and its piece size; it travels with each ``Offer``.
- :class:`Report` (:class:`StripeReport`, :class:`ParityReport`, :class:`FlushedReport`):
  what encoders, parity holders and tier flushers tell the coordinator.
- :class:`StepMeta`: what the coordinator announces with "step N is restorable":
  every node's layout and every stripe's pieces (node, length, CRC32C), which a
  rebuild and ``verify`` need; keyed by ``(group, stripe)``.
- ``verify``'s answers: proto/verify_report.py.

:class:`Topology` is the job as the client handed it over at register. This module
imports nothing of ours but the errors and the slot record (proto/arena.py): the daemon
adds placement maths on top.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

from shardguard.proto.arena import SlotDesc, SlotState
from shardguard.proto.errors import InvalidRequestError

#: ``(group, stripe)``: a stripe of the job.
StripeKey = tuple[int, int]


def _int(x: Any, what: str, lo: int = 0) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < lo:
        raise InvalidRequestError(f"{what} is not an integer >= {lo}: {x!r}")
    return x


def json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object (else InvalidRequestError naming ``what``)."""
    return _obj(_json(raw, what), what)


def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise InvalidRequestError(f"{what} is not an object")
    return x


def _json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{what} is not JSON: {exc}") from None


# ------------------------------------------------------------------ the job


@dataclass(frozen=True)
class Code:
    """How a job's nodes are grouped and coded: what placement needs, no addresses."""

    nodes: int
    group_size: int
    parity: int
    placement: str = "contiguous"

    @classmethod
    def from_doc(cls, doc: Any) -> "Code":
        d = _obj(doc, "code")
        placement = d.get("placement", "contiguous")
        if not isinstance(placement, str):
            raise InvalidRequestError("code placement is not a name")
        return cls(_int(d.get("nodes"), "nodes", 1), _int(d.get("group_size"), "group_size"),
                   _int(d.get("parity"), "parity"), placement)

    def to_doc(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "group_size": self.group_size, "parity": self.parity,
                "placement": self.placement}


@functools.lru_cache(maxsize=16)
def _digest(nodes: tuple[tuple[str, str], ...]) -> str:
    """The node list's fingerprint in Topology.describe (shared by equal lists)."""
    return hashlib.sha256(json.dumps([list(n) for n in nodes]).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Topology:
    """A multi-node job: every node's (control, data) address, this node's number, the code."""

    nodes: tuple[tuple[str, str], ...]
    node_index: int
    group_size: int
    parity: int
    #: How nodes form groups: "contiguous" or "stride" (daemon/coding/placement.py).
    placement: str = "contiguous"

    @classmethod
    def from_doc(cls, doc: Any) -> "Topology":
        d = _obj(doc, "topology")
        nodes = d.get("nodes")
        if not (isinstance(nodes, list) and all(
                isinstance(n, (list, tuple)) and len(n) == 2 and all(isinstance(a, str) for a in n)
                for n in nodes)):
            raise InvalidRequestError("topology nodes are not (control, data) address pairs")
        placement = d.get("placement", "contiguous")
        if not isinstance(placement, str):
            raise InvalidRequestError("topology placement is not a name")
        return cls(tuple((c, a) for c, a in nodes), _int(d.get("node_index"), "node_index"),
                   _int(d.get("group_size"), "group_size"), _int(d.get("parity"), "parity"),
                   placement)

    def to_doc(self) -> dict[str, Any]:
        return {"nodes": [list(n) for n in self.nodes], "node_index": self.node_index,
                "group_size": self.group_size, "parity": self.parity,
                "placement": self.placement}

    @property
    def me(self) -> tuple[str, str]:
        return self.nodes[self.node_index]

    @property
    def code(self) -> Code:
        return Code(len(self.nodes), self.group_size, self.parity, self.placement)

    def describe(self) -> str:
        """The job as every node must see it (not which node this is), in words.

        Every offer carries it and every encoder compares it: computed once per topology
        (hashing the node list is O(nodes), ~10 ms at 10,000 nodes, and a node sees ``k``
        offers a step)."""
        text = self.__dict__.get("_described")
        if text is None:
            text = (f"{len(self.nodes)} nodes (list {_digest(self.nodes)}), group_size "
                    f"{self.group_size}, parity {self.parity}, placement {self.placement}")
            object.__setattr__(self, "_described", text)  # a cache, not a field
        return text

    def with_node(self, index: int, address: tuple[str, str]) -> "Topology":
        nodes = list(self.nodes)
        nodes[index] = address
        return replace(self, nodes=tuple(nodes))


# ------------------------------------------------------------- a node's payload


def slot_from_doc(doc: Any) -> SlotDesc:
    """A slot record written by ``SlotDesc.to_doc``, every field checked."""
    d = _obj(doc, "slot record")
    values = {f: _int(d.get(f), f"slot {f}", -1 if f == "step" else 0)
              for f in SlotDesc.__dataclass_fields__}
    try:
        return SlotDesc(**{**values, "state": SlotState(values["state"])})
    except ValueError:
        raise InvalidRequestError(f"slot state {values['state']} is unknown") from None


@dataclass(frozen=True)
class RankEntry:
    """One rank's slot inside its node's payload: bytes ``[off, off + used)``."""

    rank: int
    off: int
    used: int
    slot_bytes: int
    record: SlotDesc

    @classmethod
    def from_doc(cls, doc: Any) -> "RankEntry":
        d = _obj(doc, "rank entry")
        return cls(_int(d.get("rank"), "rank"), _int(d.get("off"), "off"),
                   _int(d.get("used"), "used"), _int(d.get("slot_bytes"), "slot_bytes"),
                   slot_from_doc(d.get("record")))

    def to_doc(self) -> dict[str, Any]:
        return {"rank": self.rank, "off": self.off, "used": self.used,
                "slot_bytes": self.slot_bytes, "record": self.record.to_doc()}


@dataclass(frozen=True)
class NodeLayout:
    """A source node's payload of a step: its size, its piece size, its ranks' places."""

    bytes: int
    plen: int
    ranks: tuple[RankEntry, ...]

    @classmethod
    def from_doc(cls, doc: Any) -> "NodeLayout":
        d = _obj(doc, "layout")
        ranks = d.get("ranks")
        if not isinstance(ranks, list):
            raise InvalidRequestError("layout ranks is not a list")
        return cls(_int(d.get("bytes"), "bytes"), _int(d.get("plen"), "plen"),
                   tuple(RankEntry.from_doc(r) for r in ranks))

    @classmethod
    def decode(cls, raw: bytes) -> "NodeLayout":
        return cls.from_doc(_json(raw, "layout"))

    def to_doc(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "plen": self.plen, "ranks": [r.to_doc() for r in self.ranks]}

    def encode(self) -> bytes:
        return json.dumps(self.to_doc()).encode()


def seal_token(layout: bytes) -> int:
    """Which seal of a step an offer and its data frames come from: the encoded layout
    names each rank's slot generation, which every new seal of the slot raises."""
    return zlib.crc32(layout)


# ---------------------------------------------------------------- pieces


@dataclass(frozen=True)
class PieceMeta:
    """A piece of a stripe: the node holding it, its real length and its CRC32C."""

    node: int
    len: int
    crc: int

    @classmethod
    def from_doc(cls, doc: Any) -> "PieceMeta":
        d = _obj(doc, "piece")
        return cls(_int(d.get("node"), "piece node"), _int(d.get("len"), "piece len"),
                   _int(d.get("crc"), "piece crc"))

    def to_doc(self) -> dict[str, int]:
        return {"node": self.node, "len": self.len, "crc": self.crc}


def _pieces(doc: Any) -> dict[int, PieceMeta]:
    out = {}
    for idx, piece in _obj(doc, "pieces").items():
        if not str(idx).isdigit():
            raise InvalidRequestError(f"piece index {idx!r} is not a number")
        out[int(idx)] = PieceMeta.from_doc(piece)
    return out


@dataclass(frozen=True)
class StripeMeta:
    """A stripe of a step: its piece size and where each of its ``k + m`` pieces is."""

    plen: int
    pieces: Mapping[int, PieceMeta]

    def to_doc(self) -> dict[str, Any]:
        return {"plen": self.plen, "pieces": {str(i): p.to_doc() for i, p in
                                              sorted(self.pieces.items())}}


def _stripe_key(where: str) -> StripeKey:
    g, sep, s = where.partition("/")
    if not (sep and g.isdigit() and s.isdigit()):
        raise InvalidRequestError(f"stripe key {where!r} is not group/stripe")
    return int(g), int(s)


# ------------------------------------------------------------------- a step


@dataclass(frozen=True)
class StepMeta:
    """One group's part of a restorable step, as its leader announces it to the group.

    A node keeps the metadata of the group whose pieces it holds: its layouts (the
    members' payloads) and stripes (where each piece is, its length and CRC32C), the
    members' addresses when the step was protected, and the job's code, so that its
    size is the group's, not the job's.
    """

    job: str
    step: int
    code: Code
    group: int
    members: Mapping[int, tuple[str, str]]  # node -> (control, data) when protected
    layouts: Mapping[int, NodeLayout]
    stripes: Mapping[StripeKey, StripeMeta]
    #: The persistent tier's claim on the step ("": none).
    tier: str = ""

    @classmethod
    def from_doc(cls, doc: Any, job: str, step: int) -> "StepMeta":
        d = _obj(doc, "step metadata")
        if d.get("job") != job or d.get("step") != step:
            raise InvalidRequestError(f"job {job} step {step}: step metadata names job "
                                      f"{d.get('job')!r} step {d.get('step')!r}")
        layouts, stripes = _obj(d.get("layouts"), "layouts"), _obj(d.get("stripes"), "stripes")
        members = _obj(d.get("members"), "members")
        if any(not str(n).isdigit() for n in (*layouts, *members)):
            raise InvalidRequestError("layouts and members are not keyed by node number")
        if not all(isinstance(a, (list, tuple)) and len(a) == 2
                   and all(isinstance(x, str) for x in a) for a in members.values()):
            raise InvalidRequestError("members are not (control, data) address pairs")
        try:
            return cls(job, step, Code.from_doc(d.get("code")), _int(d.get("group"), "group"),
                       {int(n): (a[0], a[1]) for n, a in members.items()},
                       {int(n): NodeLayout.from_doc(lay) for n, lay in layouts.items()},
                       {_stripe_key(w): StripeMeta(_int(_obj(st, "stripe").get("plen"), "plen"),
                                                   _pieces(st.get("pieces")))
                        for w, st in stripes.items()},
                       d.get("tier") if isinstance(d.get("tier"), str) else "")
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"job {job} step {step}: step metadata: {exc}") from None

    @classmethod
    def decode(cls, raw: bytes | str, job: str, step: int) -> "StepMeta":
        return cls.from_doc(_json(raw, f"job {job} step {step}: step metadata"), job, step)

    def to_doc(self) -> dict[str, Any]:
        doc = {"job": self.job, "step": self.step, "code": self.code.to_doc(),
               "group": self.group,
               "members": {str(n): list(a) for n, a in sorted(self.members.items())},
               "layouts": {str(n): lay.to_doc() for n, lay in sorted(self.layouts.items())},
               "stripes": {f"{g}/{s}": st.to_doc() for (g, s), st in sorted(self.stripes.items())}}
        if self.tier:
            doc["tier"] = self.tier
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_doc()).encode()

    def owner_of(self, rank: int) -> tuple[int, RankEntry]:
        """The node whose payload holds ``rank``, and its entry there (LookupError if none)."""
        for node, lay in self.layouts.items():
            for entry in lay.ranks:
                if entry.rank == rank:
                    return node, entry
        raise LookupError(rank)

    def with_member(self, node: int, address: tuple[str, str]) -> "StepMeta":
        """The same, with ``node``'s pieces served from ``address`` (a daemon that rebuilt them)."""
        return replace(self, members={**self.members, node: address})

    def with_tier(self, token: str) -> "StepMeta":
        return replace(self, tier=token)


# ----------------------------------------------------------------- reports


@dataclass(frozen=True)
class StripeReport:
    """An encoder's: the stripe is encoded, its parity stored; its pieces and sources' layouts."""

    group: int
    stripe: int
    plen: int
    pieces: Mapping[int, PieceMeta]
    layouts: Mapping[int, NodeLayout]
    #: The job's launch its sources sealed the step in (OfferRequest.epoch).
    epoch: int = 0
    kind: str = field(default="stripe", init=False)


@dataclass(frozen=True)
class ParityReport:
    """A parity holder's: it stored piece ``index`` of the stripe."""

    group: int
    stripe: int
    index: int
    epoch: int = 0  # the launch of the encoding it comes from
    kind: str = field(default="parity", init=False)


@dataclass(frozen=True)
class GroupReport:
    """A group leader's to the root: every stripe and parity piece of its group is stored."""

    group: int
    epoch: int = 0  # the launch of the group's stripes
    kind: str = field(default="group", init=False)


@dataclass(frozen=True)
class FlushedReport:
    """A node's part of a persistent-tier flush: written (``ok``), or why not."""

    token: str
    ok: bool
    why: str = ""
    bytes: int = 0
    kind: str = field(default="flushed", init=False)


Report = Union[StripeReport, ParityReport, GroupReport, FlushedReport]


def encode_report(r: Report) -> bytes:
    if isinstance(r, StripeReport):
        doc: dict[str, Any] = {"group": r.group, "stripe": r.stripe, "plen": r.plen,
                               "pieces": {str(i): p.to_doc() for i, p in r.pieces.items()},
                               "layouts": {str(n): lay.to_doc() for n, lay in r.layouts.items()},
                               "epoch": r.epoch}
    elif isinstance(r, ParityReport):
        doc = {"group": r.group, "stripe": r.stripe, "index": r.index, "epoch": r.epoch}
    elif isinstance(r, GroupReport):
        doc = {"group": r.group, "epoch": r.epoch}
    else:
        doc = {"token": r.token, "ok": r.ok, "why": r.why, "bytes": r.bytes}
    return json.dumps({"kind": r.kind, **doc}).encode()


def decode_report(raw: bytes) -> Report:
    d = _obj(_json(raw, "report"), "report")
    kind = d.get("kind")
    if kind == "stripe":
        layouts = _obj(d.get("layouts"), "layouts")
        if any(not str(n).isdigit() for n in layouts):
            raise InvalidRequestError("layouts are not keyed by node number")
        return StripeReport(_int(d.get("group"), "group"), _int(d.get("stripe"), "stripe"),
                            _int(d.get("plen"), "plen"), _pieces(d.get("pieces")),
                            {int(n): NodeLayout.from_doc(v) for n, v in layouts.items()},
                            _int(d.get("epoch", 0), "epoch"))
    if kind == "parity":
        return ParityReport(_int(d.get("group"), "group"), _int(d.get("stripe"), "stripe"),
                            _int(d.get("index"), "index"), _int(d.get("epoch", 0), "epoch"))
    if kind == "group":
        return GroupReport(_int(d.get("group"), "group"), _int(d.get("epoch", 0), "epoch"))
    if kind == "flushed":
        token = d.get("token")
        if not isinstance(token, str):
            raise InvalidRequestError("a flushed report names its token")
        return FlushedReport(token, d.get("ok") is True, str(d.get("why", ""))[:2000],
                             d.get("bytes") if isinstance(d.get("bytes"), int) else 0)
    raise InvalidRequestError("a report is an object whose kind is stripe, parity, group or "
                              "flushed")
