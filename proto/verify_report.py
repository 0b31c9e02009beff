"""What ``verify`` reports of a step: each node's answer (its ranks' slots and the pieces it
holds, checked against their CRC32Cs) and, across the job, how many pieces of each stripe
are sound. A node's answer crosses the peer wire as JSON (peer ``Verify``), parsed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shardguard.proto.errors import InvalidRequestError
from shardguard.proto.meta import json_object


@dataclass(frozen=True)
class RankCheck:
    rank: int
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class PieceCheck:
    group: int
    stripe: int
    index: int
    node: int  # the node of the step's topology whose piece it is
    parity: bool
    ok: bool
    error: str = ""


@dataclass
class NodeCheck:
    """One node's part of ``verify``: its ranks' slots and the pieces it holds."""

    node: int
    step: int
    superseded: bool = False
    ranks: list[RankCheck] = field(default_factory=list)
    pieces: list[PieceCheck] = field(default_factory=list)
    bytes: int = 0

    def to_doc(self) -> dict[str, Any]:
        return {"node": self.node, "step": self.step, "superseded": self.superseded,
                "ranks": [vars(r) for r in self.ranks], "pieces": [vars(p) for p in self.pieces],
                "bytes": self.bytes}

    def encode(self) -> bytes:
        return json.dumps(self.to_doc()).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "NodeCheck":
        d = json_object(raw, "verify report")
        try:
            return cls(int(d["node"]), int(d["step"]), bool(d["superseded"]),
                       [RankCheck(int(r["rank"]), bool(r["ok"]), str(r["error"]))
                        for r in d["ranks"]],
                       [PieceCheck(int(c["group"]), int(c["stripe"]), int(c["index"]),
                                   int(c["node"]), bool(c["parity"]), bool(c["ok"]),
                                   str(c["error"])) for c in d["pieces"]],
                       int(d["bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"verify report is malformed: {exc}") from None


@dataclass(frozen=True)
class StripeCheck:
    group: int
    stripe: int
    k: int
    total: int
    good: int  # pieces sound on the nodes that answered


@dataclass
class JobCheck:
    """``verify`` of a step across the job: every node's answer, every stripe's count."""

    job: str
    step: int
    superseded: bool = False
    nodes: list[NodeCheck] = field(default_factory=list)
    unreachable: list[tuple[int, str]] = field(default_factory=list)  # (node, why)
    stripes: list[StripeCheck] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    def to_doc(self) -> dict[str, Any]:
        return {"job": self.job, "step": self.step, "superseded": self.superseded,
                "nodes": [n.to_doc() for n in self.nodes],
                "unreachable": [{"node": n, "error": e} for n, e in self.unreachable],
                "stripes": [vars(s) for s in self.stripes], "bytes": self.bytes}
