"""coding/dest.py: where a rebuild's bytes land (memory, or a file written with pwrite),
and the CRCs of what was written (WrittenCrcs)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.dest import FileDest, MemoryDest, WrittenCrcs, as_dest
from shardguard.daemon.errors import NoSpaceError

RNG = np.random.default_rng(3)


def data(n: int) -> np.ndarray:
    return RNG.integers(0, 256, n, dtype=np.uint8)


def test_memory_destination_writes_in_place_and_offers_its_memory() -> None:
    arr = np.zeros(100, np.uint8)
    dest = as_dest(arr)
    assert isinstance(dest, MemoryDest) and as_dest(dest) is dest and len(dest) == 100
    part = dest.part(10, 60)
    part.write(5, b"abc")
    assert arr[15:18].tobytes() == b"abc"
    view = part.direct(0, 4)
    view[:] = 7
    assert (arr[10:14] == 7).all()
    with pytest.raises(ValueError, match="outside"):
        part.write(48, b"abc")
    with pytest.raises(ValueError, match="outside"):
        dest.part(90, 101)


def test_file_destination_writes_at_its_base_and_its_parts_at_theirs(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 300)
    fd = os.open(path, os.O_RDWR)
    try:
        dest = FileDest(fd, 100, 150)
    finally:
        os.close(fd)  # the destination holds a descriptor of its own
    with dest:
        assert dest.direct(0, 10) is None and len(dest) == 150
        a, b = data(40), data(30)
        dest.write(0, a)
        part = dest.part(100, 150)
        part.write(10, b)
        part.close()  # a part shares the whole's descriptor: closing it closes nothing
        dest.write(40, b"xy")
        with pytest.raises(ValueError, match="outside"):
            part.write(45, b"123456")
    got = path.read_bytes()
    assert got[100:140] == a.tobytes() and got[140:142] == b"xy"
    assert got[210:240] == b.tobytes()
    assert got[:100] == b"\0" * 100 and got[250:] == b"\0" * 50


def test_no_room_for_a_written_page_is_a_no_space_error() -> None:
    # /dev/full answers every write ENOSPC, as a full tmpfs (or a memory cgroup at its
    # limit) does to a write that needs a new page: an error, never a SIGBUS.
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with FileDest(fd, 0, 4096) as dest, pytest.raises(NoSpaceError, match="no room"):
            dest.write(0, data(4096))
    finally:
        os.close(fd)


def test_written_crcs_combine_what_tiles_a_range_exactly_once() -> None:
    buf = data(1000)
    crcs = WrittenCrcs(marks=(350,))
    # Out of order, one write given its CRC, one across the mark (recorded as two).
    crcs.record(600, memoryview(buf[600:1000]), crc32c(buf[600:1000]))
    crcs.record(0, memoryview(buf[0:200]), None)
    crcs.record(200, memoryview(buf[200:600]), 12345)  # crosses the mark: made again
    assert crcs.crc(0, 1000) == crc32c(buf)
    assert crcs.crc(0, 350) == crc32c(buf[:350])
    assert crcs.crc(350, 1000) == crc32c(buf[350:])
    assert crcs.crc(0, 300) is None  # ends inside a recorded range
    assert crcs.crc(0, 1001) is None  # past what was written


def test_written_crcs_refuse_a_gap_or_ranges_written_again_differently() -> None:
    buf = data(100)
    gap = WrittenCrcs()
    gap.record(0, memoryview(buf[:40]), None)
    gap.record(50, memoryview(buf[50:]), None)
    assert gap.crc(0, 100) is None
    # A range written again the same way replaces its record (a stripe decoded again).
    again = WrittenCrcs()
    again.record(0, memoryview(buf[:50].copy() ^ 1), None)
    again.record(0, memoryview(buf[:50]), None)
    again.record(50, memoryview(buf[50:]), None)
    assert again.crc(0, 100) == crc32c(buf)
    # Written again cut differently: the old record overlaps the new ones.
    cut = WrittenCrcs()
    cut.record(0, memoryview(buf[:50]), None)
    cut.record(50, memoryview(buf[50:]), None)
    cut.record(0, memoryview(buf[:30]), None)
    cut.record(30, memoryview(buf[30:]), None)
    assert cut.crc(0, 100) is None


def test_a_file_destination_records_each_write_in_file_offsets(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 64)
    crcs = WrittenCrcs()
    a = data(20)
    fd = os.open(path, os.O_RDWR)
    try:
        with FileDest(fd, 8, 40, crcs) as dest:
            dest.part(10, 40).write(0, a[10:])
            dest.write(0, a[:10], crc32c(a[:10]))
    finally:
        os.close(fd)
    assert crcs.crc(8, 28) == crc32c(a) == crc32c(path.read_bytes()[8:28])
