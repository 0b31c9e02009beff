"""The /dev/shm arena format, shared by the daemon (owner) and the client.

One arena per (job, rank), created by the daemon (mode 0600), mapped by the
rank's client. Layout, little-endian::

    [0, 4096)                      header (written only by the daemon)
    [4096 + i*slot_bytes, ...)     slot i, i = 0..nslots-1

Header::

    0    magic            8s   b"SGARENA\\0"
    8    version          u32
    12   nslots           u32
    16   header_bytes     u64  (4096)
    24   slot_bytes       u64
    32   rank             u32
    36   world_size       u32
    40   job              64s  utf-8, NUL padded
    128  slot descriptors, SLOT_DESC_BYTES each (see SlotDesc)
    4092 header_crc       u32  CRC32 (zlib) of bytes [0, 4092)

A slot holds the tensor data from its offset 0 (entries aligned, see
``manifest.align_for``) and the manifest (UTF-8 JSON, ``manifest.py``) at
``manifest_offset``, 4096-aligned after the data. The daemon's in-memory
state (mirrored in a small meta file beside the arenas) is the authority; the
header mirrors it so that a client can see which slot is free, and so that the
format of an adopted arena can be checked.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, fields, replace

MAGIC = b"SGARENA\x00"
VERSION = 1
PAGE = 4096
HEADER_BYTES = PAGE
NSLOTS = 2
JOB_FIELD_BYTES = 64
SLOT_DESC_OFFSET = 128
SLOT_DESC_BYTES = 64
HEADER_CRC_OFFSET = HEADER_BYTES - 4

_FIXED = struct.Struct("<8sIIQQII64s")
# state, checksum algo, step, data_bytes, manifest_offset, manifest_bytes,
# data_crc, manifest_crc, generation
_SLOT = struct.Struct("<IIqQQQIIQ")
assert _FIXED.size <= SLOT_DESC_OFFSET and _SLOT.size <= SLOT_DESC_BYTES


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    SEALED = 2
    RESTORABLE = 3


class ChecksumAlgo(enum.IntEnum):
    NONE = 0
    CRC32C = 1


def align_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def arena_bytes(slot_bytes: int, nslots: int = NSLOTS) -> int:
    return HEADER_BYTES + nslots * slot_bytes


def slot_offset(slot: int, slot_bytes: int) -> int:
    return HEADER_BYTES + slot * slot_bytes


@dataclass(frozen=True)
class SlotDesc:
    """One slot's record: the header's descriptor, the daemon's record of the slot (its
    store replaces it whole on every change, under its lock), and the ``record`` of a rank
    in a node's payload (proto/meta.py's RankEntry)."""

    state: SlotState = SlotState.FREE
    step: int = -1
    data_bytes: int = 0
    manifest_offset: int = 0
    manifest_bytes: int = 0
    data_crc: int = 0
    manifest_crc: int = 0
    #: Counts the times the slot was handed out for writing: only ever grows.
    generation: int = 0

    @property
    def checksum_algo(self) -> ChecksumAlgo:
        """Sealed bytes carry CRC32C checksums; a slot being written none."""
        return ChecksumAlgo.CRC32C if self.state >= SlotState.SEALED else ChecksumAlgo.NONE

    def freed(self) -> "SlotDesc":
        """The slot back to free, holding no step (its generation stays)."""
        return replace(self, state=SlotState.FREE, step=-1)

    def to_doc(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Header:
    slot_bytes: int
    rank: int
    world_size: int
    job: str
    slots: tuple[SlotDesc, ...]
    nslots: int = NSLOTS
    version: int = VERSION


def pack_header(h: Header) -> bytes:
    """The 4096 header bytes for ``h``, checksum included."""
    job = h.job.encode()
    if len(job) > JOB_FIELD_BYTES:
        raise ValueError(f"job name longer than {JOB_FIELD_BYTES} bytes")
    buf = bytearray(HEADER_BYTES)
    _FIXED.pack_into(buf, 0, MAGIC, h.version, h.nslots, HEADER_BYTES, h.slot_bytes,
                     h.rank, h.world_size, job)
    for i, s in enumerate(h.slots):
        _SLOT.pack_into(buf, SLOT_DESC_OFFSET + i * SLOT_DESC_BYTES, int(s.state),
                        int(s.checksum_algo), s.step, s.data_bytes, s.manifest_offset,
                        s.manifest_bytes, s.data_crc, s.manifest_crc, s.generation)
    struct.pack_into("<I", buf, HEADER_CRC_OFFSET, zlib.crc32(buf[:HEADER_CRC_OFFSET]))
    return bytes(buf)


def unpack_header(buf: bytes | memoryview) -> Header:
    """Parse and check a header.

    Raises:
        ArenaFormatError: bad magic, version, checksum or field.
    """
    from shardguard.proto.errors import ArenaFormatError

    raw = bytes(buf[:HEADER_BYTES])
    if len(raw) < HEADER_BYTES:
        raise ArenaFormatError(f"arena header truncated: {len(raw)} of {HEADER_BYTES} bytes")
    magic, version, nslots, header_bytes, slot_bytes, rank, world, job = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise ArenaFormatError(f"arena header has bad magic {magic!r}")
    (crc,) = struct.unpack_from("<I", raw, HEADER_CRC_OFFSET)
    if crc != zlib.crc32(raw[:HEADER_CRC_OFFSET]):
        raise ArenaFormatError("arena header checksum mismatch")
    if version != VERSION:
        raise ArenaFormatError(f"arena format version {version} (this build reads {VERSION})")
    if nslots != NSLOTS or header_bytes != HEADER_BYTES or slot_bytes % PAGE:
        raise ArenaFormatError(
            f"arena header fields out of range (nslots={nslots}, header={header_bytes}, "
            f"slot_bytes={slot_bytes})")
    slots = []
    for i in range(nslots):
        f = _SLOT.unpack_from(raw, SLOT_DESC_OFFSET + i * SLOT_DESC_BYTES)
        try:
            state, algo = SlotState(f[0]), ChecksumAlgo(f[1])
            desc = SlotDesc(state, *f[2:])
            if algo != desc.checksum_algo:
                raise ValueError(f"checksum algorithm {algo.name} for a {state.name} slot")
            slots.append(desc)
        except ValueError as exc:
            raise ArenaFormatError(f"arena slot {i} descriptor invalid: {exc}") from None
    return Header(slot_bytes=slot_bytes, rank=rank, world_size=world,
                  job=job.rstrip(b"\x00").decode(errors="replace"), slots=tuple(slots),
                  nslots=nslots, version=version)


def arena_name(prefix: str, job: str, rank: int) -> str:
    """File name (under the shm dir) of a rank's arena."""
    return f"{prefix}.{job}.r{rank}"


def meta_name(prefix: str, job: str) -> str:
    """File name (under the shm dir) of a job's meta file, beside its arenas."""
    return f"{prefix}.{job}.meta"
