"""Where every piece of a step lives: the placement maths of DESIGN.md §3.

Pure functions and frozen dataclasses, no I/O. Nodes are numbered by their
position in the job's node list (``0..N-1``); inside a group a node is known
by its *position* ``0..g-1``. The job's nodes are split into groups of
``group_size``; each group of ``g`` nodes runs ``g`` stripes of a ``k + m``
code (``k = g - m``) with rotated placement:

- stripe ``s`` has parity holders ``(s + j) mod g`` for ``j = 0..m-1``;
  holder ``s`` (``j = 0``) is its encoder;
- its data piece ``q`` is piece ``q`` of the payload of node
  ``(s + m + q) mod g``.

So every node holds exactly one piece of every stripe of its group (the
piece at offset ``(pos - s) mod g``: parity ``j`` below ``m``, data
``q = offset - m`` above), leads one stripe, stores ``m`` parity pieces and
contributes one data piece to ``k`` stripes. Losing ``x`` nodes of a group
loses ``x`` pieces of each of its stripes: all recoverable iff ``x <= m``.

Piece indices within a stripe follow the codec: ``0..k-1`` data,
``k..k+m-1`` parity.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cached_property

from shardguard.daemon.errors import ConfigError, InsufficientPiecesError, InvalidRequestError
from shardguard.proto.meta import Code, Topology

logger = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 4
DEFAULT_PARITY = 1

#: Payloads are padded so each piece is a whole number of pages: the arena's
#: pieces stay page aligned and ISA-L runs on full vectors.
PIECE_ALIGN_BYTES = 4096

#: ``contiguous``: consecutive nodes form a group, the remainder joins the
#: last group. ``stride``: node ``i`` joins group ``i mod ngroups``, so when
#: the node list is ordered by failure domain (rack, switch, PDU) each group
#: spans as many domains as possible and a lost domain costs every group
#: only a few nodes.
PLACEMENTS = ("contiguous", "stride")

#: A Cauchy code over GF(2^8) has at most 255 pieces per stripe.
MAX_GROUP_SIZE = 255


def split_groups(num_nodes: int, group_size: int, placement: str = "contiguous") -> list[tuple[int, ...]]:
    """Split nodes ``0..num_nodes-1`` into ``max(1, num_nodes // group_size)`` groups.

    With ``contiguous`` the remainder of the division joins the last group;
    with ``stride`` the groups are dealt round-robin, so the remainder lands
    one node each on the first groups.

    Raises:
        ConfigError: a non-positive count or size, or an unknown placement.
    """
    if num_nodes < 1:
        raise ConfigError(f"a job needs at least one node, got {num_nodes}")
    if group_size < 1:
        raise ConfigError(f"group_size must be >= 1, got {group_size}")
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    ngroups = max(1, num_nodes // group_size)
    if placement == "stride":
        return [tuple(range(first, num_nodes, ngroups)) for first in range(ngroups)]
    groups = [tuple(range(i * group_size, (i + 1) * group_size)) for i in range(ngroups - 1)]
    groups.append(tuple(range((ngroups - 1) * group_size, num_nodes)))
    return groups


def source_piece_bytes(payload_bytes: int, k: int) -> int:
    """Bytes per piece of one source node: its payload over ``k``, rounded up to a page.

    Each node cuts its own payload into ``k`` pieces (not the group's largest: a node
    does not wait for the others' sizes); an encoder takes the largest of its
    stripe's sources (:func:`stripe_piece_bytes`) and the shorter pieces count as
    zero-padded to it.
    """
    if k < 1:
        raise InvalidRequestError(f"k must be >= 1, got {k}")
    if payload_bytes < 0:
        raise InvalidRequestError(f"payload size must be >= 0, got {payload_bytes}")
    per = -(-payload_bytes // k)
    return -(-per // PIECE_ALIGN_BYTES) * PIECE_ALIGN_BYTES


def stripe_piece_bytes(source_pieces: Iterable[int]) -> int:
    """A stripe's piece size ``P``: the largest of its sources' pieces (parity is this long)."""
    return max(source_pieces, default=0)


def piece_size(payload_bytes: Iterable[int], k: int) -> int:
    """The piece size ``P`` of a stripe whose sources' payloads are ``payload_bytes``."""
    return stripe_piece_bytes(source_piece_bytes(b, k) for b in payload_bytes)


def piece_span(payload_bytes: int, piece: int, piece_bytes: int) -> tuple[int, int]:
    """``(offset, length)`` of the payload bytes that data piece ``piece`` carries.

    Bytes of the piece past ``length`` are zero padding (the payload is
    padded to ``k * piece_bytes``).
    """
    offset = piece * piece_bytes
    return offset, max(0, min(piece_bytes, payload_bytes - offset))


@dataclass(frozen=True)
class PieceRef:
    """One piece of one stripe of a group."""

    stripe: int
    index: int


@dataclass(frozen=True)
class Transfer:
    """One piece sent from one position of a group to another."""

    stripe: int
    index: int
    src: int
    dst: int


@dataclass(frozen=True)
class NodeLoad:
    """Bytes one node moves and keeps for one step, for a piece size ``P``."""

    sent_bytes: int
    received_bytes: int
    parity_bytes: int


@dataclass(frozen=True)
class GroupLayout:
    """Rotated placement within one group.

    Args:
        group: the group's number in the job.
        nodes: job node numbers by position in the group.
        m: parity pieces per stripe (nodes the group may lose).
    """

    group: int
    nodes: tuple[int, ...]
    m: int

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ConfigError(f"parity must be >= 1, got {self.m}")
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"group {self.group} lists a node twice: {self.nodes}")
        if not self.m < len(self.nodes) <= MAX_GROUP_SIZE:
            raise ConfigError(
                f"group {self.group} has {len(self.nodes)} nodes; parity={self.m} needs "
                f"between {self.m + 1} and {MAX_GROUP_SIZE}"
            )

    @property
    def g(self) -> int:
        return len(self.nodes)

    @property
    def k(self) -> int:
        return self.g - self.m

    @cached_property
    def _position_of(self) -> dict[int, int]:
        return {node: pos for pos, node in enumerate(self.nodes)}

    def position(self, node: int) -> int:
        """Position in this group of job node ``node``."""
        try:
            return self._position_of[node]
        except KeyError:
            raise InvalidRequestError(f"node {node} is not in group {self.group} {self.nodes}") from None

    def _check(self, stripe: int | None = None, pos: int | None = None, index: int | None = None) -> None:
        for name, value, bound in (("stripe", stripe, self.g), ("position", pos, self.g), ("piece", index, self.g)):
            if value is not None and not 0 <= value < bound:
                raise InvalidRequestError(f"{name} {value} is outside 0..{bound - 1} of group {self.group}")

    # -- one stripe --------------------------------------------------------

    def encoder(self, stripe: int) -> int:
        """Position that encodes ``stripe`` (its first parity holder)."""
        self._check(stripe=stripe)
        return stripe

    def parity_holders(self, stripe: int) -> tuple[int, ...]:
        """Positions holding parity ``j = 0..m-1`` of ``stripe``."""
        self._check(stripe=stripe)
        return tuple((stripe + j) % self.g for j in range(self.m))

    def data_sources(self, stripe: int) -> tuple[int, ...]:
        """Positions whose payload piece ``q`` is data piece ``q`` of ``stripe``, for ``q = 0..k-1``."""
        self._check(stripe=stripe)
        return tuple((stripe + self.m + q) % self.g for q in range(self.k))

    def holder(self, stripe: int, index: int) -> int:
        """Position holding piece ``index`` of ``stripe``."""
        self._check(stripe=stripe, index=index)
        offset = index - self.k if index >= self.k else index + self.m
        return (stripe + offset) % self.g

    def piece_at(self, stripe: int, pos: int) -> int:
        """Index of the one piece of ``stripe`` held by position ``pos``."""
        self._check(stripe=stripe, pos=pos)
        offset = (pos - stripe) % self.g
        return self.k + offset if offset < self.m else offset - self.m

    # -- one node ----------------------------------------------------------

    def data_pieces(self, pos: int) -> tuple[PieceRef, ...]:
        """Where position ``pos``'s payload pieces go: its piece ``q`` is ``PieceRef(stripe, q)``."""
        self._check(pos=pos)
        return tuple(PieceRef((pos - self.m - q) % self.g, q) for q in range(self.k))

    def parity_pieces(self, pos: int) -> tuple[PieceRef, ...]:
        """The ``m`` parity pieces position ``pos`` stores."""
        self._check(pos=pos)
        return tuple(PieceRef((pos - j) % self.g, self.k + j) for j in range(self.m))

    def sends(self, pos: int) -> tuple[Transfer, ...]:
        """Pieces ``pos`` sends for one step: its ``k`` data pieces to their
        encoders, then, as encoder of stripe ``pos``, parity ``1..m-1`` to
        the other holders."""
        data = tuple(Transfer(r.stripe, r.index, pos, self.encoder(r.stripe)) for r in self.data_pieces(pos))
        parity = tuple(Transfer(pos, self.k + j, pos, (pos + j) % self.g) for j in range(1, self.m))
        return data + parity

    def receives(self, pos: int) -> tuple[Transfer, ...]:
        """Pieces ``pos`` receives for one step (the mirror of :meth:`sends`)."""
        self._check(pos=pos)
        return tuple(t for src in range(self.g) for t in self.sends(src) if t.dst == pos)

    def load(self, pos: int, piece_bytes: int) -> NodeLoad:
        """Bytes ``pos`` sends, receives and stores as parity per step.

        ``(k + m - 1) * P`` each way, ``m * P`` stored.
        """
        return NodeLoad(
            sent_bytes=len(self.sends(pos)) * piece_bytes,
            received_bytes=len(self.receives(pos)) * piece_bytes,
            parity_bytes=len(self.parity_pieces(pos)) * piece_bytes,
        )

    # -- losses ------------------------------------------------------------

    def lost_pieces(self, lost: Collection[int]) -> dict[int, tuple[int, ...]]:
        """For each stripe, the indices of its pieces held by the ``lost`` positions."""
        for pos in lost:
            self._check(pos=pos)
        return {s: tuple(sorted(self.piece_at(s, pos) for pos in set(lost))) for s in range(self.g)}

    def recoverable(self, lost: Collection[int]) -> dict[int, bool]:
        """For each stripe, whether it survives losing the ``lost`` positions (at most ``m`` pieces lost)."""
        return {s: len(idx) <= self.m for s, idx in self.lost_pieces(lost).items()}

    def rebuild_sources(self, stripe: int, lost: Collection[int]) -> tuple[int, ...]:
        """``k`` surviving piece indices of ``stripe`` to fetch to rebuild it.

        Data pieces come first (lowest indices), which the codec prefers.

        Raises:
            InsufficientPiecesError: more than ``m`` of the stripe's pieces are lost.
        """
        gone = set(self.lost_pieces(lost)[stripe])
        alive = [i for i in range(self.g) if i not in gone]
        if len(alive) < self.k:
            raise InsufficientPiecesError(
                f"group {self.group} stripe {stripe}: {len(gone)} pieces lost with the nodes "
                f"{sorted(self.nodes[p] for p in lost)}, parity covers {self.m}"
            )
        return tuple(alive[: self.k])


@dataclass(frozen=True)
class GroupLoss:
    """What losing some nodes costs one group."""

    group: int
    lost_nodes: tuple[int, ...]
    m: int

    @property
    def recoverable(self) -> bool:
        return len(self.lost_nodes) <= self.m


@dataclass(frozen=True)
class Placement:
    """The groups of a whole job.

    Build with :func:`plan`.
    """

    groups: tuple[GroupLayout, ...]

    @cached_property
    def _group_of(self) -> dict[int, GroupLayout]:
        return {node: grp for grp in self.groups for node in grp.nodes}

    @property
    def num_nodes(self) -> int:
        return len(self._group_of)

    def group_of(self, node: int) -> GroupLayout:
        try:
            return self._group_of[node]
        except KeyError:
            raise InvalidRequestError(f"node {node} is not in the job (0..{self.num_nodes - 1})") from None

    def losses(self, lost_nodes: Iterable[int]) -> list[GroupLoss]:
        """The groups that lose any of ``lost_nodes``, in group order."""
        by_group: dict[int, list[int]] = {}
        for node in set(lost_nodes):
            by_group.setdefault(self.group_of(node).group, []).append(node)
        return [
            GroupLoss(grp.group, tuple(sorted(by_group[grp.group])), grp.m)
            for grp in self.groups
            if grp.group in by_group
        ]

    def check_recoverable(self, lost_nodes: Iterable[int]) -> None:
        """Raise unless every group lost at most ``m`` nodes.

        Raises:
            InsufficientPiecesError: naming each unrecoverable group and its missing nodes.
        """
        bad = [loss for loss in self.losses(lost_nodes) if not loss.recoverable]
        if bad:
            raise InsufficientPiecesError(
                "; ".join(
                    f"group {b.group} lost nodes {list(b.lost_nodes)} but tolerates {b.m}" for b in bad
                )
            )


def plan(
    num_nodes: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    parity: int = DEFAULT_PARITY,
    placement: str = "contiguous",
) -> Placement:
    """The job's groups for ``num_nodes`` nodes.

    Raises:
        ConfigError: a group would have no more nodes than ``parity`` (then
            nothing is left to carry data), or the options are invalid.
    """
    groups = tuple(
        GroupLayout(group=i, nodes=nodes, m=parity)
        for i, nodes in enumerate(split_groups(num_nodes, group_size, placement))
    )
    logger.debug(
        "placement %s: %d nodes in %d groups of sizes %s, parity %d",
        placement, num_nodes, len(groups), [g.g for g in groups], parity,
    )
    return Placement(groups)


@functools.lru_cache(maxsize=256)
def _planned(code: Code) -> Placement:
    return plan(code.nodes, code.group_size, code.parity, code.placement)


def placement_of(of: Topology | Code) -> Placement:
    """The placement of a job (its topology or its code), built once per code."""
    return _planned(of.code if isinstance(of, Topology) else of)


def leader_of(grp: GroupLayout) -> int:
    """The group's leader: its first node. It collects the group's reports, tells the
    root when the group stored a step, and announces the step to the group."""
    return grp.nodes[0]


def peers_of(topology: Topology | None) -> list[tuple[str, str]]:
    """(control, data) addresses of the nodes this node exchanges a job's pieces with.

    Those are the other nodes of its group (sources, encoders, parity holders, its
    leader) and, for a group's leader, the root (node 0); not the whole job, so that a
    probe costs each node a group's worth of calls however large the job.
    """
    if topology is None:
        return []
    grp = placement_of(topology).group_of(topology.node_index)
    nodes = set(grp.nodes) | ({0} if leader_of(grp) == topology.node_index else set())
    nodes.discard(topology.node_index)
    return sorted({topology.nodes[i] for i in nodes})
