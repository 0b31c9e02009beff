"""Placement maths of DESIGN.md §3: groups, piece size, rotated stripes, losses."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardguard.daemon.errors import ConfigError, InsufficientPiecesError, InvalidRequestError
from shardguard.daemon.coding.placement import (
    GroupLayout,
    NodeLoad,
    PieceRef,
    piece_size,
    piece_span,
    plan,
    split_groups,
)


def test_contiguous_groups_and_remainder_joins_last() -> None:
    assert split_groups(8, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert split_groups(10, 4) == [(0, 1, 2, 3), (4, 5, 6, 7, 8, 9)]
    assert split_groups(3, 4) == [(0, 1, 2)]


def test_stride_groups_deal_nodes_round_robin() -> None:
    assert split_groups(8, 4, "stride") == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert split_groups(10, 4, "stride") == [(0, 2, 4, 6, 8), (1, 3, 5, 7, 9)]
    # Racks of 4 consecutive nodes: each group keeps at most one node per rack.
    groups = split_groups(16, 4, "stride")
    assert all(len({node // 4 for node in grp}) == 4 for grp in groups)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), size=st.integers(1, 20), placement=st.sampled_from(["contiguous", "stride"]))
def test_groups_partition_the_nodes(n: int, size: int, placement: str) -> None:
    groups = split_groups(n, size, placement)
    assert sorted(itertools.chain(*groups)) == list(range(n))
    assert len(groups) == max(1, n // size)
    assert all(len(g) >= min(n, size) for g in groups)


def test_bad_group_options() -> None:
    with pytest.raises(ConfigError, match="placement"):
        split_groups(4, 4, "random")
    with pytest.raises(ConfigError, match="group_size"):
        split_groups(4, 0)
    with pytest.raises(ConfigError, match="at least one node"):
        split_groups(0, 4)
    with pytest.raises(ConfigError, match="parity=2 needs"):
        plan(2, group_size=4, parity=2)
    with pytest.raises(ConfigError, match="parity must be"):
        plan(4, parity=0)


def test_piece_size_pads_to_k_pages() -> None:
    assert piece_size([0, 0], 3) == 0
    assert piece_size([1], 3) == 4096
    assert piece_size([10, 3 * 4096, 5], 3) == 4096
    assert piece_size([3 * 4096 + 1, 7], 3) == 2 * 4096
    assert piece_size([100 << 20], 4) == 25 << 20
    assert piece_span(10_000, 0, 4096) == (0, 4096)
    assert piece_span(10_000, 2, 4096) == (8192, 10_000 - 8192)
    assert piece_span(10_000, 3, 4096) == (12288, 0)


def test_design_example_g4_m1() -> None:
    grp = GroupLayout(group=0, nodes=(10, 11, 12, 13), m=1)
    assert grp.k == 3
    # Stripe 0: parity on 0 (its encoder); data D1[0], D2[1], D3[2].
    assert grp.parity_holders(0) == (0,)
    assert grp.encoder(0) == 0
    assert grp.data_sources(0) == (1, 2, 3)
    assert grp.data_sources(2) == (3, 0, 1)
    assert grp.data_pieces(1) == (PieceRef(0, 0), PieceRef(3, 1), PieceRef(2, 2))
    assert grp.parity_pieces(1) == (PieceRef(1, 3),)
    assert grp.position(12) == 2
    with pytest.raises(InvalidRequestError, match="not in group"):
        grp.position(5)
    with pytest.raises(InvalidRequestError, match="stripe 4"):
        grp.parity_holders(4)


@pytest.mark.parametrize("g,m", [(2, 1), (4, 1), (4, 2), (6, 2), (14, 4)])
def test_rotation_invariants(g: int, m: int) -> None:
    grp = GroupLayout(group=0, nodes=tuple(range(g)), m=m)
    k = grp.k
    for s in range(g):
        holders = {grp.holder(s, i): i for i in range(g)}
        # The g pieces of a stripe sit on g distinct nodes, and agree with the
        # piece each node thinks it holds.
        assert sorted(holders) == list(range(g))
        assert all(grp.piece_at(s, pos) == i for pos, i in holders.items())
        assert grp.parity_holders(s) == tuple(grp.holder(s, k + j) for j in range(m))
        assert grp.data_sources(s) == tuple(grp.holder(s, q) for q in range(k))
    for pos in range(g):
        # Each node leads one stripe, contributes its k pieces to k stripes,
        # stores m parity pieces.
        assert sorted(r.index for r in grp.data_pieces(pos)) == list(range(k))
        assert len({r.stripe for r in grp.data_pieces(pos)}) == k
        assert all(grp.holder(r.stripe, r.index) == pos for r in grp.data_pieces(pos) + grp.parity_pieces(pos))
        assert sum(grp.encoder(s) == pos for s in range(g)) == 1
        P = 4096
        assert grp.load(pos, P) == NodeLoad(
            sent_bytes=k * P + (m - 1) * P, received_bytes=k * P + (m - 1) * P, parity_bytes=m * P
        )
    sends = [t for pos in range(g) for t in grp.sends(pos)]
    assert all(t.src != t.dst for t in sends)
    # Every stripe's encoder receives all k data pieces and forwards m-1 parity.
    per_stripe = Counter((t.stripe, t.index) for t in sends)
    assert set(per_stripe.values()) == {1}
    assert len(per_stripe) == g * (k + m - 1)


@pytest.mark.parametrize("g,m", [(4, 1), (4, 2), (6, 2), (14, 4)])
def test_losses_and_rebuild_sources(g: int, m: int) -> None:
    grp = GroupLayout(group=3, nodes=tuple(range(100, 100 + g)), m=m)
    for count in range(1, m + 2):
        for lost in itertools.combinations(range(g), count):
            pieces = grp.lost_pieces(lost)
            assert all(len(idx) == count for idx in pieces.values())
            assert all(grp.holder(s, i) in lost for s, idx in pieces.items() for i in idx)
            assert set(grp.recoverable(lost).values()) == {count <= m}
            if count <= m:
                for s in range(g):
                    srcs = grp.rebuild_sources(s, lost)
                    assert len(srcs) == grp.k
                    assert not {grp.holder(s, i) for i in srcs} & set(lost)
            else:
                with pytest.raises(InsufficientPiecesError, match="group 3 stripe 0"):
                    grp.rebuild_sources(0, lost)


def test_job_level_losses_name_group_and_nodes() -> None:
    job = plan(10, group_size=4, parity=1)
    assert [g.nodes for g in job.groups] == [(0, 1, 2, 3), (4, 5, 6, 7, 8, 9)]
    assert job.num_nodes == 10
    assert job.group_of(8).group == 1
    job.check_recoverable([1, 5])
    losses = job.losses([1, 5, 9])
    assert [(x.group, x.lost_nodes, x.recoverable) for x in losses] == [(0, (1,), True), (1, (5, 9), False)]
    with pytest.raises(InsufficientPiecesError, match=r"group 1 lost nodes \[5, 9\] but tolerates 1"):
        job.check_recoverable([1, 5, 9])
    with pytest.raises(InvalidRequestError, match="not in the job"):
        job.group_of(10)
    strided = plan(8, group_size=4, parity=2, placement="stride")
    assert [g.nodes for g in strided.groups] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    strided.check_recoverable([0, 1, 2, 3])
