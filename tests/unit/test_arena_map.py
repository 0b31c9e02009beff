"""client/arena_map.py: which of the arena's pages a trainer's mapping takes when.

``map_arena`` maps the header's pages and those of the restorable slot at once (not a
slot the daemon named lazy); every other slot is left to :meth:`ArenaMap.populate_slot`
(the copy thread's, before a slot's first copy) or to its first touch. What the tests look at, on a real /dev/shm
file: a hole (a slot the daemon has not allocated yet, as a rebuild leaves the other
slot) stays a hole until the slot is populated or written (tmpfs allocates a page when
a mapping first faults it), and writing a populated slot takes no page faults while
writing one that is not takes about one per page (the thread's minor faults)."""

from __future__ import annotations

import os
import resource
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from shardguard.client.arena_map import map_arena, restorable_slots
from shardguard.proto import arena as fmt
from shardguard.proto.errors import ArenaFormatError

PAGES = 64
SLOT = PAGES * fmt.PAGE


def header_bytes(*states: fmt.SlotState) -> np.ndarray:
    """An arena header whose slots are in ``states`` (slot ``i`` holding step ``i``)."""
    slots = tuple(fmt.SlotDesc(state=s, step=i if s != fmt.SlotState.FREE else -1)
                  for i, s in enumerate(states))
    return np.frombuffer(fmt.pack_header(fmt.Header(SLOT, 0, 1, "j", slots)), dtype=np.uint8)


def make_arena(slots_allocated: int) -> str:
    """A /dev/shm file of a two-slot arena whose header and first ``slots_allocated``
    slots are allocated and the rest a hole; its header says slot 0 holds the
    restorable step."""
    path = f"/dev/shm/sg-test-map-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, fmt.arena_bytes(SLOT, slots_allocated))
        os.ftruncate(fd, fmt.arena_bytes(SLOT))
        os.pwrite(fd, header_bytes(fmt.SlotState.RESTORABLE, fmt.SlotState.FREE).tobytes(), 0)
    finally:
        os.close(fd)
    return path


@pytest.fixture
def arena_file() -> Iterator[str]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    path = make_arena(1)
    yield path
    os.unlink(path)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def faults_writing(m, slot: int) -> int:
    """This thread's minor page faults while one byte of every page of ``slot`` is written."""
    lo = m.slot_base(slot)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    m.arr[lo:lo + SLOT:fmt.PAGE] = 7
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_only_the_restorable_slot_is_faulted_in_by_the_mapping(arena_file: str) -> None:
    before = allocated(arena_file)
    assert fmt.arena_bytes(SLOT, 1) <= before < fmt.arena_bytes(SLOT)
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT)
    assert allocated(arena_file) == before  # the hole is still a hole
    assert m.populated == {0}
    # ...and the mapping works there: written, it is allocated and reads back.
    lo = m.slot_base(1)
    m.arr[lo:lo + SLOT] = 7
    assert allocated(arena_file) >= fmt.arena_bytes(SLOT)
    assert int(m.arr[lo:lo + SLOT].min()) == 7
    m.close()


def test_populate_slot_maps_every_page_writable_once(arena_file: str) -> None:
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT, lazy_slots=[0])  # none at once
    assert m.populated == set()
    m.populate_slot(1)  # the hole: populating it allocates it
    assert allocated(arena_file) >= fmt.arena_bytes(SLOT)
    assert m.populated == {1}
    assert faults_writing(m, 1) < PAGES // 4  # mapped writable: (almost) no faults
    # The control: a slot that is there but not populated faults about once per page.
    assert faults_writing(m, 0) >= PAGES // 2
    m.close()


def test_populated_slots_are_written_without_faults(arena_file: str) -> None:
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT)
    m.populate_slot(1)
    assert m.populated == {0, 1}
    assert faults_writing(m, 0) < PAGES // 4
    assert faults_writing(m, 1) < PAGES // 4
    m.close()


def test_the_restorable_slot_is_the_one_mapped_at_connect(arena_file: str) -> None:
    """``restorable_slots``: the slot whose header says RESTORABLE, unless the daemon
    named it lazy; a sealed older step or a free slot is not."""
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT)
    for states, lazy, want in (
            ((fmt.SlotState.SEALED, fmt.SlotState.RESTORABLE), (), [1]),
            ((fmt.SlotState.RESTORABLE, fmt.SlotState.FREE), (), [0]),
            ((fmt.SlotState.RESTORABLE, fmt.SlotState.FREE), (0,), []),
            ((fmt.SlotState.FREE, fmt.SlotState.FREE), (), [])):
        m.arr[:fmt.HEADER_BYTES] = header_bytes(*states)
        assert restorable_slots(m, lazy) == want, states
    m.close()


def test_the_header_is_read_again_whenever_its_bytes_change(arena_file: str) -> None:
    """A waiting rank reads the header every few ms and parses it only when its bytes
    changed: each write of the daemon's is seen at the next read, and a torn read (bytes
    that fail the header's checksum) is never kept as the header."""
    m = map_arena(arena_file, fmt.arena_bytes(SLOT), SLOT)
    try:
        first = m.header()
        assert m.header() is first  # unchanged bytes: the same parse
        assert m.is_restorable(0) and not m.is_restorable(1)
        m.arr[:fmt.HEADER_BYTES] = header_bytes(fmt.SlotState.SEALED, fmt.SlotState.RESTORABLE)
        assert m.is_restorable(1) and not m.is_restorable(0)
        good = m.header()
        torn = header_bytes(fmt.SlotState.RESTORABLE, fmt.SlotState.RESTORABLE).copy()
        torn[fmt.HEADER_CRC_OFFSET] ^= 1
        m.arr[:fmt.HEADER_BYTES] = torn
        with pytest.raises(ArenaFormatError, match="checksum"):
            m._read_header()
        m.arr[:fmt.HEADER_BYTES] = header_bytes(fmt.SlotState.SEALED, fmt.SlotState.RESTORABLE)
        assert m.header() == good and m.is_restorable(1)
    finally:
        m.close()
