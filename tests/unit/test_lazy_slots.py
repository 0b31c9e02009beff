"""client/arena_map.py ``map_arena(lazy_slots=...)``: a slot the daemon is still faulting
in (a just rebuilt arena's other slot) is mapped without being faulted in, everything
else is faulted in as before. On tmpfs a page first faulted by a mapping is allocated
then, so a slot left a hole shows it: faulting it in would allocate it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from shardguard.client.arena_map import map_arena
from shardguard.proto import arena as fmt

SLOT = 64 * fmt.PAGE


@pytest.fixture
def arena_file() -> Iterator[str]:
    """A /dev/shm file of a two-slot arena whose header and first slot are allocated and
    whose second slot is a hole (as a rebuild leaves it)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    path = f"/dev/shm/sg-test-lazy-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, fmt.arena_bytes(SLOT, 1))
        os.ftruncate(fd, fmt.arena_bytes(SLOT))
    finally:
        os.close(fd)
    yield path
    os.unlink(path)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_a_lazy_slot_is_not_faulted_in_by_the_mapping(arena_file: str) -> None:
    before = allocated(arena_file)
    assert fmt.arena_bytes(SLOT, 1) <= before < fmt.arena_bytes(SLOT)
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT, lazy_slots=[1])
    assert allocated(arena_file) == before  # the hole is still a hole
    # ...and the mapping works there: written, it is allocated and reads back.
    lo = m.slot_base(1)
    m.arr[lo:lo + SLOT] = 7
    assert allocated(arena_file) >= fmt.arena_bytes(SLOT)
    assert int(m.arr[lo:lo + SLOT].min()) == 7
    m.close()


def test_without_lazy_slots_every_page_is_faulted_in(arena_file: str) -> None:
    # The control: MAP_POPULATE faults the hole in (and allocates it): what the lazy
    # mapping spares the trainer.
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT)
    assert allocated(arena_file) >= fmt.arena_bytes(SLOT)
    m.close()
