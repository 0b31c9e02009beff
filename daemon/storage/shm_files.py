"""The store's files in shm: a meta file per job and an arena per rank, how they are
written, and how a restarted daemon reads them back (the store: storage/store.py).

Every change that must survive a daemon crash (arenas, seals, the restorable step) is
written to the job's meta file, replaced atomically; each arena's header mirrors its
slots for tools that read the arena alone. Nothing planted at a name in a shared shm
dir is followed or mapped (proto/safefile.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from typing import Any

from shardguard.daemon.errors import ArenaFormatError, UnsafePathError
from shardguard.daemon.storage.arena import Arena
from shardguard.daemon.storage.records import (
    MAX_WORLD,
    JobRecord,
    RankRecord,
    check_job,
)
from shardguard.proto import arena as fmt
from shardguard.proto import safefile
from shardguard.proto.arena import SlotState
from shardguard.proto.meta import Topology, slot_from_doc

logger = logging.getLogger(__name__)

META_VERSION = 1
#: A meta file's temporary as versions before issue 15 named it (after the writing thread).
_LEGACY_TMP = re.compile(r"\.meta\.tmp\d+$")


class ShmFiles:
    """The files of one daemon: those in ``shm_dir`` whose names start with ``prefix``."""

    def __init__(self, shm_dir: str, prefix: str) -> None:
        self.shm_dir = shm_dir
        self.prefix = prefix

    # ------------------------------------------------------------- writing

    def meta_path(self, job: str) -> str:
        return os.path.join(self.shm_dir, fmt.meta_name(self.prefix, job))

    def persist(self, rec: JobRecord) -> None:
        """Write the job's meta file atomically (a new file, then renamed over the old one;
        nothing planted at either name is followed, proto/safefile.py)."""
        doc: dict[str, Any] = {
            "version": META_VERSION, "job": rec.job, "world_size": rec.world_size,
            "local_ranks": list(rec.local_ranks), "restorable_step": rec.restorable_step,
            "previous_step": rec.previous_step,
            "topology": rec.topology.to_doc() if rec.topology is not None else None,
            "epoch": rec.epoch,
            "written": time.time(),
            "ranks": {str(r): {"slot_bytes": rr.slot_bytes,
                               "slots": [_slot_doc(s) for s in rr.slots]}
                      for r, rr in rec.ranks.items()},
        }
        safefile.write_atomic(self.meta_path(rec.job), json.dumps(doc).encode())

    def write_header(self, rec: JobRecord, rr: RankRecord) -> None:
        rr.arena.write_header(fmt.Header(rr.slot_bytes, rr.rank, rec.world_size, rec.job,
                                         tuple(rr.slots)))

    def sync(self, rec: JobRecord, rr: RankRecord) -> None:
        """The meta file, then ``rr``'s header."""
        self.persist(rec)
        self.write_header(rec, rr)

    def sync_all(self, rec: JobRecord) -> None:
        """The meta file, then every rank's header."""
        self.persist(rec)
        for rr in rec.ranks.values():
            self.write_header(rec, rr)

    def remove_meta(self, job: str) -> None:
        _unlink(self.meta_path(job))

    # -------------------------------------------------------------- arenas

    def new_rank(self, rec: JobRecord, rank: int, slot_bytes: int,
                 slots_now: int | None = None) -> RankRecord:
        """A new arena for ``rank``, every slot free; ``slots_now``: allocate only the
        first slots now (Arena.create)."""
        path = os.path.join(self.shm_dir, fmt.arena_name(self.prefix, rec.job, rank))
        safefile.remove(path)  # a stale file the meta no longer knows of
        header = fmt.Header(slot_bytes, rank, rec.world_size, rec.job,
                            tuple(fmt.SlotDesc() for _ in range(fmt.NSLOTS)))
        arena = Arena.create(path, header, slots_now)
        return RankRecord(rank, arena, slot_bytes, [fmt.SlotDesc() for _ in range(fmt.NSLOTS)])

    def grow(self, rec: JobRecord, rr: RankRecord, slot_bytes: int) -> RankRecord:
        """A bigger arena, keeping the restorable slot's bytes in the same slot index."""
        tmp = safefile.temp_path(rr.arena.path)
        header = fmt.Header(slot_bytes, rr.rank, rec.world_size, rec.job,
                            tuple(fmt.SlotDesc() for _ in range(fmt.NSLOTS)))
        arena = Arena.create(tmp, header)
        slots = [fmt.SlotDesc() for _ in range(fmt.NSLOTS)]
        try:
            for i, s in enumerate(rr.slots):
                if s.state == SlotState.RESTORABLE:
                    used = s.manifest_offset + s.manifest_bytes
                    arena.slot(i, slot_bytes)[:used] = rr.arena.slot(i, rr.slot_bytes)[:used]
                    slots[i] = s
            safefile.replace(tmp, rr.arena.path)
        except BaseException:
            arena.unlink()
            raise
        arena.path = rr.arena.path
        rr.arena.close()
        logger.info("grew arena: slot_bytes %d -> %d", rr.slot_bytes, slot_bytes,
                    extra={"job": rec.job, "rank": rr.rank})
        return RankRecord(rr.rank, arena, slot_bytes, slots)

    def remove_leftovers(self, names: str) -> list[str]:
        """Remove the temporaries of this daemon's user that a write cut short left (ENOSPC,
        a crash) among the files whose names start with ``names``: this version's, and the
        ``<meta>.tmp<thread id>`` of older ones. Returns their paths."""
        removed = safefile.clean_temps(self.shm_dir, names)
        for name in os.listdir(self.shm_dir):
            path = os.path.join(self.shm_dir, name)
            try:
                if name.startswith(names) and _LEGACY_TMP.search(name) \
                        and os.lstat(path).st_uid == os.geteuid():
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                continue  # gone meanwhile, or not ours to remove
        return removed

    # ------------------------------------------------------------ adoption

    def meta_paths(self) -> list[str]:
        """The meta files of this daemon's prefix, sorted."""
        pattern = os.path.join(self.shm_dir, glob.escape(self.prefix) + ".*.meta")
        return sorted(glob.glob(pattern))

    def load(self, meta_path: str) -> JobRecord:
        """The job a meta file describes, its arenas mapped (a restarted daemon's view).

        Raises:
            ValueError, OSError, ArenaFormatError, UnsafePathError: the job cannot be
                adopted; nothing of it stays mapped.
        """
        # Only a regular file of this daemon's user, never through a symlink: in a shared
        # shm dir anyone can create a file at the name of a job's meta file.
        meta = json.loads(safefile.read_owned(meta_path))
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
            raise ValueError(f"not a version {META_VERSION} meta file")
        job = meta["job"]
        check_job(job)
        named = os.path.basename(meta_path)[len(self.prefix) + 1:-len(".meta")]
        if job != named:
            raise ValueError(f"the file of job {named!r} describes job {job!r}")
        _check_meta_types(meta)
        rec = JobRecord(job, int(meta["world_size"]), tuple(meta["local_ranks"]),
                        restorable_step=meta["restorable_step"],
                        previous_step=meta.get("previous_step"),
                        topology=Topology.from_doc(meta["topology"]) if meta.get("topology")
                        else None, epoch=meta.get("epoch", 0))
        try:
            self._load_ranks(rec, meta)
        except BaseException:
            for rr in rec.ranks.values():
                rr.arena.close()
            raise
        return rec

    def _load_ranks(self, rec: JobRecord, meta: dict[str, Any]) -> None:
        job = rec.job
        for key, rm in meta["ranks"].items():
            rank = int(key)
            path = os.path.join(self.shm_dir, fmt.arena_name(self.prefix, job, rank))
            try:
                arena, header = Arena.adopt(path)
            except UnsafePathError:
                raise  # a symlink or another user's file: never mapped, never written
            except (OSError, ArenaFormatError) as exc:
                # The header is only a mirror: rebuild it from the meta when the file is sound.
                logger.warning("job=%s rank=%d arena header unusable (%s); rewriting it",
                               job, rank, exc, extra={"job": job, "rank": rank})
                arena = _remap(path, int(rm["slot_bytes"]))
                header = None
            # What was being written is not worth keeping: after a crash the slot is free.
            slots = [s.freed() if s.state == SlotState.WRITING else s
                     for s in map(slot_from_doc, rm["slots"])]
            if header is not None and header.slot_bytes != int(rm["slot_bytes"]):
                arena.close()
                raise ArenaFormatError(f"arena {path} slot size disagrees with the meta file")
            rr = RankRecord(rank, arena, int(rm["slot_bytes"]), slots)
            rec.ranks[rank] = rr
            self.write_header(rec, rr)


