"""The shm arena format: header pack/unpack, every way a header is refused, the offset maths."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardguard.proto import arena as fmt
from shardguard.proto.arena import ChecksumAlgo, Header, SlotDesc, SlotState
from shardguard.proto.errors import ArenaFormatError
from shardguard.proto.meta import slot_from_doc

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)

slot_descs = st.builds(
    SlotDesc,
    state=st.sampled_from(SlotState),
    step=st.integers(-(2**63), 2**63 - 1),
    data_bytes=U64,
    manifest_offset=U64,
    manifest_bytes=U64,
    data_crc=U32,
    manifest_crc=U32,
    generation=U64,
)

headers = st.builds(
    Header,
    slot_bytes=st.integers(0, 2**40).map(lambda n: n * fmt.PAGE),
    rank=U32,
    world_size=U32,
    # Job names as the store allows them, up to the full width of the field.
    job=st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z"),
    slots=st.tuples(*[slot_descs] * fmt.NSLOTS),
)


def sample_header(**changes: object) -> Header:
    fields = dict(slot_bytes=8 * fmt.PAGE, rank=3, world_size=8, job="job-1",
                  slots=(SlotDesc(SlotState.RESTORABLE, 7, 100, 4096, 50,
                                  0xDEADBEEF, 0xFEEDFACE, 2), SlotDesc()))
    fields.update(changes)
    return Header(**fields)  # type: ignore[arg-type]


def with_crc(buf: bytearray) -> bytes:
    """``buf`` with its header checksum recomputed, as a writer of a bad field would leave it."""
    struct.pack_into("<I", buf, fmt.HEADER_CRC_OFFSET, zlib.crc32(buf[:fmt.HEADER_CRC_OFFSET]))
    return bytes(buf)


# --------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(headers)
def test_pack_unpack_round_trip(h: Header) -> None:
    raw = fmt.pack_header(h)
    assert len(raw) == fmt.HEADER_BYTES
    assert fmt.unpack_header(raw) == h


def test_unpack_reads_the_head_of_any_buffer_type() -> None:
    h = sample_header()
    arena = bytearray(fmt.arena_bytes(h.slot_bytes))
    arena[:fmt.HEADER_BYTES] = fmt.pack_header(h)
    # The daemon hands a memoryview of the mapping, the client a numpy view of it.
    assert fmt.unpack_header(memoryview(arena)) == h
    assert fmt.unpack_header(np.frombuffer(arena, dtype=np.uint8)) == h
    assert fmt.unpack_header(bytes(arena)) == h


def test_job_uses_the_whole_field_and_no_more() -> None:
    full = "é" * (fmt.JOB_FIELD_BYTES // 2)  # 64 bytes of UTF-8, no NUL left
    assert fmt.unpack_header(fmt.pack_header(sample_header(job=full))).job == full
    with pytest.raises(ValueError, match="job name longer"):
        fmt.pack_header(sample_header(job="x" * (fmt.JOB_FIELD_BYTES + 1)))


def test_layout_offsets_are_as_documented() -> None:
    raw = fmt.pack_header(sample_header())
    assert raw[:8] == fmt.MAGIC
    assert struct.unpack_from("<IIQQII", raw, 8) == (fmt.VERSION, fmt.NSLOTS, fmt.HEADER_BYTES,
                                                    8 * fmt.PAGE, 3, 8)
    assert raw[40:40 + 5] == b"job-1" and raw[45:128].strip(b"\x00") == b""
    state, algo, step = struct.unpack_from("<IIq", raw, fmt.SLOT_DESC_OFFSET)
    assert (state, algo, step) == (SlotState.RESTORABLE, ChecksumAlgo.CRC32C, 7)
    (crc,) = struct.unpack_from("<I", raw, fmt.HEADER_CRC_OFFSET)
    assert crc == zlib.crc32(raw[:fmt.HEADER_CRC_OFFSET])


# --------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------


def test_bad_magic() -> None:
    buf = bytearray(fmt.pack_header(sample_header()))
    buf[:8] = b"NOTARENA"
    with pytest.raises(ArenaFormatError, match="bad magic"):
        fmt.unpack_header(with_crc(buf))


def test_zeroed_header_is_refused() -> None:
    with pytest.raises(ArenaFormatError, match="bad magic"):
        fmt.unpack_header(bytes(fmt.HEADER_BYTES))


@pytest.mark.parametrize("version", [0, fmt.VERSION + 1, 2**32 - 1])
def test_other_version(version: int) -> None:
    with pytest.raises(ArenaFormatError, match=f"version {version}"):
        fmt.unpack_header(fmt.pack_header(sample_header(version=version)))


@pytest.mark.parametrize("offset", [8, 24, 40, fmt.SLOT_DESC_OFFSET + 8,
                                    fmt.SLOT_DESC_OFFSET + fmt.SLOT_DESC_BYTES + 1,
                                    fmt.HEADER_CRC_OFFSET - 1, fmt.HEADER_CRC_OFFSET])
def test_any_flipped_bit_fails_the_checksum(offset: int) -> None:
    buf = bytearray(fmt.pack_header(sample_header()))
    buf[offset] ^= 0x01
    with pytest.raises(ArenaFormatError, match="checksum"):
        fmt.unpack_header(bytes(buf))


@pytest.mark.parametrize("length", [0, 1, fmt.HEADER_CRC_OFFSET, fmt.HEADER_BYTES - 1])
def test_truncated(length: int) -> None:
    raw = fmt.pack_header(sample_header())
    with pytest.raises(ArenaFormatError, match="truncated"):
        fmt.unpack_header(raw[:length])


@pytest.mark.parametrize("field_offset, value, what", [
    (0, max(SlotState) + 1, "SlotState"),
    (0, 2**32 - 1, "SlotState"),
    (4, max(ChecksumAlgo) + 1, "ChecksumAlgo"),
])
@pytest.mark.parametrize("slot", range(fmt.NSLOTS))
def test_bad_slot_descriptor(slot: int, field_offset: int, value: int, what: str) -> None:
    buf = bytearray(fmt.pack_header(sample_header()))
    struct.pack_into("<I", buf, fmt.SLOT_DESC_OFFSET + slot * fmt.SLOT_DESC_BYTES + field_offset,
                     value)
    with pytest.raises(ArenaFormatError, match=f"slot {slot} descriptor invalid.*{what}"):
        fmt.unpack_header(with_crc(buf))


@pytest.mark.parametrize("state, algo", [
    (SlotState.RESTORABLE, ChecksumAlgo.NONE), (SlotState.SEALED, ChecksumAlgo.NONE),
    (SlotState.WRITING, ChecksumAlgo.CRC32C), (SlotState.FREE, ChecksumAlgo.CRC32C),
])
def test_checksum_algorithm_must_fit_the_state(state: SlotState, algo: ChecksumAlgo) -> None:
    # The algorithm is not a free field: sealed bytes are checksummed, others are not.
    buf = bytearray(fmt.pack_header(sample_header()))
    struct.pack_into("<II", buf, fmt.SLOT_DESC_OFFSET, state, algo)
    with pytest.raises(ArenaFormatError, match="slot 0 descriptor invalid.*checksum algorithm"):
        fmt.unpack_header(with_crc(buf))


def test_slot_record_round_trips_through_its_document() -> None:
    d = sample_header().slots[0]
    assert slot_from_doc(d.to_doc()) == d
    assert d.freed() == SlotDesc(SlotState.FREE, -1, 100, 4096, 50, 0xDEADBEEF, 0xFEEDFACE, 2)


@pytest.mark.parametrize("changes", [
    {"state": 9}, {"state": True}, {"step": -2}, {"data_bytes": -1}, {"generation": "1"},
    {"manifest_crc": None},
])
def test_slot_record_document_refused(changes: dict) -> None:
    from shardguard.proto.errors import InvalidRequestError

    doc = {**sample_header().slots[0].to_doc(), **changes}
    with pytest.raises(InvalidRequestError, match="slot"):
        slot_from_doc(doc)


@pytest.mark.parametrize("changes", [
    {"nslots": 1}, {"nslots": 3}, {"slot_bytes": fmt.PAGE + 1}, {"slot_bytes": 100},
])
def test_fields_out_of_range(changes: dict) -> None:
    with pytest.raises(ArenaFormatError, match="out of range"):
        fmt.unpack_header(fmt.pack_header(sample_header(**changes)))


def test_header_size_field_out_of_range() -> None:
    buf = bytearray(fmt.pack_header(sample_header()))
    struct.pack_into("<Q", buf, 16, 2 * fmt.HEADER_BYTES)
    with pytest.raises(ArenaFormatError, match="out of range"):
        fmt.unpack_header(with_crc(buf))


def test_arena_format_error_is_a_value_error() -> None:
    # Callers that only know built-ins (the gRPC layer, adopt()) catch it as such.
    assert issubclass(ArenaFormatError, ValueError)


# --------------------------------------------------------------------------
# alignment and offsets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n, to, want", [
    (0, 4096, 0), (1, 4096, 4096), (4095, 4096, 4096), (4096, 4096, 4096), (4097, 4096, 8192),
    (0, 64, 0), (1, 64, 64), (64, 64, 64), (65, 64, 128), (2**40 + 1, 4096, 2**40 + 4096),
])
def test_align_up(n: int, to: int, want: int) -> None:
    assert fmt.align_up(n, to) == want


def test_align_up_defaults_to_a_page() -> None:
    assert fmt.align_up(1) == fmt.PAGE == 4096


@given(st.integers(0, 2**50), st.sampled_from([1, 8, 64, 4096, 1 << 20]))
def test_align_up_is_the_least_aligned_bound(n: int, to: int) -> None:
    a = fmt.align_up(n, to)
    assert a % to == 0 and n <= a < n + to


def test_slot_offsets_and_arena_size() -> None:
    slot = 3 * fmt.PAGE
    assert fmt.slot_offset(0, slot) == fmt.HEADER_BYTES
    assert fmt.slot_offset(1, slot) == fmt.HEADER_BYTES + slot
    assert fmt.arena_bytes(slot) == fmt.HEADER_BYTES + fmt.NSLOTS * slot
    assert fmt.arena_bytes(slot) == fmt.slot_offset(fmt.NSLOTS, slot)
    assert all(fmt.slot_offset(i, slot) % fmt.PAGE == 0 for i in range(fmt.NSLOTS))


def test_file_names() -> None:
    assert fmt.arena_name("shardguard", "job.1", 12) == "shardguard.job.1.r12"
    assert fmt.meta_name("shardguard", "job.1") == "shardguard.job.1.meta"
    # An arena name never collides with a meta name: ranks render as r<digits>.
    assert fmt.arena_name("p", "j", 0) != fmt.meta_name("p", "j")
