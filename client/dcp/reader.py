"""DCP's StorageReader from shardguard, at the old world size or any other (see the
package's docstring for the load path and its limits)."""

from __future__ import annotations

import io
import os
import uuid
from collections import ChainMap
from typing import Any

from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from shardguard.client.agreement import all_gather, error_words, raise_any
from shardguard.client.client import Client
from shardguard.client.dcp.connect import reader_group
from shardguard.client.dcp.exchange import Box, Boxes
from shardguard.client.dcp.items import FORMAT, ItemKey, key, parse_step, summary, write_item
from shardguard.client.dcp.resharding import Held, restore_foreign
from shardguard.client.membership import detect_job
from shardguard.client.session import DEFAULT_TIMEOUT_S
from shardguard.proto.errors import NotRestorableError, RestoreError
from shardguard.proto.paths import default_socket_path


class ShardguardReader(StorageReader):
    """DCP's StorageReader from shardguard, at the old world size or any other.

    Args:
        source: the job's own :class:`Client` (same world size: each rank restores its
            own snapshot), or the name of the job to read (any world size; no live
            process may hold its ranks), or None for the job in the environment.
        step: a step to load (it must be restorable); default: the newest. A
            ``checkpoint_id`` given to ``dcp.load`` overrides it.
        socket: the daemon's socket, for a job named by ``source``.
        group: the gloo group the reader's own collectives run on (every rank of the
            load, in rank order); default: the client's group, else the default group if
            it is gloo, else one new gloo group per process.
        allow_pickle: let pickled ``planner_data`` be loaded (DefaultSavePlanner's is
            plain data).
    """

    def __init__(self, source: Client | str | None = None, *, step: int | None = None,
                 socket: str | None = None, group: Any = None,
                 allow_pickle: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self.client = source if isinstance(source, Client) else None
        self.job = self.client.job if self.client is not None else (source or detect_job())
        self.socket = (self.client.socket_path if self.client is not None
                       else socket or default_socket_path())
        self.step = step
        self.allow_pickle = allow_pickle
        self.timeout_s = timeout_s
        if group is None and self.client is not None:
            group = self.client.group
        self._group = reader_group(group)
        #: The step the last load read.
        self.loaded_step: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._held: Held | None = None
        self._metadata: Metadata | None = None
        # (fqn, offset) -> (old rank, item position); old rank -> the new rank holding it.
        self._where: dict[ItemKey, tuple[int, int]] = {}
        self._owner: dict[int, int] = {}
        self._items: dict[tuple[int, int], dict[str, Any]] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.step = parse_step(checkpoint_id)
        self._reset()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP's fallback for checkpoints saved without collectives: never ours.
            raise NotRestorableError("shardguard DCP checkpoints have one global metadata")
        if self._metadata is not None:
            return self._metadata
        if self.client is not None:
            # Collective, with one outcome on every rank.
            step, state = self.client.restore(self.step, map_location="cpu",
                                              allow_pickle=self.allow_pickle)
            held: Held | None = Held(step, self.client.world_size, {self.client.rank: state})
            error: BaseException | None = None
        else:
            held, error = restore_foreign(self.job, self.socket, self._group, self.step,
                                          allow_pickle=self.allow_pickle,
                                          timeout_s=self.timeout_s)
        # Every rank learns every old rank's item list (not its bytes), or every error.
        mine = {"error": error_words(error),
                "ranks": {} if held is None else {q: summary(s) for q, s in held.states.items()}}
        everyone = all_gather(mine, self._group)
        raise_any([m["error"] for m in everyone], f"job {self.job}: DCP restore failed", error)
        assert held is not None
        self._held = held
        self._metadata = self._index(everyone, held)
        self.loaded_step = held.step
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self._held is None:
            raise RestoreError("read_data before read_metadata")
        error, wanted, holders = None, {}, []
        try:
            wanted, holders = self._requests(plan.items)
        except Exception as exc:  # noqa: BLE001 - every rank raises it below
            error = exc
        asked = all_gather({"error": error_words(error), "wanted": wanted}, self._group)
        raise_any([a["error"] for a in asked], f"job {self.job}: DCP load plan failed", error)
        pieces = Boxes(self._held, self._items).exchange([a["wanted"] for a in asked], holders,
                                                         self._group)
        for req, piece in zip(plan.items, pieces):
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(piece))
                continue
            target = planner.resolve_tensor(req).detach()
            if target.size() != piece.size():
                raise RestoreError(f"{req.storage_index.fqn}: read {tuple(piece.size())}, the "
                                   f"plan wants {tuple(target.size())}")
            target.copy_(piece)
            planner.commit_tensor(req, target)
        # The restored snapshots are not needed past this load; a next load reads afresh.
        self._reset()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False

    # ------------------------------------------------------------ metadata

    def _index(self, everyone: list[dict[str, Any]], held: Held) -> Metadata:
        """DCP's Metadata from every old rank's items; where each chunk is, who holds it."""
        described: dict[int, dict[str, Any]] = {}
        for new_rank, m in enumerate(everyone):
            for q, d in m["ranks"].items():
                if d["format"] != FORMAT:
                    raise RestoreError(f"job {self.job} rank {q}: not a DCP snapshot "
                                       f"(format {d['format']!r})")
                described[q] = d
                self._owner[q] = new_rank
        missing = sorted(set(range(held.world)) - set(described))
        if missing or any(d["world"] != held.world for d in described.values()):
            raise RestoreError(f"job {self.job} step {held.step}: old ranks {missing} of a "
                               f"world of {held.world} were restored by no rank")
        plans = []
        for q in range(held.world):
            d = described[q]
            plans.append(SavePlan([write_item(x) for x in d["items"]],
                                  planner_data=d["planner_data"]))
            for pos, x in enumerate(d["items"]):
                self._where[(x["fqn"], None if x["offset"] is None else tuple(x["offset"]))] = \
                    (q, pos)
                self._items[(q, pos)] = x
        # Old ranks in rank order, items in plan order: the chunk lists (and index hints)
        # come out as DCP made them at save.
        _, metadata = create_default_global_save_plan(plans)
        datas = [p.planner_data for p in plans if p.planner_data is not None]
        if datas:
            metadata.planner_data = dict(ChainMap(*datas))  # as DefaultSavePlanner merges
        metadata.storage_data = {MetadataIndex(fqn, off): q
                                 for (fqn, off), (q, _) in self._where.items()}
        metadata.storage_meta = StorageMeta(
            checkpoint_id=f"shardguard://{self.job}/{held.step}", load_id=uuid.uuid4().hex)
        return metadata

    def _requests(self, items: list[ReadItem]) -> tuple[dict[int, list[Box]], list[int]]:
        """Per holding rank, the boxes this rank reads from it (in plan order), and the
        holder of each plan item."""
        wanted: dict[int, list[Box]] = {}
        holders = []
        for req in items:
            where = self._where.get(key(req.storage_index))
            if where is None:
                raise RestoreError(f"{req.storage_index}: no old rank wrote it")
            q, pos = where
            holder = self._owner[q]
            wanted.setdefault(holder, []).append(
                (q, pos, list(req.storage_offsets), list(req.lengths),
                 req.type == LoadItemType.BYTE_IO))
            holders.append(holder)
        return wanted, holders
