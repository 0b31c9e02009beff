"""storage/arena.py ``prefault``: a slot is faulted in a step at a time, so the memory-map
lock is let go between steps (a rebuild's fetches map frame memory meanwhile), and
every page of the slot, only of the slot, is faulted in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardguard.daemon.storage import arena as arena_mod
from shardguard.proto import arena as fmt
from shardguard.proto.arena import Header, SlotDesc


def test_a_slot_is_faulted_in_by_steps_that_tile_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arena_mod, "PREFAULT_STEP_BYTES", 64 << 10)
    slot_bytes = 300 * fmt.PAGE  # not a whole number of steps
    header = Header(slot_bytes=slot_bytes, rank=0, world_size=1, job="j",
                    slots=(SlotDesc(), SlotDesc()))
    a = arena_mod.Arena.create(str(tmp_path / "a"), header)
    calls: list[tuple[int, int]] = []
    real = arena_mod.hostmem.populate
    monkeypatch.setattr(arena_mod.hostmem, "populate",
                        lambda addr, n: calls.append((addr, n)) or real(addr, n))
    a.prefault(1, slot_bytes)
    assert len(calls) == -(-slot_bytes // (64 << 10)) > 1
    assert all(n <= 64 << 10 for _, n in calls)
    first = np.frombuffer(a.slot(1, slot_bytes), dtype=np.uint8).ctypes.data
    pos = first
    for addr, n in calls:
        assert addr == pos
        pos += n
    assert pos - first == slot_bytes
    a.close()
