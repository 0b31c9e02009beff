"""A slot's checksums: made when it is sealed (the CRC of each block, from which the
protection layer derives its pieces' CRCs: given by the client, which made them as it
copied, or computed here), checked when it is read back."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

from shardguard.daemon.coding.checksum import (
    CRC_BLOCK_BYTES,
    combine_blocks,
    crc32c,
    crc32c_blocks,
)
from shardguard.daemon.errors import CorruptionError, InvalidRequestError
from shardguard.proto import manifest as mf
from shardguard.proto.arena import SlotDesc
from shardguard.proto.crc32c import MASK


@dataclass(frozen=True)
class SealSums:
    """The checksums of a slot being sealed."""

    data_crc: int
    manifest_crc: int
    #: CRC32C of each ``CRC_BLOCK_BYTES`` block of the data.
    blocks: list[int]


@dataclass(frozen=True)
class ClientBlocks:
    """The block CRCs a client made of a slot's data as it copied it (agent.proto's
    ``SealRequest.block_crcs``)."""

    block_bytes: int
    crcs: Sequence[int]


def seal_sums(view: memoryview, step: int, data_bytes: int, manifest_offset: int,
              manifest_bytes: int, given: ClientBlocks | None = None) -> SealSums:
    """Validate the slot's manifest for ``step`` and checksum what the slot holds.

    ``given``: the data's block CRCs as the client made them while copying: checked for
    shape and taken (the data is not read again; a CRC that does not match the bytes
    fails every later check of them -- a restore, a rebuild -- never passes one).

    Raises:
        ManifestError: the manifest is malformed, or is for another step.
        InvalidRequestError: ``given`` is not one CRC per block of the data.
    """
    raw_manifest = view[manifest_offset:manifest_offset + manifest_bytes]
    doc = mf.parse(raw_manifest, data_bytes)
    if doc["step"] != step:
        raise mf.ManifestError(f"manifest is for step {doc['step']}, sealed as step {step}")
    manifest_crc = crc32c(raw_manifest)
    if given is None:
        data_crc, blocks = crc32c_blocks(view[:data_bytes], CRC_BLOCK_BYTES)
        return SealSums(data_crc, manifest_crc, blocks)
    if given.block_bytes != CRC_BLOCK_BYTES:
        raise InvalidRequestError(f"block CRCs of {given.block_bytes}-byte blocks: this "
                                  f"daemon keeps them per {CRC_BLOCK_BYTES} bytes")
    want = -(-data_bytes // CRC_BLOCK_BYTES)
    if len(given.crcs) != want or any(not 0 <= c <= MASK for c in given.crcs):
        raise InvalidRequestError(f"{len(given.crcs)} block CRCs for {data_bytes} bytes of "
                                  f"data: expected {want}, each a 32-bit CRC")
    blocks = list(given.crcs)
    return SealSums(combine_blocks(blocks, data_bytes, CRC_BLOCK_BYTES), manifest_crc, blocks)


def verify(job: str, rank: int, view: memoryview, s: SlotDesc,
           data_crc: int | None = None) -> None:
    """Raise CorruptionError unless the slot's bytes match the checksums of its seal;
    ``data_crc``: the data's CRC as it was written (coding/dest.py's WrittenCrcs), so the
    data need not be read again."""
    m = view[s.manifest_offset:s.manifest_offset + s.manifest_bytes]
    if crc32c(m) != s.manifest_crc:
        raise CorruptionError(f"job {job} rank {rank} step {s.step}: manifest checksum fails")
    if data_crc is None:
        data_crc = crc32c(view[:s.data_bytes])
    if data_crc != s.data_crc:
        raise CorruptionError(f"job {job} rank {rank} step {s.step}: data checksum fails")


class SlotChecks:
    """Checks that run on daemon threads, and the block CRCs of the slots sealed here.

    The block CRCs live in memory only (a restarted daemon reads the bytes again); they
    are read and changed under the store's lock.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="sg-verify")
        # By (job, rank), then (step, generation).
        self._blocks: dict[tuple[str, int], dict[tuple[int, int], list[int]]] = {}

    def submit(self, job: str, rank: int, view: memoryview,
               s: SlotDesc) -> concurrent.futures.Future[None]:
        """:func:`verify` on a daemon thread."""
        return self._pool.submit(verify, job, rank, view, s)

    def keep_blocks(self, job: str, rank: int, slots: list[SlotDesc], step: int,
                    generation: int, blocks: list[int]) -> None:
        """Remember the block CRCs of ``rank``'s new seal; forget those of the steps its
        ``slots`` no longer hold."""
        held = {(x.step, x.generation) for x in slots}  # the other slot's stay
        mine = self._blocks.get((job, rank), {})
        self._blocks[(job, rank)] = {k: v for k, v in mine.items() if k in held}
        self._blocks[(job, rank)][(step, generation)] = blocks

    def blocks(self, job: str, rank: int, step: int, generation: int) -> list[int] | None:
        return self._blocks.get((job, rank), {}).get((step, generation))

    def forget(self, job: str) -> None:
        self._blocks = {k: v for k, v in self._blocks.items() if k[0] != job}  # per rank

    def shutdown(self) -> None:
        """Wait for the checks running, and start no more."""
        self._pool.shutdown(wait=True)