def _slot_doc(s: fmt.SlotDesc) -> dict[str, int]:
    # A slot being written is not worth remembering: after a crash it is free.
    return (s.freed() if s.state == SlotState.WRITING else s).to_doc()


def _check_meta_types(meta: dict[str, Any]) -> None:
    """A meta file's fields have the types the store relies on (else ValueError)."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(meta.get("world_size")) or not 1 <= meta["world_size"] <= MAX_WORLD:
        raise ValueError("world_size is not a world size")
    for key in ("restorable_step", "previous_step"):
        if meta.get(key) is not None and not is_int(meta[key]):
            raise ValueError(f"{key} is not an integer")
    if not is_int(meta.get("epoch", 0)) or meta.get("epoch", 0) < 0:
        raise ValueError("epoch is not a launch number")
    local = meta.get("local_ranks")
    if not isinstance(local, list) or not all(is_int(r) for r in local):
        raise ValueError("local_ranks is not a list of ranks")
    topo = meta.get("topology")
    if topo is not None and not (isinstance(topo, dict) and isinstance(topo.get("nodes"), list)
                                 and is_int(topo.get("node_index"))
                                 and is_int(topo.get("group_size")) and is_int(topo.get("parity"))):
        raise ValueError("topology is malformed")
    if not isinstance(meta.get("ranks"), dict):
        raise ValueError("ranks is not a table")


def _remap(path: str, slot_bytes: int) -> Arena:
    fd = safefile.open_owned(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    if size != fmt.arena_bytes(slot_bytes):
        os.close(fd)
        raise ArenaFormatError(f"arena {path} size {size} does not match the meta file")
    return Arena(path, fd, size)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
