"""The daemon's Store, driven directly (no sockets) on a temporary directory standing in for shm."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from shardguard.daemon.coding.checksum import CRC_BLOCK_BYTES, crc32c
from shardguard.daemon.errors import (
    ArenaFormatError,
    BudgetExceededError,
    CorruptionError,
    InvalidRequestError,
    LeaseError,
    ManifestError,
    NoSpaceError,
    NotRestorableError,
    RankClaimedError,
    SlotStateError,
    StepOrderError,
    UnknownJobError,
)
from shardguard.daemon.storage import arena as arena_mod
from shardguard.daemon.storage.arena import Arena
from shardguard.daemon.storage.slot_checks import ClientBlocks
from shardguard.daemon.storage.store import Registration, Store
from shardguard.proto import arena as fmt
from shardguard.proto import hostmem
from shardguard.proto import manifest as mf
from shardguard.proto.arena import ChecksumAlgo, SlotDesc, SlotState

PID = os.getpid()
SLOT = 4 * fmt.PAGE
BUDGET = 64 << 20
#: The store logs from its parts (jobs.py, shm_files.py, ...): their common parent.
STORE_LOG = "shardguard.daemon.storage"


class Shm:
    """A temporary shm directory with a unique prefix; makes Stores over it and closes them."""

    def __init__(self, path: Path) -> None:
        self.dir = str(path)
        self.prefix = f"sgt{uuid.uuid4().hex[:8]}"
        self.stores: list[Store] = []

    def store(self, budget: int = BUDGET, **kw: object) -> Store:
        s = Store(self.dir, self.prefix, budget, **kw)  # type: ignore[arg-type]
        self.stores.append(s)
        return s

    def restart(self, old: Store, **kw: object) -> Store:
        """What a daemon restart does: the old one lets go, a new one adopts the files."""
        old.close()
        return self.store(old.budget_bytes, **kw)

    def files(self) -> list[str]:
        return sorted(f for f in os.listdir(self.dir) if f.startswith(self.prefix + "."))

    def job_files(self, job: str, *ranks: int) -> list[str]:
        """The names a job's files should have: one arena per rank and the meta."""
        return sorted([fmt.arena_name(self.prefix, job, r) for r in ranks]
                      + [fmt.meta_name(self.prefix, job)])

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Shm]:
    s = Shm(tmp_path)
    yield s
    for store in s.stores:
        store.close()


