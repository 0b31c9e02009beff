"""What a trainer's ``sg.connect`` maps of its arena, against a real daemon: the slot its
restore reads next at once, the next snapshot's slot when that snapshot copies into it
(client/arena_map.py). A restarting rank has only the restorable slot to map before it
can resume; the state still restores bit-exact and the snapshots after it seal."""

from __future__ import annotations

import threading

import pytest
import torch

import shardguard.client as sg
from shardguard.proto import arena as fmt
from test_node_api import assert_equal


def state_of(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1 << 20, generator=g), "b": torch.randn(7, generator=g)}


def restorable_slot(c: sg.Client) -> int:
    m = c._map
    assert m is not None
    return next(i for i, d in enumerate(m.header().slots) if d.state == fmt.SlotState.RESTORABLE)


def test_a_reconnecting_rank_maps_the_restorable_slot_then_the_next_snapshots(daemon) -> None:
    with sg.connect(daemon.socket, "connect-map") as c:
        c.snapshot(0, state_of(0))
        c.wait(restorable=True)
        first = restorable_slot(c)
        assert c._map is not None and first in c._map.populated  # its copy populated it
    with sg.connect(daemon.socket, "connect-map") as c:
        assert c._map is not None
        assert c._map.populated == {first}  # not the other slot, yet
        step, got = c.restore()
        assert step == 0
        assert_equal(state_of(0), got)
        c.snapshot(1, state_of(1))
        c.wait(restorable=True)
        assert restorable_slot(c) != first
        assert c._map.populated == {0, 1}  # the copy of step 1 populated its slot
        assert_equal(state_of(1), c.restore()[1])
        c.snapshot(2, state_of(2))
        c.wait(restorable=True)
        assert_equal(state_of(2), c.restore()[1])


@pytest.mark.parametrize("leaves", ["small", "large"])
def test_where_a_first_snapshot_populates_its_slot(daemon, leaves: str) -> None:
    """Leaves copied inside ``snapshot()`` (each at most 256 KiB) that fill more than a
    fifth of the slot: the slot is populated in the call, before them; a large leaf is
    copied on the copy thread, which populates the slot first. The copy thread is held
    back meanwhile, so the call's part is seen alone. Both restore exactly."""
    state = ({f"t{i}": torch.full((1 << 14,), float(i)) for i in range(40)}  # 40 x 64 KiB
             if leaves == "small" else {"big": torch.randn(1 << 20)})  # 4 MiB
    with sg.connect(daemon.socket, f"connect-map-{leaves}") as c:
        hold = threading.Event()
        c._copier._queue.put(hold.wait)  # the copy thread waits for us
        h = c.snapshot(0, state)
        assert c._map is not None
        assert len(c._map.populated) == (1 if leaves == "small" else 0)
        hold.set()
        h.wait()
        assert len(c._map.populated) == 1
        c.wait(restorable=True)
        assert_equal(state, c.restore()[1])
