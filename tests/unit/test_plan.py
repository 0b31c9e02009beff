"""The operators' model (daemon/coding/plan.py) and ``shardguard plan``: small cases worked
by hand, the placement it must agree with, and the directions a choice moves the figures."""

from __future__ import annotations

import json
import math

import pytest

from shardguard.daemon.service import cli
from shardguard.daemon.coding import placement, plan
from shardguard.daemon.errors import ConfigError

KiB, GiB = 1 << 10, 1 << 30
PAGE = placement.PIECE_ALIGN_BYTES


def job(**kw: object) -> plan.Job:
    base = dict(nodes=1000, state_bytes=80 * GiB, mtbf_hours=20_000.0, nic_gbps=100.0,
                interval_s=60.0)
    base.update(kw)
    return plan.Job(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ by hand


def test_four_nodes_parity_one_by_hand() -> None:
    # 12 KiB per node, k = 3: P = 4 KiB (one page).
    o = plan.option(job(nodes=4, state_bytes=12 * KiB, nic_gbps=8e-6), 4, 1)
    assert (o.k, o.groups, o.piece_bytes) == (3, {4: 1}, PAGE)
    assert o.net_bytes_per_snapshot == 3 * PAGE          # (k + m - 1) * P
    assert o.parity_bytes == PAGE and o.parity_memory_bytes == 2 * PAGE
    assert o.arena_bytes == 24 * KiB
    assert o.parity_per_data_byte == pytest.approx(1 / 3)
    assert o.rebuild_fetch_pieces == 4 * 3               # g stripes, k pieces each
    assert o.rebuild_fetch_bytes == 12 * PAGE
    # 8e-6 Gb/s is 1000 bytes/s.
    assert o.rebuild_s == pytest.approx(12 * PAGE / 1000)
    assert o.snapshot_wire_s == pytest.approx(3 * PAGE / 1000)
    assert o.nic_share == pytest.approx(3 * PAGE / 1000 / 60)


def test_parity_two_rounds_pieces_up_to_a_page() -> None:
    # 12 KiB over k = 2 is 6 KiB, padded to 8 KiB.
    o = plan.option(job(nodes=4, state_bytes=12 * KiB), 4, 2)
    assert o.piece_bytes == 2 * PAGE
    assert o.net_bytes_per_snapshot == (2 + 2 - 1) * 2 * PAGE
    assert o.parity_bytes == 2 * 2 * PAGE
    assert o.rebuild_fetch_pieces == 4 * 2


def test_a_pair_with_parity_one_by_hand() -> None:
    # Two nodes, m = 1: lost when one fails within an hour of the other.
    p = 1 - math.exp(-1 / 100)
    assert plan.node_failure_probability(1.0, 100.0) == pytest.approx(p)
    rate = plan.group_loss_rate(2, 1, 1.0, 100.0)
    assert rate == pytest.approx(2 / 100 * p)
    assert plan.loss_probability(rate, 1000.0) == pytest.approx(1 - math.exp(-1000 * rate))
    o = plan.option(job(nodes=2, state_bytes=PAGE, mtbf_hours=100.0, job_days=1000 / 24), 2, 1)
    assert o.window_h == 1.0
    assert o.p_loss_job == pytest.approx(1 - math.exp(-1000 * rate))
    assert o.losses_per_year == pytest.approx(rate * plan.HOURS_PER_YEAR)


def test_binomial_tail_and_failure_probability() -> None:
    assert plan.binomial_tail(3, 0.5, 2) == pytest.approx(0.5)
    assert plan.binomial_tail(4, 0.1, 0) == 1.0
    assert plan.binomial_tail(4, 0.1, 5) == 0.0
    assert plan.binomial_tail(5, 0.2, 1) == pytest.approx(1 - 0.8**5)
    assert plan.node_failure_probability(100.0, 100.0) == pytest.approx(1 - 1 / math.e)
    # No cancellation for tiny probabilities.
    assert plan.binomial_tail(15, 1e-9, 2) == pytest.approx(math.comb(15, 2) * 1e-18, rel=1e-6)


def test_tiled_windows_undercount_by_parity_plus_one() -> None:
    """The back-to-back-windows count misses failures straddling two windows: for small p
    it is (m + 1) times below the failure-while-others-are-down rate."""
    for g, m in ((4, 1), (8, 1), (8, 2), (16, 3)):
        o = plan.option(job(nodes=10 * g, mtbf_hours=1e6, rebuild_hours_floor=0.5), g, m)
        assert o.p_loss_job / o.p_loss_job_tiled == pytest.approx(m + 1, rel=1e-3)


def test_a_rebuild_longer_than_the_floor_is_the_window() -> None:
    slow = plan.option(job(nodes=8, nic_gbps=1.0, rebuild_hours_floor=0.0), 8, 1)
    assert slow.window_h == pytest.approx(slow.rebuild_s / 3600)
    floored = plan.option(job(nodes=8, nic_gbps=1.0, rebuild_hours_floor=5.0), 8, 1)
    assert floored.window_h == 5.0 and floored.p_loss_year > slow.p_loss_year


# ------------------------------------------------------------------ against placement


@pytest.mark.parametrize(("g", "m"), [(2, 1), (4, 1), (4, 2), (5, 3), (8, 2), (16, 1), (16, 4)])
def test_rebuild_fetches_k_pieces_per_stripe_of_the_group(g: int, m: int) -> None:
    assert plan.rebuild_fetch_pieces(g, m) == g * (g - m)


@pytest.mark.parametrize(("g", "m"), [(4, 1), (4, 2), (8, 1), (8, 3), (16, 2)])
def test_network_and_parity_are_the_placements(g: int, m: int) -> None:
    state = 80 * GiB + 12345
    o = plan.option(job(nodes=4 * g, state_bytes=state), g, m)
    layout = placement.plan(4 * g, g, m).groups[0]
    p_bytes = placement.source_piece_bytes(state, g - m)
    load = layout.load(0, p_bytes)
    assert o.piece_bytes == p_bytes
    assert o.net_bytes_per_snapshot == load.sent_bytes == load.received_bytes \
        == (g - 1) * p_bytes
    assert o.parity_bytes == load.parity_bytes == m * p_bytes


def test_the_remainder_group_is_counted() -> None:
    o = plan.option(job(nodes=1000), 16, 1)
    assert o.groups == {16: 61, 24: 1}
    assert o.rebuild_fetch_pieces == 24 * 23             # the largest group rebuilds longest
    # The worst node's: k * P of either group (they differ by the rounding to pages).
    assert o.net_bytes_per_snapshot == max(k * placement.source_piece_bytes(80 * GiB, k)
                                           for k in (15, 23))
    assert o.parity_bytes == placement.source_piece_bytes(80 * GiB, 15)  # the smaller k
    s = plan.option(job(nodes=1000, placement="stride"), 16, 1)
    assert s.groups == {16: 54, 17: 8}


def test_a_group_no_larger_than_its_parity_is_unfit() -> None:
    rows = plan.table(job(nodes=4), (4,), (1, 4))
    assert isinstance(rows[0], plan.Option)
    assert isinstance(rows[1], plan.Unfit) and "parity=4" in rows[1].reason


# ------------------------------------------------------------------ directions


GROUPS = (4, 8, 16, 32)


@pytest.mark.parametrize("nodes", [64, 1000, 10_000])
def test_more_parity_loses_less_and_costs_more_memory(nodes: int) -> None:
    for g in GROUPS:
        rows = [plan.option(job(nodes=nodes), g, m) for m in (1, 2, 3)]
        for lo, hi in zip(rows, rows[1:]):
            assert hi.p_loss_year < lo.p_loss_year
            assert hi.p_loss_job < lo.p_loss_job
            assert hi.parity_memory_bytes > lo.parity_memory_bytes
            assert hi.net_bytes_per_snapshot > lo.net_bytes_per_snapshot


@pytest.mark.parametrize("m", [1, 2])
def test_a_bigger_group_costs_less_memory_per_data_byte(m: int) -> None:
    rows = [plan.option(job(nodes=1024), g, m) for g in GROUPS]
    for small, big in zip(rows, rows[1:]):
        assert big.parity_per_data_byte < small.parity_per_data_byte
        assert big.parity_memory_bytes < small.parity_memory_bytes
        # ... and pays for it in rebuild time and in risk.
        assert big.rebuild_s > small.rebuild_s
        assert big.p_loss_year > small.p_loss_year


def test_a_larger_job_or_a_worse_mtbf_is_riskier() -> None:
    assert plan.option(job(nodes=10_000), 8, 1).p_loss_year \
        > plan.option(job(nodes=1000), 8, 1).p_loss_year
    assert plan.option(job(mtbf_hours=5000), 8, 1).p_loss_year \
        > plan.option(job(), 8, 1).p_loss_year


def test_bad_jobs_are_refused() -> None:
    for bad in (dict(nodes=0), dict(state_bytes=0), dict(mtbf_hours=0.0),
                dict(nic_gbps=-1.0), dict(interval_s=math.inf), dict(rebuild_hours_floor=-1.0)):
        with pytest.raises(ConfigError):
            job(**bad)
    assert plan.int_list("4, 8,16") == (4, 8, 16)
    for bad_list in ("", "4,x", "0,4"):
        with pytest.raises(ValueError):
            plan.int_list(bad_list)


# ------------------------------------------------------------------ the command


ARGS = ["plan", "--nodes", "1000", "--state-per-node", "80GiB", "--mtbf-hours", "20000",
        "--nic-gbps", "100", "--interval-s", "60"]


def test_plan_prints_a_row_per_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(ARGS) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "1000 nodes, 80.0 GiB of state each" in out
    rows = [line.split() for line in out.splitlines()
            if line.split()[:2] in (["4", "1"], ["8", "2"], ["16", "1"])]
    assert len(rows) == 3
    assert rows[0][2] == "250x4" and rows[0][3:5] == ["80.0", "GiB"]  # k*P = the state


def test_plan_json_is_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(ARGS + ["--group-sizes", "8", "--parities", "1,2", "--json"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"]["state_bytes"] == 80 * GiB and doc["job"]["nodes"] == 1000
    got = [(o["group_size"], o["parity"]) for o in doc["options"]]
    assert got == [(8, 1), (8, 2)]
    want = plan.option(job(), 8, 2)
    assert doc["options"][1]["p_loss_year"] == pytest.approx(want.p_loss_year)
    assert doc["options"][1]["rebuild_fetch_bytes"] == want.rebuild_fetch_bytes


def test_plan_refuses_what_no_group_can_hold(capsys: pytest.CaptureFixture[str]) -> None:
    args = ARGS[:2] + ["3"] + ARGS[3:] + ["--group-sizes", "2", "--parities", "3"]
    assert cli.main(args) == cli.EXIT_ERROR
    assert "g=2 m=3" in capsys.readouterr().out
    assert cli.main(ARGS[:4] + ["lots"] + ARGS[5:]) == cli.EXIT_ERROR
    assert "not a size" in capsys.readouterr().err