def write(reg: Registration, slot: int, step: int, payload: bytes,
          manifest_step: int | None = None) -> tuple[int, int, int]:
    """Write ``payload`` and its manifest into ``slot`` as a client would; returns the extents."""
    manifest = mf.dumps({"t": "bytes", "off": 0, "n": len(payload)},
                        step if manifest_step is None else manifest_step, len(payload))
    mo = fmt.align_up(len(payload))
    base = fmt.slot_offset(slot, reg.slot_bytes)
    mm = np.memmap(reg.arena_path, dtype=np.uint8, mode="r+", shape=(reg.arena_bytes,))
    mm[base:base + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    mm[base + mo:base + mo + len(manifest)] = np.frombuffer(manifest, dtype=np.uint8)
    mm.flush()
    del mm
    return len(payload), mo, len(manifest)


def read(reg: Registration, slot: int, n: int, offset: int = 0) -> bytes:
    with open(reg.arena_path, "rb") as fh:
        fh.seek(fmt.slot_offset(slot, reg.slot_bytes) + offset)
        return fh.read(n)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def header(path: str) -> fmt.Header:
    with open(path, "rb") as fh:
        return fmt.unpack_header(fh.read(fmt.HEADER_BYTES))


def snap(store: Store, reg: Registration, job: str, step: int, payload: bytes,
         rank: int = 0) -> tuple[int, int | None]:
    """begin, write, seal; returns (slot, restorable step after the seal)."""
    slot = store.begin(job, rank, reg.lease, step)
    restorable = store.seal(job, rank, reg.lease, step, slot, *write(reg, slot, step, payload))
    return slot, restorable


def states(store: Store, job: str, rank: int = 0) -> list[tuple[str, int]]:
    return [(s.state.name, s.step) for s in store.job(job).ranks[rank].slots]


def payload(step: int, n: int = 5000) -> bytes:
    return np.random.default_rng(step).integers(0, 256, n, dtype=np.uint8).tobytes()


# --------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------


def test_register_creates_the_arena_and_meta(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT - 100, PID, [0])
    assert reg.slot_bytes == SLOT  # rounded up to pages
    assert reg.arena_path == shm.path(fmt.arena_name(shm.prefix, "j", 0))
    assert reg.arena_bytes == fmt.arena_bytes(SLOT) == os.path.getsize(reg.arena_path)
    assert os.stat(reg.arena_path).st_mode & 0o777 == 0o600
    assert reg.restorable_step is None and len(reg.lease) == 32
    assert shm.files() == shm.job_files("j", 0)
    h = header(reg.arena_path)
    assert (h.job, h.rank, h.world_size, h.slot_bytes) == ("j", 0, 1, SLOT)
    assert [s.state for s in h.slots] == [SlotState.FREE] * fmt.NSLOTS
    assert store.used_bytes() == reg.arena_bytes


@pytest.mark.parametrize("args, message", [
    (dict(job=""), "job name"), (dict(job=".hidden"), "job name"), (dict(job="a/b"), "job name"),
    (dict(job="x" * 65), "job name"), (dict(job="-flag"), "job name"),
    (dict(rank=2), "rank 2 outside world of size 2"), (dict(world_size=0), "world_size 0"),
    (dict(local_ranks=[1]), "local_ranks"), (dict(local_ranks=[0, 0]), "local_ranks"),
    (dict(local_ranks=[0, 5]), "local_ranks"), (dict(slot_bytes=0), "slot_bytes"),
])
def test_register_validates(shm: Shm, args: dict, message: str) -> None:
    call = dict(job="j", rank=0, world_size=2, slot_bytes=SLOT, pid=PID, local_ranks=[0])
    call.update(args)
    with pytest.raises(InvalidRequestError, match=message):
        shm.store().register(**call)  # type: ignore[arg-type]
    assert shm.files() == []


def test_register_needs_a_live_pid(shm: Shm) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(InvalidRequestError, match=f"pid {proc.pid} is not a live process"):
        shm.store().register("j", 0, 1, SLOT, proc.pid, [0])


def test_world_size_of_a_job_is_fixed(shm: Shm) -> None:
    store = shm.store()
    store.register("j", 0, 2, SLOT, PID, [0])
    with pytest.raises(InvalidRequestError, match="world size 2"):
        store.register("j", 1, 4, SLOT, PID, [1])


def test_second_live_claim_is_refused(shm: Shm) -> None:
    store = shm.store()
    parent = os.getppid()  # a live process other than this one
    first = store.register("j", 0, 1, SLOT, parent, [0])
    with pytest.raises(RankClaimedError, match=f"held by live process {parent}"):
        store.register("j", 0, 1, SLOT, PID, [0])
    store.begin("j", 0, first.lease, 0)  # the holder's lease still works
    taken = store.register("j", 0, 1, SLOT, PID, [0], force=True)
    with pytest.raises(LeaseError):
        store.begin("j", 0, first.lease, 1)
    store.begin("j", 0, taken.lease, 1)


def test_same_pid_registers_again(shm: Shm) -> None:
    store = shm.store()
    first = store.register("j", 0, 1, SLOT, PID, [0])
    again = store.register("j", 0, 1, SLOT, PID, [0])
    assert again.lease != first.lease and again.arena_path == first.arena_path
    with pytest.raises(LeaseError):
        store.begin("j", 0, first.lease, 0)


def test_claim_of_a_dead_process_is_taken_over(shm: Shm) -> None:
    store = shm.store()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        store.register("j", 0, 1, SLOT, proc.pid, [0])
    finally:
        proc.kill()
        proc.wait()
    store.register("j", 0, 1, SLOT, PID, [0])


def test_unregister_frees_the_claim(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, os.getppid(), [0])
    store.unregister("j", 0, reg.lease)
    with pytest.raises(LeaseError):
        store.begin("j", 0, reg.lease, 0)
    store.register("j", 0, 1, SLOT, PID, [0])


# --------------------------------------------------------------------------
# the slot state machine
# --------------------------------------------------------------------------


def test_free_writing_sealed_restorable_free(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot = store.begin("j", 0, reg.lease, 0)
    assert slot == 0 and states(store, "j") == [("WRITING", 0), ("FREE", -1)]
    assert header(reg.arena_path).slots[0].state == SlotState.WRITING
    data = payload(0)
    extents = write(reg, slot, 0, data)
    assert store.seal("j", 0, reg.lease, 0, slot, *extents) == 0  # one rank: restorable at once
    assert states(store, "j") == [("RESTORABLE", 0), ("FREE", -1)]
    d = header(reg.arena_path).slots[0]
    assert (d.state, d.checksum_algo, d.step) == (SlotState.RESTORABLE, ChecksumAlgo.CRC32C, 0)
    assert (d.data_bytes, d.manifest_offset, d.manifest_bytes) == extents
    assert d.data_crc == crc32c(data)
    assert d.manifest_crc == crc32c(read(reg, 0, extents[2], extents[1]))
    assert store.latest("j") == 0
    # The next step takes the other slot; once it is restorable the older one is free.
    assert snap(store, reg, "j", 1, payload(1)) == (1, 1)
    # The older one keeps its step: readable until overwritten (a roll-back may need it).
    assert states(store, "j") == [("FREE", 0), ("RESTORABLE", 1)]
    assert snap(store, reg, "j", 5, payload(5)) == (0, 5)
    assert states(store, "j") == [("RESTORABLE", 5), ("FREE", 1)]


def test_restorable_only_when_every_local_rank_sealed(shm: Shm) -> None:
    store = shm.store()
    r0 = store.register("j", 0, 2, SLOT, PID, [0, 1])
    r1 = store.register("j", 1, 2, SLOT, PID, [0, 1])
    assert snap(store, r0, "j", 0, payload(0), rank=0) == (0, None)
    assert states(store, "j", 0)[0] == ("SEALED", 0) and store.latest("j") is None
    assert header(r0.arena_path).slots[0].state == SlotState.SEALED
    assert snap(store, r1, "j", 0, payload(1), rank=1) == (0, 0)
    assert states(store, "j", 0)[0] == states(store, "j", 1)[0] == ("RESTORABLE", 0)
    assert header(r0.arena_path).slots[0].state == SlotState.RESTORABLE


def test_other_nodes_decide_through_the_protection_layer(shm: Shm) -> None:
    sealed: list[tuple[str, int]] = []
    store = shm.store(on_node_sealed=lambda job, step: sealed.append((job, step)))
    r0 = store.register("j", 0, 4, SLOT, PID, [0, 1])
    r1 = store.register("j", 1, 4, SLOT, PID, [0, 1])
    snap(store, r0, "j", 3, payload(0), rank=0)
    assert sealed == []
    assert snap(store, r1, "j", 3, payload(1), rank=1) == (0, None)
    assert sealed == [("j", 3)] and store.latest("j") is None
    store.mark_restorable("j", 3)
    assert store.latest("j") == 3 and states(store, "j", 1)[0] == ("RESTORABLE", 3)
    with pytest.raises(SlotStateError, match="rank 0 has not sealed step 4"):
        store.mark_restorable("j", 4)


def test_step_must_move_forward(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 3, payload(3))
    for step in (3, 2, 0):
        with pytest.raises(StepOrderError, match=f"step {step} is not after the restorable step 3"):
            store.begin("j", 0, reg.lease, step)
    with pytest.raises(InvalidRequestError, match="negative"):
        store.begin("j", 0, reg.lease, -1)
    assert states(store, "j") == [("RESTORABLE", 3), ("FREE", -1)]
    assert snap(store, reg, "j", 4, payload(4)) == (1, 4)


def test_a_new_begin_supersedes_an_unfinished_step(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    assert store.begin("j", 0, reg.lease, 1) == 1
    assert store.begin("j", 0, reg.lease, 2) == 1  # the restorable slot is never handed out
    assert states(store, "j") == [("RESTORABLE", 0), ("WRITING", 2)]
    with pytest.raises(SlotStateError, match="slot 1 is WRITING step 2, not WRITING step 1"):
        store.seal("j", 0, reg.lease, 1, 1, *write(reg, 1, 1, payload(1)))


def test_seal_checks_the_request_and_the_manifest(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot = store.begin("j", 0, reg.lease, 1)
    n, mo, mb = write(reg, slot, 1, payload(1), manifest_step=2)
    with pytest.raises(ManifestError, match="manifest is for step 2, sealed as step 1"):
        store.seal("j", 0, reg.lease, 1, slot, n, mo, mb)
    n, mo, mb = write(reg, slot, 1, payload(1))
    bad = [
        ((1, 9, n, mo, mb), InvalidRequestError, "slot 9 out of range"),
        ((1, 1 - slot, n, mo, mb), SlotStateError, "is FREE"),
        ((1, slot, n - 1, mo, mb), ManifestError, "data_bytes"),
        ((1, slot, n, mo + 1, mb), InvalidRequestError, "page-aligned"),
        ((1, slot, mo + 1, mo, mb), InvalidRequestError, ">= data_bytes"),
        ((1, slot, n, mo, 0), InvalidRequestError, "does not fit"),
        ((1, slot, n, mo, SLOT), InvalidRequestError, "does not fit"),
        ((1, slot, n, mo, mb - 1), ManifestError, "not valid JSON"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            store.seal("j", 0, reg.lease, *args)
        assert states(store, "j")[slot] == ("WRITING", 1)
    assert store.seal("j", 0, reg.lease, 1, slot, n, mo, mb) == 1


def test_seal_takes_the_clients_block_crcs_checked_for_shape(shm: Shm) -> None:
    """The client's block CRCs (made as it copied) are taken, not recomputed; a list that
    is not one 32-bit CRC per block, or of another block size, is refused and the slot
    stays writing. A CRC that does not match the bytes is caught by every later check."""
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot = store.begin("j", 0, reg.lease, 1)
    data = payload(1)
    n, mo, mb = write(reg, slot, 1, data)
    good = crc32c(data)
    bad = [
        (ClientBlocks(CRC_BLOCK_BYTES, []), "0 block CRCs for 5000 bytes"),
        (ClientBlocks(CRC_BLOCK_BYTES, [good, good]), "2 block CRCs"),
        (ClientBlocks(CRC_BLOCK_BYTES, [1 << 32]), "each a 32-bit CRC"),
        (ClientBlocks(CRC_BLOCK_BYTES // 2, [good]), "keeps them per 4194304 bytes"),
    ]
    for given, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            store.seal("j", 0, reg.lease, 1, slot, n, mo, mb, given)
        assert states(store, "j")[slot] == ("WRITING", 1)
    assert store.seal("j", 0, reg.lease, 1, slot, n, mo, mb,
                      ClientBlocks(CRC_BLOCK_BYTES, [good])) == 1
    assert store.job("j").ranks[0].slots[slot].data_crc == good
    assert store.check_slot("j", 0, 1)[0] is None
    # A wrong CRC from the client: sealed as given, and the next check of the slot fails.
    slot = store.begin("j", 0, reg.lease, 2)
    n, mo, mb = write(reg, slot, 2, payload(2))
    assert store.seal("j", 0, reg.lease, 2, slot, n, mo, mb,
                      ClientBlocks(CRC_BLOCK_BYTES, [crc32c(payload(2)) ^ 1])) == 2
    assert "data checksum fails" in (store.check_slot("j", 0, 2)[0] or "")


def test_manifest_with_an_extent_past_the_data_is_refused(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot = store.begin("j", 0, reg.lease, 0)
    n, mo, mb = write(reg, slot, 0, payload(0, 100))
    bogus = mf.dumps({"t": "bytes", "off": 50, "n": 51}, 0, n)
    with open(reg.arena_path, "r+b") as fh:
        fh.seek(fmt.slot_offset(slot, reg.slot_bytes) + mo)
        fh.write(bogus)
    with pytest.raises(ManifestError, match="outside the 100-byte data region"):
        store.seal("j", 0, reg.lease, 0, slot, n, mo, len(bogus))


def test_wrong_lease_is_refused_everywhere(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    slot = store.begin("j", 0, reg.lease, 1)
    bad = "0" * 32
    calls = [
        lambda: store.begin("j", 0, bad, 2),
        lambda: store.seal("j", 0, bad, 1, slot, *write(reg, slot, 1, payload(1))),
        lambda: store.open_for_restore("j", 0, bad, None),
        lambda: store.release("j", 0, bad, 0),
        lambda: store.unregister("j", 0, bad),
        lambda: store.begin("j", 0, "", 2),
    ]
    for call in calls:
        with pytest.raises(LeaseError, match="lease does not match"):
            call()
    assert states(store, "j") == [("RESTORABLE", 0), ("WRITING", 1)]
    assert store.seal("j", 0, reg.lease, 1, slot, *write(reg, slot, 1, payload(1))) == 1


def test_unknown_job_or_rank(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 2, SLOT, PID, [0])
    with pytest.raises(UnknownJobError, match="job k is not registered"):
        store.begin("k", 0, reg.lease, 0)
    with pytest.raises(UnknownJobError, match="job j has no rank 1"):
        store.begin("j", 1, reg.lease, 0)
    with pytest.raises(UnknownJobError):
        store.latest("k")


# --------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------


def test_open_for_restore(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    with pytest.raises(NotRestorableError, match="no restorable step"):
        store.open_for_restore("j", 0, reg.lease, None)
    data = payload(4)
    slot, _ = snap(store, reg, "j", 4, data)
    o = store.open_for_restore("j", 0, reg.lease, None)
    assert (o.slot, o.record.step, o.record.data_bytes) == (slot, 4, len(data))
    assert read(reg, o.slot, o.record.data_bytes) == data
    mf.parse(read(reg, o.slot, o.record.manifest_bytes, o.record.manifest_offset), o.record.data_bytes)
    assert store.open_for_restore("j", 0, reg.lease, 4).slot == slot
    with pytest.raises(NotRestorableError, match="step 3 is not restorable"):
        store.open_for_restore("j", 0, reg.lease, 3)


@pytest.mark.parametrize("where", ["data-first", "data-last", "manifest"])
def test_open_for_restore_detects_a_flipped_byte(shm: Shm, where: str) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot, _ = snap(store, reg, "j", 0, payload(0))
    n, mo = len(payload(0)), fmt.align_up(len(payload(0)))
    offset = {"data-first": 0, "data-last": n - 1, "manifest": mo + 3}[where]
    flip(reg.arena_path, fmt.slot_offset(slot, reg.slot_bytes) + offset)
    # The checksum runs while the client copies; release() gives the verdict.
    o = store.open_for_restore("j", 0, reg.lease, None)
    with pytest.raises(CorruptionError, match=f"job j rank 0 step 0: "
                                              f"{'manifest' if where == 'manifest' else 'data'} "
                                              "checksum fails"):
        store.release("j", 0, reg.lease, o.record.step)
    assert not store.job("j").ranks[0].pinned
    # A slot known to be corrupt is never served again.
    with pytest.raises(CorruptionError, match="failed their checksum"):
        store.open_for_restore("j", 0, reg.lease, None)


def test_verify_on_restore_off(shm: Shm) -> None:
    store = shm.store(verify_on_restore=False)
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot, _ = snap(store, reg, "j", 0, payload(0))
    flip(reg.arena_path, fmt.slot_offset(slot, reg.slot_bytes))
    assert store.open_for_restore("j", 0, reg.lease, None).record.step == 0


def test_a_restore_in_progress_pins_its_slot(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    assert store.open_for_restore("j", 0, reg.lease, None).slot == 0
    assert store.begin("j", 0, reg.lease, 1) == 1
    store.release("j", 0, reg.lease, 0)
    assert not store.job("j").ranks[0].pinned


def test_a_slot_being_read_is_not_handed_out(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    assert store.open_for_restore("j", 0, reg.lease, None).slot == 0
    snap(store, reg, "j", 1, payload(1))  # step 0 is no longer restorable, but still being read
    with pytest.raises(SlotStateError, match="no free slot for step 2"):
        store.begin("j", 0, reg.lease, 2)


def test_release_after_a_newer_step_became_restorable(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    assert store.open_for_restore("j", 0, reg.lease, None).slot == 0
    snap(store, reg, "j", 1, payload(1))
    store.release("j", 0, reg.lease, 0)
    assert store.begin("j", 0, reg.lease, 2) == 0


# --------------------------------------------------------------------------
# budget and growth
# --------------------------------------------------------------------------


def test_budget_refusal_leaves_the_existing_arena(shm: Shm) -> None:
    small = fmt.arena_bytes(SLOT)
    store = shm.store(budget=small + fmt.arena_bytes(2 * SLOT) - 1)
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    data = payload(0)
    snap(store, reg, "j", 0, data)
    with pytest.raises(BudgetExceededError, match="over its memory budget"):
        store.register("j", 0, 1, 16 * SLOT, PID, [0])
    with pytest.raises(BudgetExceededError):
        store.register("other", 0, 1, 2 * SLOT, PID, [0])
    assert os.path.getsize(reg.arena_path) == small and store.used_bytes() == small
    assert shm.files() == shm.job_files("j", 0)
    assert store.job("j").ranks[0].slot_bytes == SLOT
    # The claim, the restorable step and its bytes are as they were.
    assert store.open_for_restore("j", 0, reg.lease, None).record.step == 0
    assert read(reg, 0, len(data)) == data
    store.register("other", 0, 1, SLOT, PID, [0])  # what fits still fits


def test_growth_keeps_the_restorable_slot(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    data = payload(1)
    assert snap(store, reg, "j", 1, data) == (1, 1)  # restorable in slot 1, not slot 0
    grown = store.register("j", 0, 1, 8 * SLOT, PID, [0])
    assert grown.slot_bytes == 8 * SLOT and grown.arena_path == reg.arena_path
    assert os.path.getsize(grown.arena_path) == fmt.arena_bytes(8 * SLOT) == grown.arena_bytes
    assert grown.restorable_step == 1 and store.used_bytes() == grown.arena_bytes
    assert shm.files() == shm.job_files("j", 0)
    h = header(grown.arena_path)
    assert h.slot_bytes == 8 * SLOT and h.slots[1].state == SlotState.RESTORABLE
    o = store.open_for_restore("j", 0, grown.lease, None)  # checksums pass on the new arena
    assert o.slot == 1 and read(grown, 1, len(data)) == data
    store.release("j", 0, grown.lease, 1)
    big = payload(2, 6 * SLOT)
    assert snap(store, grown, "j", 2, big) == (0, 2)
    assert read(grown, 0, len(big)) == big


def test_a_smaller_request_keeps_the_bigger_arena(shm: Shm) -> None:
    store = shm.store()
    big = store.register("j", 0, 1, 4 * SLOT, PID, [0])
    again = store.register("j", 0, 1, SLOT, PID, [0])
    assert again.slot_bytes == 4 * SLOT and again.arena_bytes == big.arena_bytes


# --------------------------------------------------------------------------
# adoption after a daemon restart
# --------------------------------------------------------------------------


def test_adoption_keeps_the_restorable_step(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    data = payload(1)
    snap(store, reg, "j", 1, data)
    assert store.begin("j", 0, reg.lease, 2) == 0
    write(reg, 0, 2, payload(2))  # a copy in flight when the daemon dies
    new = shm.restart(store)
    assert new.adopt() == 1
    assert new.latest("j") == 1
    assert states(new, "j") == [("FREE", -1), ("RESTORABLE", 1)]
    assert [s.state for s in header(reg.arena_path).slots] == [SlotState.FREE,
                                                               SlotState.RESTORABLE]
    assert new.used_bytes() == reg.arena_bytes
    with pytest.raises(LeaseError):  # the old lease died with the old daemon
        new.begin("j", 0, reg.lease, 3)
    again = new.register("j", 0, 1, SLOT, PID, [0])
    assert again.restorable_step == 1 and again.arena_path == reg.arena_path
    o = new.open_for_restore("j", 0, again.lease, None)
    assert (o.slot, o.record.step) == (1, 1) and read(again, 1, len(data)) == data
    assert snap(new, again, "j", 3, payload(3)) == (0, 3)


def test_adoption_of_a_sealed_step_awaiting_other_ranks(shm: Shm) -> None:
    store = shm.store()
    r0 = store.register("j", 0, 2, SLOT, PID, [0, 1])
    r1 = store.register("j", 1, 2, SLOT, PID, [0, 1])
    snap(store, r0, "j", 0, payload(0), rank=0)
    new = shm.restart(store)
    assert new.adopt() == 1
    assert states(new, "j", 0)[0] == ("SEALED", 0) and new.latest("j") is None
    r1 = new.register("j", 1, 2, SLOT, PID, [0, 1])
    assert snap(new, r1, "j", 0, payload(1), rank=1) == (0, 0)


def test_adoption_does_not_resurrect_a_slot_that_was_being_rewritten(shm: Shm) -> None:
    store = shm.store()
    r0 = store.register("j", 0, 2, SLOT, PID, [0, 1])
    r1 = store.register("j", 1, 2, SLOT, PID, [0, 1])
    snap(store, r0, "j", 0, payload(0), rank=0)
    snap(store, r1, "j", 0, payload(0), rank=1)
    assert snap(store, r0, "j", 1, payload(1), rank=0) == (1, 0)  # rank 1 never seals step 1
    assert store.begin("j", 0, r0.lease, 2) == 1  # rank 0 moves on: slot 1 is rewritten
    write(r0, 1, 2, payload(2))  # ... and the daemon dies mid-copy
    new = shm.restart(store)
    assert new.adopt() == 1
    assert states(new, "j", 0)[1] == ("FREE", -1)
    # Were it SEALED, rank 1 sealing step 1 would make torn bytes restorable and free step 0.
    r1 = new.register("j", 1, 2, SLOT, PID, [0, 1])
    snap(new, r1, "j", 1, payload(1), rank=1)
    r0 = new.register("j", 0, 2, SLOT, PID, [0, 1])
    new.open_for_restore("j", 0, r0.lease, None)


@pytest.mark.parametrize("damage", ["magic", "checksum", "zeroed"])
def test_corrupt_header_is_rewritten_from_the_meta(shm: Shm, damage: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    data = payload(0)
    snap(store, reg, "j", 0, data)
    store.close()
    with open(reg.arena_path, "r+b") as fh:
        if damage == "zeroed":
            fh.write(bytes(fmt.HEADER_BYTES))
        else:
            fh.seek(0 if damage == "magic" else fmt.SLOT_DESC_OFFSET + 8)
            fh.write(b"\x55")
    with pytest.raises(ArenaFormatError):
        header(reg.arena_path)
    new = shm.store()
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert new.adopt() == 1
    assert "job=j rank=0 arena header unusable" in caplog.text
    h = header(reg.arena_path)
    assert (h.job, h.rank, h.slot_bytes) == ("j", 0, SLOT)
    assert (h.slots[0].state, h.slots[0].step) == (SlotState.RESTORABLE, 0)
    again = new.register("j", 0, 1, SLOT, PID, [0])
    assert new.open_for_restore("j", 0, again.lease, 0).slot == 0
    assert read(again, 0, len(data)) == data


@pytest.mark.parametrize("meta", [
    "{not json", "", json.dumps({"version": 99, "job": "j"}), json.dumps({"version": 1}),
    json.dumps({"version": 1, "job": "../evil", "world_size": 1, "local_ranks": [0],
                "restorable_step": None, "ranks": {}}),
    json.dumps({"version": 1, "job": "j", "world_size": 1, "local_ranks": [0],
                "restorable_step": 0, "ranks": {"0": {"slot_bytes": SLOT, "slots": [{}]}}}),
    json.dumps({"version": 1, "job": "j", "world_size": 1, "local_ranks": [0],
                "restorable_step": 0, "ranks": {"0": {"slot_bytes": SLOT, "slots": [
                    {"state": 9, "step": 0, "data_bytes": 0, "manifest_offset": 0,
                     "manifest_bytes": 0, "data_crc": 0, "manifest_crc": 0,
                     "generation": 0}]}}}),
    pytest.param("[1, 2]"),
    pytest.param("null"),
    pytest.param(json.dumps({"version": 1, "job": "j", "world_size": 1, "local_ranks": [0],
                             "restorable_step": None, "ranks": []})),
], ids=["garbage", "empty", "version", "no-job", "bad-name", "slot-fields", "slot-state",
        "not-an-object", "null", "ranks-list"])
def test_corrupt_meta_is_not_adopted(shm: Shm, meta: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    store.register("k", 0, 1, SLOT, PID, [0])
    store.close()
    meta_path = shm.path(fmt.meta_name(shm.prefix, "j"))
    with open(meta_path, "w") as fh:
        fh.write(meta)
    new = shm.store()
    with caplog.at_level(logging.ERROR, logger=STORE_LOG):
        assert new.adopt() == 1  # the sound job still is
    assert [j.job for j in new.jobs()] == ["k"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and meta_path in errors[0].getMessage()
    assert os.path.exists(reg.arena_path)  # left for an operator to look at


def test_meta_whose_slot_size_disagrees_is_not_adopted(shm: Shm,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store = shm.store()
    store.register("j", 0, 1, SLOT, PID, [0])
    store.close()
    meta_path = shm.path(fmt.meta_name(shm.prefix, "j"))
    with open(meta_path) as fh:
        meta = json.load(fh)
    meta["ranks"]["0"]["slot_bytes"] = 2 * SLOT
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    with caplog.at_level(logging.ERROR, logger=STORE_LOG):
        assert shm.store().adopt() == 0
    assert "slot size disagrees" in caplog.text


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_adoption_leaves_nothing_mapped(shm: Shm) -> None:
    store = shm.store()
    store.register("j", 0, 2, SLOT, PID, [0, 1])
    r1 = store.register("j", 1, 2, SLOT, PID, [0, 1])
    store.close()
    os.unlink(r1.arena_path)
    before = _open_fds()
    assert shm.store().adopt() == 0
    assert _open_fds() == before


def test_adoption_sees_only_its_own_prefix(shm: Shm) -> None:
    store = shm.store()
    store.register("j", 0, 1, SLOT, PID, [0])
    store.close()
    other = Store(shm.dir, shm.prefix + "x", BUDGET)
    try:
        assert other.adopt() == 0
    finally:
        other.close()


# --------------------------------------------------------------------------
# drop
# --------------------------------------------------------------------------


def test_drop_removes_the_files(shm: Shm) -> None:
    store = shm.store()
    r0 = store.register("j", 0, 2, SLOT, PID, [0, 1])
    store.register("j", 1, 2, 2 * SLOT, PID, [0, 1])
    snap(store, r0, "j", 0, payload(0), rank=0)
    keep = store.register("k", 0, 1, SLOT, PID, [0])
    assert store.drop("j") == (2, fmt.arena_bytes(SLOT) + fmt.arena_bytes(2 * SLOT))
    assert shm.files() == shm.job_files("k", 0)
    assert store.used_bytes() == keep.arena_bytes
    with pytest.raises(UnknownJobError):
        store.latest("j")
    with pytest.raises(UnknownJobError):
        store.drop("j")
    # The job starts over from nothing, even with another world size.
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    assert reg.restorable_step is None and snap(store, reg, "j", 0, payload(0)) == (0, 0)


# ------------------------------------------------------ what other users can plant
# Issue 15, items 4, 9 and 10: the shm directory is everyone's. Real symlinks planted at the
# daemon's names must never be written through; files of other users are never adopted.


def test_meta_is_never_written_through_a_planted_symlink(shm: Shm, tmp_path: Path) -> None:
    """The meta file was written through ``<meta>.tmp<thread id>`` with O_TRUNC: a symlink
    there made a root daemon truncate and overwrite the file it points at."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"root's file\n")
    meta = Path(shm.path(fmt.meta_name(shm.prefix, "j")))
    for name in (f"{meta}.tmp{threading.get_ident()}", str(meta),
                 fmt.arena_name(shm.prefix, "j", 0)):
        Path(shm.path(name)).symlink_to(precious)
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    assert precious.read_bytes() == b"root's file\n"
    assert not meta.is_symlink() and json.loads(meta.read_text())["restorable_step"] == 0
    assert not Path(reg.arena_path).is_symlink()


def test_an_arena_symlink_is_never_adopted(shm: Shm, tmp_path: Path) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    store.close()
    precious = tmp_path / "precious"
    precious.write_bytes(os.urandom(fmt.arena_bytes(SLOT)))  # the size an arena would have
    before = precious.read_bytes()
    os.unlink(reg.arena_path)
    os.symlink(precious, reg.arena_path)
    again = shm.store()
    assert again.adopt() == 0
    assert precious.read_bytes() == before  # no header written into it


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user needs root (chown)")
def test_a_meta_file_of_another_user_is_not_adopted(shm: Shm, caplog) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 0, payload(0))
    store.close()
    os.chown(shm.path(fmt.meta_name(shm.prefix, "j")), 65534, 65534)
    with caplog.at_level(logging.ERROR, STORE_LOG):
        assert shm.store().adopt() == 0
    assert "uid 65534" in caplog.text and "not trusted" in caplog.text


def test_leftover_temporaries_go_at_drop_and_at_restart(shm: Shm) -> None:
    """A ``*.meta.tmp<thread>`` left by an interrupted write (ENOSPC) used to survive both."""
    store = shm.store()
    for job in ("j", "k"):
        store.register(job, 0, 1, SLOT, PID, [0])
    meta_j, meta_k = (shm.path(fmt.meta_name(shm.prefix, job)) for job in ("j", "k"))
    for leftover in (f"{meta_j}.tmp140737", f"{meta_j}.0123456789abcdef.tmp",
                     f"{meta_k}.tmp99", f"{meta_k}.fedcba9876543210.tmp"):
        Path(leftover).write_bytes(b"half a meta")
    store.drop("j")
    assert shm.files() == sorted(shm.job_files("k", 0) + [os.path.basename(meta_k) + t for t in
                                                         (".fedcba9876543210.tmp", ".tmp99")])
    assert shm.restart(store).adopt() == 1
    assert shm.files() == shm.job_files("k", 0)


def test_ranks_may_agree_on_the_previous_step_which_rolls_the_node_back(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 3, payload(3))
    snap(store, reg, "j", 4, payload(4))
    assert store.latest("j") == 4 and store.job("j").previous_step == 3
    o = store.open_for_restore("j", 0, reg.lease, 3)
    assert o.record.step == 3 and read(reg, o.slot, o.record.data_bytes) == payload(3)
    store.release("j", 0, reg.lease, 3)
    assert store.latest("j") == 3 and store.job("j").previous_step is None
    # The job goes on from step 3: step 4 is taken again.
    assert snap(store, reg, "j", 4, payload(5))[1] == 4
    with pytest.raises(NotRestorableError, match="step 2 is not restorable"):
        store.open_for_restore("j", 0, reg.lease, 2)


def test_a_previous_step_being_overwritten_cannot_be_rolled_back_to(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    snap(store, reg, "j", 3, payload(3))
    snap(store, reg, "j", 4, payload(4))
    store.begin("j", 0, reg.lease, 5)  # overwrites step 3's slot
    with pytest.raises(NotRestorableError, match="step 3 is not restorable"):
        store.open_for_restore("j", 0, reg.lease, 3)


def test_a_client_that_checks_gets_the_seal_checksums_and_no_second_read(shm: Shm) -> None:
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot, _ = snap(store, reg, "j", 0, payload(0))
    flip(reg.arena_path, fmt.slot_offset(slot, reg.slot_bytes))
    o = store.open_for_restore("j", 0, reg.lease, None, client_checks=True)
    sealed = store.job("j").ranks[0].slots[slot]
    assert (o.record.data_crc, o.record.manifest_crc, o.check) == (sealed.data_crc, sealed.manifest_crc, True)
    assert not store.job("j").ranks[0].verifying  # the daemon does not read the slot
    store.release("j", 0, reg.lease, o.record.step)  # the client said nothing: no verdict here


@pytest.mark.parametrize("bad", [True, False])
def test_a_client_that_reports_corruption_gets_the_daemons_verdict(shm: Shm, bad: bool) -> None:
    """The client's check failed: bytes bad in the slot are marked corrupt (never served
    again); bytes sound there mean the client's copy went bad, and it may read again."""
    store = shm.store()
    reg = store.register("j", 0, 1, SLOT, PID, [0])
    slot, _ = snap(store, reg, "j", 0, payload(0))
    if bad:
        flip(reg.arena_path, fmt.slot_offset(slot, reg.slot_bytes) + 5)
    o = store.open_for_restore("j", 0, reg.lease, None, client_checks=True)
    if bad:
        with pytest.raises(CorruptionError, match="data checksum fails"):
            store.release("j", 0, reg.lease, o.record.step, corrupt=True)
        with pytest.raises(CorruptionError, match="failed their checksum"):
            store.open_for_restore("j", 0, reg.lease, None, client_checks=True)
    else:
        store.release("j", 0, reg.lease, o.record.step, corrupt=True)
        assert store.open_for_restore("j", 0, reg.lease, None, client_checks=True).record.step == 0
    assert store.job("j").ranks[0].pinned == ({} if bad else {slot: 0})


# --------------------------------------------------------------------------
# a rebuilt arena: one slot allocated at once, the other later
# --------------------------------------------------------------------------

def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _rebuilt(shm: Shm, slot_bytes: int) -> tuple[Store, SlotDesc, int, bytes]:
    """A source store's sealed slot of step 3, to install elsewhere: (store, record, used
    bytes, those bytes)."""
    src = shm.store()
    reg = src.register("a", 0, 1, slot_bytes, PID, [0])
    slot, _ = snap(src, reg, "a", 3, payload(3, 40 * fmt.PAGE))
    record = src.job("a").ranks[0].slots[slot]
    used = record.manifest_offset + record.manifest_bytes
    return src, record, used, read(reg, slot, used)


@pytest.mark.parametrize("trigger", ["restore", "begin"])
def test_a_rebuilt_arenas_other_slot_is_prepared_after_the_restore_and_named_lazy_until(
        shm: Shm, monkeypatch: pytest.MonkeyPatch, trigger: str) -> None:
    # The other slot is allocated and faulted in neither while the rebuild fills its
    # slot nor beside the trainer's restore: once the restore is released (or at the
    # first Begin, without one), on a thread of its own. A trainer registering before
    # that is told to map it lazily.
    slot_bytes = 64 * fmt.PAGE
    _, record, used, good = _rebuilt(shm, slot_bytes)
    started = threading.Event()
    real = Arena.prefault

    def seen(self: Arena, index: int, nbytes: int) -> None:
        started.set()
        real(self, index, nbytes)

    monkeypatch.setattr(Arena, "prefault", seen)
    dst = shm.store()
    dst.install("b", 1, [0], 0, slot_bytes, record, lambda dest: dest.write(
        0, good))
    arena = dst.job("b").ranks[0].arena
    size = fmt.arena_bytes(slot_bytes)
    assert arena.preparing() == (1,)
    assert allocated_bytes(arena.path) < size  # a hole still
    dst.set_restorable("b", 3)
    reg_b = dst.register("b", 0, 1, slot_bytes, PID, [0])
    assert reg_b.lazy_slots == (1,)
    if trigger == "restore":
        o = dst.open_for_restore("b", 0, reg_b.lease, None, client_checks=True)
        assert read(reg_b, o.slot, used) == good
        assert not started.is_set() and arena.preparing() == (1,)  # not beside the restore
        dst.release("b", 0, reg_b.lease, o.record.step)
    else:
        assert dst.begin("b", 0, reg_b.lease, 4) == 1
    assert arena.wait_prepared(30) and started.is_set()
    assert arena.preparing() == ()
    assert arena.allocated and allocated_bytes(arena.path) >= size
    assert dst.register("b", 0, 1, slot_bytes, PID, [0], force=True).lazy_slots == ()


@pytest.mark.parametrize("how", ["whole", "in-parts", "rewritten"])
def test_a_rebuilt_slot_is_checked_by_what_was_written(shm: Shm, how: str) -> None:
    # The data's checksum comes from the CRCs the writes were made with where they tile
    # the data exactly once; written again cut differently, the bytes are read back.
    # Either way the rank's snapshot is the source's, and a wrong byte is refused.
    slot_bytes = 64 * fmt.PAGE
    _, record, used, good = _rebuilt(shm, slot_bytes)
    raw = np.frombuffer(good, np.uint8)

    def fill(dest, spoil: bool = False) -> None:
        buf = raw.copy()
        if spoil:
            buf[record.data_bytes // 2] ^= 1
        if how == "whole":
            dest.write(0, buf)
        elif how == "in-parts":  # out of order, one write given its CRC
            dest.write(used // 3, buf[used // 3:], crc32c(buf[used // 3:]))
            dest.write(0, buf[:used // 3])
        else:  # a first pass cut one way, then all of it again cut another
            dest.write(0, buf[:100])
            dest.write(100, buf[100:])
            dest.write(0, buf[:5000])
            dest.write(5000, buf[5000:])

    bad = shm.store()
    with pytest.raises(CorruptionError, match="data checksum fails"):
        bad.install("b", 1, [0], 0, slot_bytes, record, lambda d: fill(d, spoil=True))
    dst = shm.store()
    dst.install("b", 1, [0], 0, slot_bytes, record, fill)
    dst.set_restorable("b", 3)
    reg_b = dst.register("b", 0, 1, slot_bytes, PID, [0])
    o = dst.open_for_restore("b", 0, reg_b.lease, None, client_checks=True)
    assert read(reg_b, o.slot, used) == good


def test_a_rebuild_without_room_in_the_shm_dir_is_a_no_space_error(tmp_path: Path) -> None:
    # The rebuilt slot's pages are allocated as they are written (pwrite): a tmpfs that
    # fills up meanwhile answers ENOSPC, a typed NoSpaceError here (a store through a
    # mapping would have been a SIGBUS); the slot is not installed, and once there is
    # room the same rebuild succeeds.
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tiny)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    src_shm, dst_shm = Shm(tmp_path), Shm(tiny)
    try:
        slot_bytes = 256 * fmt.PAGE  # 1 MiB
        src = src_shm.store()
        reg = src.register("a", 0, 1, slot_bytes, PID, [0])
        slot, _ = snap(src, reg, "a", 3, payload(3, 200 * fmt.PAGE))
        record = src.job("a").ranks[0].slots[slot]
        used = record.manifest_offset + record.manifest_bytes
        good = read(reg, slot, used)
        filler = tiny / "filler"
        with open(filler, "wb", buffering=0) as fh:  # all but 100 pages, as a neighbour would
            fh.write(b"\0" * (2 * 1024 * 1024 - 100 * fmt.PAGE))
        dst = dst_shm.store()
        with pytest.raises(NoSpaceError):
            dst.install("b", 1, [0], 0, slot_bytes, record,
                        lambda d: [d.write(o, good[o:o + 65536]) for o in range(0, used, 65536)])
        assert dst.job("b").restorable_step is None
        filler.unlink()
        dst.install("b", 1, [0], 0, slot_bytes, record, lambda d: d.write(0, good))
        dst.set_restorable("b", 3)
        reg_b = dst.register("b", 0, 1, slot_bytes, PID, [0])
        o = dst.open_for_restore("b", 0, reg_b.lease, None, client_checks=True)
        assert read(reg_b, o.slot, used) == good
    finally:
        for store in src_shm.stores + dst_shm.stores:
            store.close()
        subprocess.run(["umount", "--lazy", str(tiny)], capture_output=True, timeout=30)


def test_a_rebuilt_arena_without_room_for_its_other_slot(shm: Shm,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The rebuild still succeeds; the hole is known after a restart, and the trainer's
    # first Begin allocates it before handing a slot out.
    slot_bytes = 64 * fmt.PAGE
    _, record, used, good = _rebuilt(shm, slot_bytes)
    real = Arena.ensure_allocated

    def no_room(self: Arena) -> None:
        raise NoSpaceError("no room (test)")

    monkeypatch.setattr(Arena, "ensure_allocated", no_room)
    dst = shm.store()
    dst.install("b", 1, [0], 0, slot_bytes, record, lambda dest: dest.write(
        0, good))
    arena = dst.job("b").ranks[0].arena
    arena.start_preparing()  # as the trainer's restore would: it finds no room
    assert arena.wait_prepared(30)
    monkeypatch.setattr(Arena, "ensure_allocated", real)
    size = fmt.arena_bytes(slot_bytes)
    # The header and the rebuilt slot are allocated (the snapshot's pages as written); the
    # second slot is a hole.
    assert not arena.allocated
    assert fmt.arena_bytes(slot_bytes, 1) <= allocated_bytes(arena.path) < size
    dst.set_restorable("b", 3)
    # Adopted by a restarted daemon before the rest was allocated: it knows the hole.
    dst = shm.restart(dst)
    assert dst.adopt() >= 1
    assert not dst.job("b").ranks[0].arena.allocated
    # The trainer's first Begin allocates it before handing a slot out...
    reg_b = dst.register("b", 0, 1, slot_bytes, PID, [0])
    assert dst.begin("b", 0, reg_b.lease, 4) == 1
    arena = dst.job("b").ranks[0].arena
    assert arena.allocated and allocated_bytes(arena.path) >= size
    # ...and the restorable step's bytes are the source's.
    assert read(reg_b, 0, used) == good


def test_a_begin_waits_for_the_other_slots_allocation_not_for_its_faulting(
        shm: Shm, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's first snapshot after a rebuild: its Begin needs the slot allocated
    # (nothing may write a tmpfs hole), not faulted in. A Begin that came while the
    # preparation was allocating once stayed blocked through the faulting as well, the
    # lock being taken again at once for it (snapshot() calls of 2.4-2.6 s, bench_cluster).
    slot_bytes = 64 * fmt.PAGE
    _, record, used, good = _rebuilt(shm, slot_bytes)
    dst = shm.store()
    dst.install("b", 1, [0], 0, slot_bytes, record, lambda dest: dest.write(
        0, good))
    dst.set_restorable("b", 3)
    reg_b = dst.register("b", 0, 1, slot_bytes, PID, [0])
    arena = dst.job("b").ranks[0].arena
    allocating, allocate, faulting, fault = (threading.Event() for _ in range(4))
    real_fallocate, real_populate = os.posix_fallocate, hostmem.populate

    def slow_fallocate(fd: int, off: int, n: int) -> None:
        allocating.set()
        assert allocate.wait(60)
        real_fallocate(fd, off, n)

    def held_populate(addr: int, n: int) -> bool:
        faulting.set()
        assert fault.wait(60)
        return real_populate(addr, n)

    monkeypatch.setattr(arena_mod.os, "posix_fallocate", slow_fallocate)
    monkeypatch.setattr(arena_mod.hostmem, "populate", held_populate)
    arena.start_preparing()
    assert allocating.wait(30)
    got: list[int] = []
    begin = threading.Thread(target=lambda: got.append(dst.begin("b", 0, reg_b.lease, 4)))
    begin.start()
    begin.join(0.5)
    assert begin.is_alive()  # waits for the allocation...
    allocate.set()
    assert faulting.wait(30)
    begin.join(30)
    try:
        assert not begin.is_alive() and got == [1]  # ...not for the faulting
        assert arena.preparing() == (1,)
    finally:
        fault.set()
    assert arena.wait_prepared(30) and arena.preparing() == ()
