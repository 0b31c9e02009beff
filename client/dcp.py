"""torch.distributed.checkpoint (DCP) on shardguard: a StorageWriter, a StorageReader, and
helpers that turn sharded (DTensor) state into plain state and back.

    client = sg.connect_dcp()            # its own gloo group: safe for dcp.async_save
    dcp.save(state, checkpoint_id=step, storage_writer=sg.ShardguardWriter(client))
    dcp.load(state, storage_reader=sg.ShardguardReader(client))      # same world size
    dcp.load(state, storage_reader=sg.ShardguardReader("run-w4"))    # any world size

**Save.** DCP plans with its own collectives, then calls ``write_data`` on every
rank, in the same order, between the plan scatter and the result gather. That is
where each rank takes its snapshot (``Client.snapshot``, whose one collective every
rank then enters in the same place). A rank's snapshot holds the bytes of the items
of its final plan (tensor chunks as DCP resolved them, BYTE_IO items as bytes), a
plain-data description of each item (fqn, offsets, chunk box, dtype, global size)
and its plan's ``planner_data``. Nothing is written after the snapshot: at load, the
reader rebuilds DCP's ``Metadata`` from every old rank's descriptions with DCP's own
``create_default_global_save_plan`` (the function ``DefaultSavePlanner`` derives it
with), so the coordinator's ``finish`` has nothing left to store and no rank is
special. ``write_data`` first waits for the writer's previous step to be restorable,
so every rank agrees to take the step (``dcp.save`` saves or raises, it never skips),
and returns once the bytes are in the node's shared memory: the caller may change
the state afterwards; protection across nodes finishes in the background
(``client.wait(restorable=True)``).

**async_save.** DCP runs ``write_data`` on its own thread, and with it the client's
collective: the client's group must not be one the training loop uses meanwhile.
:func:`connect_dcp` gives the client a gloo group of its own; pass the same group to
``async_save(process_group=...)``, DCP's collectives then run on it from the same
thread, in order. A writer whose client agrees on the default group refuses to run
off the main thread (every rank raises the same error; nobody hangs).

**Load, and another world size.** DCP's metadata maps every chunk to the old rank
that wrote it, and any new rank may need any chunk. The reader restores each old
rank's snapshot once, from the daemon of the node that holds it, on one new rank of
that node, then moves exactly the boxes DCP's load plan asks for between new ranks
with one ``all_to_all`` over a gloo group. Two ways to get the old ranks:

- ``ShardguardReader(client)``: the job's own client, same world size; every rank
  restores its own snapshot (``client.restore``: one agreed step, one outcome).
- ``ShardguardReader("job")``: any world size. A daemon keeps a job's world size
  for the job's life (it refuses the job's snapshots to a world of another size),
  so a resized run trains under a new job name (``<name>-w<world>``;
  :func:`newest_job` finds the newest) and reads the old one: each new rank asks its
  daemon which old ranks it holds; a node's old ranks are spread over the new ranks
  on that node, which register as those ranks (with the old job's world size, node
  list and erasure code, so the daemon's record of the job is unchanged), restore
  them and let go.

**Limits.** A job holds one checkpoint: its newest restorable step (and, while its
slots are intact, the one before); ``checkpoint_id`` names the step to save as, not a
place that keeps it, so a history of checkpoints needs a second writer (files) every
so often. A resharding load reads old ranks through /dev/shm, so every node of
the old job must have its daemon up (with its ranks, rebuilt if it was replaced) and
at least one new rank: resize on the same nodes; a lost node is rebuilt by resuming
at the old world size first. A new rank holds the old ranks it restored while the
load runs (about ``old world / new world`` of its share, plus the exchange buffers).
Every rank of the client's world takes part in every save, and DCP's process group
must hold them in the same rank order (no HSDP replica-only saves); one save at a
time per client (wait for an ``async_save``'s future before the next save); the
writer stays in its process (``async_save``'s thread executor, not the process one). Planners that
put more into ``Metadata`` than ``state_dict_metadata`` and ``planner_data`` are not
reproduced. DCP itself unpickles BYTE_IO items (``torch.load(weights_only=False)``),
as it does from files: a DCP load trusts the checkpoint's writer, unlike
``client.restore`` with ``allow_pickle=False``.

**Sharded state through the native client.** ``client.snapshot`` stores dense
tensors; a DTensor is not one (its bytes live on many ranks). The native path goes
through :func:`sharded_state_dict_to_local` (each DTensor becomes its local shard
plus its placements, global shape and mesh, as plain data) and
:func:`sharded_state_dict_from_local`; it restores on the same world and mesh only.
Resharding is the DCP path's job.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
import uuid
from collections import ChainMap, OrderedDict
from dataclasses import dataclass
from socket import gethostname
from typing import Any

import grpc
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.futures import Future

from shardguard.proto.state_layout import TORCH_DTYPES
from shardguard.client.client import (
    DEFAULT_TIMEOUT_S,
    Client,
    _detect_job,
    _detect_rank_world,
    _membership,
)
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import (
    NotRestorableError,
    RankClaimedError,
    RestoreError,
    ShardguardError,
    UnknownJobError,
    error_from_rpc,
)
from shardguard.proto.paths import default_socket_path, grpc_target

logger = logging.getLogger(__name__)

#: The ``format`` of a rank's DCP snapshot; a reader refuses anything else.
FORMAT = "shardguard-dcp/1"
#: Pieces of the all_to_all buffers start at multiples of this, so that every
#: received piece can be viewed as its dtype in place.
_ALIGN = 64
_DTENSOR_KEY = "__sg_dtensor__"

_gloo_group: Any = None


# --------------------------------------------------------------- connecting


def connect_dcp(socket: str | None = None, job: str | None = None, *, group: Any = None,
                allow_pickle: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                group_size: int = 0, parity: int = 0) -> Client:
    """:func:`shardguard.client.connect`, with the client agreeing on ``group``.

    ``group`` (default: a new gloo group of every rank) must not be used by the
    training loop while a ``dcp.async_save`` runs; pass the same group as
    ``async_save``'s ``process_group``. Collective, like ``connect``.
    """
    socket_path = socket or default_socket_path()
    job = job or _detect_job()
    rank, world = _detect_rank_world()
    if group is None and dist.is_available() and dist.is_initialized() and world > 1:
        group = dist.new_group(backend="gloo")
    local, nodes, node_index, (group_size, parity) = _membership(
        group, socket_path, rank, timeout_s, (group_size, parity))
    return Client(socket_path, job, rank, world, group=group, local_ranks=local,
                  allow_pickle=allow_pickle, timeout_s=timeout_s, nodes=nodes,
                  node_index=node_index, group_size=group_size, parity=parity)


def newest_job(prefix: str, socket: str | None = None, *, group: Any = None) -> str | None:
    """The job named ``prefix...`` with the newest restorable step on the ranks' daemons.

    A job counts when every daemon that holds it has a restorable step; its step is the
    oldest of theirs. The same answer on every rank (collective over ``group``,
    default: the gloo group the readers use).
    """
    mine: dict[str, int] = {}
    try:
        reply = _status(socket or default_socket_path(), "")
        for js in reply.jobs:
            if js.job.startswith(prefix):
                mine[js.job] = js.restorable_step if js.HasField("restorable_step") else -1
    except ShardguardError as exc:
        logger.warning("newest_job(%s): daemon not reachable: %s", prefix, exc)
    steps: dict[str, int] = {}
    for seen in _all_gather(mine, _reader_group(group)):
        for job, step in seen.items():
            steps[job] = min(step, steps.get(job, step))
    found = [(step, job) for job, step in steps.items() if step >= 0]
    return max(found)[1] if found else None


def drop_job(job: str, socket: str | None = None) -> int:
    """Free ``job`` on every node that holds it (``shardguard drop``); returns arenas freed."""
    with grpc.insecure_channel(grpc_target(socket or default_socket_path())) as ch:
        try:
            reply = pb_grpc.AgentStub(ch).Drop(pb.DropRequest(job=job, everywhere=True),
                                               timeout=DEFAULT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
    return reply.arenas_freed


# ------------------------------------------------------------------- writer


def _parse_step(checkpoint_id: Any) -> int:
    """A step from a checkpoint_id: an int, or a name ending in digits (``.../step-100``)."""
    if isinstance(checkpoint_id, int):
        return checkpoint_id
    m = re.search(r"(\d+)$", str(os.fspath(checkpoint_id)).rstrip("/"))
    if m is None:
        raise ValueError(f"checkpoint_id {checkpoint_id!r} names no step: pass an int or a "
                         "name ending in the step (e.g. 'step-100')")
    return int(m.group(1))


class _Refused:
    """What a rank snapshots when it could not build its state: the client refuses it,
    so the rank still enters the snapshot's agreement and every rank gets the error."""


class ShardguardWriter(StorageWriter):
    """DCP's StorageWriter into shardguard: each rank snapshots its items as one step.

    Args:
        client: the rank's client (:func:`connect_dcp`; ``sg.connect()`` is fine for
            synchronous saves), or the daemon's socket path (None: the default one) to
            connect a client with :func:`connect_dcp`, which :meth:`close` then closes.
        step: the step to save as; a ``checkpoint_id`` given to ``dcp.save`` (an int, or
            a name ending in digits) overrides it.
        job: the job for a client this writer connects.
        allow_pickle: let items or ``planner_data`` that are not plain data be pickled.
        wait_restorable: return from ``write_data`` only once the step is restorable
            (protected on every node), not as soon as its bytes are copied.
        protect_timeout_s: how long to wait for the previous step to become restorable
            before taking the next one anyway (default: the client's).
    """

    def __init__(self, client: Client | str | None = None, *, step: int | None = None,
                 job: str | None = None, allow_pickle: bool = False,
                 wait_restorable: bool = False,
                 protect_timeout_s: float | None = None) -> None:
        super().__init__()
        self._owned = not isinstance(client, Client)
        self.client = client if isinstance(client, Client) else connect_dcp(client, job)
        self.step = step
        self.allow_pickle = allow_pickle
        self.wait_restorable = wait_restorable
        self.protect_timeout_s = (self.client.protect_timeout_s if protect_timeout_s is None
                                  else protect_timeout_s)
        self._written: int | None = None

    def close(self) -> None:
        if self._owned:
            self.client.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a ShardguardWriter stays in its process (its client holds the rank's "
                        "lease and arena): use async_save's thread executor (the default), "
                        "not AsyncCheckpointerType.PROCESS")

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.step = _parse_step(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # Raised here, inside DCP's planning step, every rank learns of it through the
        # plan gather; no collective of ours has started yet.
        if self.step is None:
            raise ValueError("ShardguardWriter needs a step: dcp.save(..., checkpoint_id=step) "
                             "or ShardguardWriter(client, step=step)")
        if self._written is not None and self.step <= self._written:
            raise ValueError(f"step {self.step} is not after step {self._written}, the last "
                             "one this writer saved")
        rank = kwargs.get("rank")
        if rank is not None and rank != self.client.rank:
            raise ValueError(f"DCP's rank {rank} is not the client's rank {self.client.rank}: "
                             "DCP's process group must hold the client's world in rank order")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"shardguard://{self.client.job}/{self.step}",
                           save_id=uuid.uuid4().hex)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        assert self.step is not None
        step, client = self.step, self.client
        self._check_thread()
        error: BaseException | None = None
        try:
            state, results = self._state(plan, planner)
        except Exception as exc:  # noqa: BLE001 - re-raised after the agreement below
            error, state, results = exc, {"refused": _Refused()}, []
        self._wait_previous()
        try:
            handle = client.snapshot(step, state, allow_pickle=False if error else
                                     self.allow_pickle)
        except (TypeError, ShardguardError):
            if error is not None:
                raise error from None
            raise
        if handle.skipped:
            raise ShardguardError(
                f"job {client.job} step {step}: snapshot skipped on every rank (a daemon is "
                f"restarting or a node is down); the checkpoint was not saved")
        # The state may change as soon as we return: wait until its bytes are copied
        # (CUDA copies: make the caller's stream wait for them instead).
        handle.wait_copied()
        if handle._cuda_event is not None:
            torch.cuda.current_stream().wait_event(handle._cuda_event)
        if self.wait_restorable:
            # Every rank waits here, in write_data, with no collective pending: each seals
            # on its own, so none waits on one that cannot get here.
            client.wait(restorable=True, timeout=self.protect_timeout_s)
        self._written = step
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # What a file writer stores here, every rank's snapshot already holds: this only
        # completes the Metadata that dcp.save returns.
        metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        metadata.storage_meta = self.storage_meta()
        logger.info("job=%s step=%s: DCP checkpoint of %d items from %d ranks", self.client.job,
                    self.step, len(metadata.storage_data), len(results))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False

    def _check_thread(self) -> None:
        group = self.client._group
        if group is not None and group is dist.group.WORLD \
                and threading.current_thread() is not threading.main_thread():
            raise ShardguardError(
                "ShardguardWriter off the main thread (dcp.async_save) with a client that "
                "agrees on the default process group: its collective would race the "
                "training loop's. Connect with shardguard.client.connect_dcp() and pass the "
                "same group to async_save(process_group=...)")

    def _state(self, plan: SavePlan, planner: SavePlanner
               ) -> tuple[dict[str, Any], list[WriteResult]]:
        items, data, results = [], [], []
        for item in plan.items:
            obj = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                value: Any = obj.getvalue() if isinstance(obj, io.BytesIO) else bytes(obj)
                nbytes = len(value)
            else:
                value = obj.to_local() if isinstance(obj, DTensor) else obj
                value = value.detach()
                if tuple(value.shape) != tuple(item.tensor_data.chunk.sizes):
                    raise ValueError(f"{item.index.fqn}: resolved {tuple(value.shape)}, the "
                                     f"plan's chunk is {tuple(item.tensor_data.chunk.sizes)}")
                nbytes = value.numel() * value.element_size()
            items.append(_describe(item, nbytes))
            data.append(value)
            results.append(WriteResult(index=item.index, size_in_bytes=nbytes,
                                       storage_data=self.client.rank))
        state = {"format": FORMAT, "rank": self.client.rank,
                 "world": self.client.world_size, "items": items, "data": data,
                 "planner_data": plan.planner_data}
        return state, results

    def _wait_previous(self) -> None:
        """Every rank enters the snapshot with its previous step settled: all take it."""
        try:
            self.client.wait(restorable=True, timeout=self.protect_timeout_s)
        except TimeoutError:
            logger.warning("job=%s rank=%d: the previous step is not restorable after %.0fs; "
                           "taking step %s anyway", self.client.job, self.client.rank,
                           self.protect_timeout_s, self.step)
        except ShardguardError as exc:
            # The previous snapshot failed: nothing to wait for, the next one is taken.
            logger.warning("job=%s rank=%d: previous snapshot failed: %s", self.client.job,
                           self.client.rank, exc)


def _describe(item: WriteItem, nbytes: int) -> dict[str, Any]:
    """A WriteItem as plain data (the manifest stores it; no pickle)."""
    d: dict[str, Any] = {"fqn": item.index.fqn, "type": item.type.name, "n": nbytes,
                         "offset": None if item.index.offset is None else list(item.index.offset)}
    td = item.tensor_data
    if td is not None:
        d["dtype"] = str(td.properties.dtype).removeprefix("torch.")
        d["size"] = list(td.size)
        d["chunk"] = [list(td.chunk.offsets), list(td.chunk.sizes)]
        d["requires_grad"] = bool(td.properties.requires_grad)
    return d


def _write_item(d: dict[str, Any]) -> WriteItem:
    td = None
    if "dtype" in d:
        td = TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(d["chunk"][0]), torch.Size(d["chunk"][1])),
            properties=TensorProperties(dtype=_dtype(d["dtype"]),
                                        requires_grad=d["requires_grad"]),
            size=torch.Size(d["size"]))
    return WriteItem(index=MetadataIndex(d["fqn"], d["offset"]), type=WriteItemType[d["type"]],
                     tensor_data=td)


def _dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise RestoreError(f"unknown tensor dtype {name!r} in a DCP snapshot") from None


def _key(index: MetadataIndex) -> tuple[str, tuple[int, ...] | None]:
    return index.fqn, None if index.offset is None else tuple(index.offset)


# ------------------------------------------------------------------- reader


@dataclass
class _Held:
    """What this rank restored for a load: old rank -> its snapshot, all at ``step``."""

    step: int
    world: int
    states: dict[int, dict[str, Any]]


# A box of a stored item that a load plan reads: (old rank, item position, offsets,
# lengths, is_bytes). Plain data: the boxes are gathered over the group.
_Box = tuple[int, int, list[int], list[int], bool]


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
        self.job = self.client.job if self.client is not None else (source or _detect_job())
        self.socket = (self.client.socket_path if self.client is not None
                       else socket or default_socket_path())
        self.step = step
        self.allow_pickle = allow_pickle
        self.timeout_s = timeout_s
        if group is None and self.client is not None:
            group = self.client._group
        self._group = _reader_group(group)
        #: The step the last load read.
        self.loaded_step: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._held: _Held | None = None
        self._metadata: Metadata | None = None
        # (fqn, offset) -> (old rank, item position); old rank -> the new rank holding it.
        self._where: dict[tuple[str, tuple[int, ...] | None], tuple[int, int]] = {}
        self._owner: dict[int, int] = {}
        self._items: dict[tuple[int, int], dict[str, Any]] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.step = _parse_step(checkpoint_id)
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
            held: _Held | None = _Held(step, self.client.world_size, {self.client.rank: state})
            error: BaseException | None = None
        else:
            held, error = self._restore_foreign()
        # Every rank learns every old rank's item list (not its bytes), or every error.
        mine = {"error": None if error is None else f"{type(error).__name__}: {error}",
                "ranks": {} if held is None else {q: _summary(s) for q, s in held.states.items()}}
        everyone = _all_gather(mine, self._group)
        _raise_any(everyone, f"job {self.job}: DCP restore failed", error)
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
        asked = _all_gather({"error": None if error is None else f"{type(error).__name__}: "
                             f"{error}", "wanted": wanted}, self._group)
        _raise_any(asked, f"job {self.job}: DCP load plan failed", error)
        pieces = self._exchange([a["wanted"] for a in asked], holders)
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

    def _index(self, everyone: list[dict[str, Any]], held: _Held) -> Metadata:
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
            plans.append(SavePlan([_write_item(x) for x in d["items"]],
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

    # ------------------------------------------------------------ exchange

    def _requests(self, items: list[ReadItem]) -> tuple[dict[int, list[_Box]], list[int]]:
        """Per holding rank, the boxes this rank reads from it (in plan order), and the
        holder of each plan item."""
        wanted: dict[int, list[_Box]] = {}
        holders = []
        for req in items:
            where = self._where.get(_key(req.storage_index))
            if where is None:
                raise RestoreError(f"{req.storage_index}: no old rank wrote it")
            q, pos = where
            holder = self._owner[q]
            wanted.setdefault(holder, []).append(
                (q, pos, list(req.storage_offsets), list(req.lengths),
                 req.type == LoadItemType.BYTE_IO))
            holders.append(holder)
        return wanted, holders

    def _exchange(self, wanted: list[dict[int, list[_Box]]], holders: list[int]) -> list[Any]:
        """The boxes this rank's plan reads, in plan order: its own sliced in place, the
        others' through one all_to_all over the group (skipped by every rank when no rank
        needs another's)."""
        me, world = _rank(self._group), len(wanted)
        mine = wanted[me]
        got: dict[int, list[Any]] = {me: [self._box(b) for b in mine.get(me, [])]}
        if any(h != r for r, w in enumerate(wanted) for h in w):
            sends = [[self._box(b) for b in w.get(me, [])] if r != me else []
                     for r, w in enumerate(wanted)]
            recv_sizes = [0 if h == me else sum(_padded(self._box_bytes(b))
                                                for b in mine.get(h, []))
                          for h in range(world)]
            send_buf, send_sizes = _pack(sends)
            recv_buf = torch.empty(sum(recv_sizes), dtype=torch.uint8)
            dist.all_to_all_single(recv_buf, send_buf, recv_sizes, send_sizes,
                                   group=self._group)
            off = 0
            for h in range(world):
                if h == me:
                    continue
                for b in mine.get(h, []):
                    n = self._box_bytes(b)
                    got.setdefault(h, []).append(self._unpack(recv_buf[off:off + n], b))
                    off += _padded(n)
        # _requests listed each holder's boxes in plan order: pop them back in that order.
        cursors = {h: iter(v) for h, v in got.items()}
        return [next(cursors[h]) for h in holders]

    def _box(self, b: _Box) -> Any:
        """A box of an item this rank restored: bytes, or a view of the stored chunk."""
        assert self._held is not None
        q, pos, offsets, lengths, is_bytes = b
        value = self._held.states[q]["data"][pos]
        if is_bytes:
            return value
        for dim, (off, n) in enumerate(zip(offsets, lengths)):
            if n < value.size(dim):
                value = value.narrow(dim, off, n)
        return value

    def _box_bytes(self, b: _Box) -> int:
        q, pos, _, lengths, is_bytes = b
        item = self._items[(q, pos)]
        if is_bytes:
            return item["n"]
        return math.prod(lengths) * _dtype(item["dtype"]).itemsize

    def _unpack(self, buf: torch.Tensor, b: _Box) -> Any:
        q, pos, _, lengths, is_bytes = b
        if is_bytes:
            return buf.numpy().tobytes()
        return buf.view(_dtype(self._items[(q, pos)]["dtype"])).view(lengths)

    # ------------------------------------------------------- foreign ranks

    def _restore_foreign(self) -> tuple[_Held | None, BaseException | None]:
        """Restore the old ranks that fall to this rank: those of its node's daemon, spread
        over the new ranks on that node. Errors before the restores (the same on every
        rank: they come from gathered facts) are raised; a failed restore is returned."""
        info, error = None, None
        try:
            info = self._daemon_info()
        except ShardguardError as exc:
            error = exc
        infos = _all_gather({"error": None if error is None else f"{type(error).__name__}: "
                             f"{error}", "info": info}, self._group)
        _raise_any(infos, f"job {self.job}: a daemon could not be asked", error)
        plan = _assign(self.job, [m["info"] for m in infos], self.step)
        me = _rank(self._group)
        states: dict[int, dict[str, Any]] = {}
        try:
            for q in plan.ranks_of[me]:
                states[q] = self._restore_rank(q, plan)
        except (ShardguardError, ValueError, TypeError, RuntimeError) as exc:
            return None, exc
        return _Held(plan.step, plan.world, states), None

    def _daemon_info(self) -> dict[str, Any] | None:
        """What this rank's daemon holds of the job (None: nothing)."""
        try:
            reply = _status(self.socket, self.job)
        except UnknownJobError:
            return None
        js = next(j for j in reply.jobs if j.job == self.job)
        return {"daemon": (gethostname(), os.path.realpath(self.socket)),
                "address": (reply.address.control, reply.address.data),
                "world": js.world_size, "local": list(js.local_ranks),
                "ranks": {r.rank: (r.claimed, r.pid) for r in js.ranks},
                "nodes": js.nodes, "node_index": js.node_index, "group_size": js.group_size,
                "parity": js.parity,
                "step": js.restorable_step if js.HasField("restorable_step") else -1}

    def _restore_rank(self, q: int, plan: "_Assignment") -> dict[str, Any]:
        """Register as old rank ``q`` on this node's daemon, exactly as the old job did,
        restore the agreed step, and let the rank go."""
        info = plan.info_of[q]
        client = Client(self.socket, self.job, q, plan.world, group=None,
                        local_ranks=info["local"], allow_pickle=self.allow_pickle,
                        timeout_s=self.timeout_s, nodes=plan.nodes,
                        node_index=info["node_index"], group_size=info["group_size"],
                        parity=info["parity"])
        try:
            _, state = client.restore(plan.step, map_location="cpu",
                                      allow_pickle=self.allow_pickle)
        finally:
            client.close()
        return state


@dataclass
class _Assignment:
    """Which new rank restores which old rank, at which step, with which node list."""

    world: int
    step: int
    ranks_of: dict[int, list[int]]            # new rank -> old ranks it restores
    info_of: dict[int, dict[str, Any]]        # old rank -> its daemon's info
    nodes: list[tuple[str, str]]              # the old job's node list ([] for one node)


def _assign(job: str, infos: list[dict[str, Any] | None], step: int | None) -> _Assignment:
    """The same plan on every rank, from every rank's daemon info."""
    daemons: dict[tuple[str, str], tuple[dict[str, Any], list[int]]] = {}
    for r, info in enumerate(infos):
        if info is not None:
            daemons.setdefault(tuple(info["daemon"]), (info, []))[1].append(r)
    if not daemons:
        raise NotRestorableError(f"job {job} is held by none of the ranks' daemons")
    worlds = {info["world"] for info, _ in daemons.values()}
    if len(worlds) != 1:
        raise RestoreError(f"job {job}: daemons disagree on its world size ({sorted(worlds)})")
    world = worlds.pop()
    restorable = min(info["step"] for info, _ in daemons.values())
    if restorable < 0:
        raise NotRestorableError(f"job {job} has no restorable step on every node")
    ranks_of: dict[int, list[int]] = {r: [] for r in range(len(infos))}
    info_of: dict[int, dict[str, Any]] = {}
    for info, new_ranks in daemons.values():
        held = sorted(q for q in info["ranks"] if q not in info_of and 0 <= q < world)
        for i, q in enumerate(held):
            claimed, pid = info["ranks"][q]
            if claimed:
                hint = " (this process: pass its Client to ShardguardReader)" \
                    if pid == os.getpid() else ""
                raise RankClaimedError(f"job {job} rank {q} is held by live process {pid}"
                                       f"{hint}")
            ranks_of[new_ranks[i % len(new_ranks)]].append(q)
            info_of[q] = info
    missing = sorted(set(range(world)) - set(info_of))
    if missing:
        raise RestoreError(f"job {job}: old ranks {missing} are on no daemon of this world's "
                           "ranks (every old node needs a rank of the new world)")
    nodes: list[tuple[str, str]] = []
    count = max(info["nodes"] for info, _ in daemons.values())
    if count > 1:
        by_index = {info["node_index"]: tuple(info["address"]) for info, _ in daemons.values()}
        lost = sorted(set(range(count)) - set(by_index))
        if lost:
            raise RestoreError(f"job {job}: nodes {lost} of its {count} have no rank of this "
                               "world")
        nodes = [by_index[i] for i in range(count)]
    return _Assignment(world, restorable if step is None else step, ranks_of, info_of, nodes)


def _summary(state: Any) -> dict[str, Any]:
    """A restored rank's snapshot without its bytes (what the other ranks need to plan)."""
    if not isinstance(state, dict):
        return {"format": None}
    return {"format": state.get("format"), "world": state.get("world"),
            "items": state.get("items", []), "planner_data": state.get("planner_data")}


def _raise_any(gathered: list[dict[str, Any]], what: str, mine: BaseException | None) -> None:
    """Raise on every rank when any rank failed (naming them all)."""
    failed = [f"rank {r}: {m['error']}" for r, m in enumerate(gathered) if m["error"]]
    if failed:
        raise RestoreError(f"{what} ({'; '.join(failed)})") from mine


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(p: Any) -> int:
    return len(p) if isinstance(p, bytes) else p.numel() * p.element_size()


def _pack(sends: list[list[Any]]) -> tuple[torch.Tensor, list[int]]:
    """One uint8 buffer of every piece for every peer (each at an aligned offset)."""
    sizes = [sum(_padded(_nbytes(p)) for p in pieces) for pieces in sends]
    buf = torch.empty(sum(sizes), dtype=torch.uint8)
    off = 0
    for pieces in sends:
        for p in pieces:
            n = _nbytes(p)
            if n and isinstance(p, bytes):
                buf[off:off + n] = torch.frombuffer(bytearray(p), dtype=torch.uint8)
            elif n:
                buf[off:off + n].view(p.dtype).view(p.shape).copy_(p)
            off += _padded(n)
    return buf, sizes


# ------------------------------------------------------------ sharded state


def sharded_state_dict_to_local(state: Any) -> Any:
    """``state`` with every DTensor replaced by plain data ``client.snapshot`` can store:
    its local shard, placements, global shape and stride, and its mesh (device type,
    ranks, dim names). Other leaves are kept as they are (not copied)."""
    return _map_state(state, _dtensor_doc)


def sharded_state_dict_from_local(state: Any, device_mesh: DeviceMesh | None = None) -> Any:
    """The inverse of :func:`sharded_state_dict_to_local`, on the same world.

    Args:
        device_mesh: the mesh to rebuild every DTensor on (e.g. the model's); default:
            one mesh per recorded (device type, ranks, dim names), made here (collective
            for a mesh of more than one dimension).
    """
    meshes: dict[str, DeviceMesh] = {}

    def rebuild(x: Any) -> Any:
        if not (isinstance(x, dict) and x.get(_DTENSOR_KEY)):
            return x
        mesh = device_mesh or _mesh(x["mesh"], meshes)
        if list(mesh.mesh.shape) != list(torch.tensor(x["mesh"]["ranks"]).shape):
            raise ValueError(f"a DTensor of mesh shape {x['mesh']['ranks']} onto mesh {mesh}")
        return DTensor.from_local(x["local"].to(mesh.device_type), mesh,
                                  [_placement(p) for p in x["placements"]], run_check=False,
                                  shape=torch.Size(x["shape"]), stride=tuple(x["stride"]))

    return _map_state(state, rebuild, stop=lambda x: isinstance(x, dict) and _DTENSOR_KEY in x)


def _dtensor_doc(x: Any) -> Any:
    if not isinstance(x, DTensor):
        return x
    mesh = x.device_mesh
    return {_DTENSOR_KEY: 1, "local": x.to_local(), "shape": list(x.shape),
            "stride": list(x.stride()),
            "placements": [_placement_doc(p) for p in x.placements],
            "mesh": {"device_type": mesh.device_type, "ranks": mesh.mesh.tolist(),
                     "dim_names": list(mesh.mesh_dim_names or [])}}


def _placement_doc(p: Any) -> list[Any]:
    if isinstance(p, _StridedShard):
        return ["strided_shard", p.dim, p.split_factor]
    if isinstance(p, Shard):
        return ["shard", p.dim]
    if isinstance(p, Replicate):
        return ["replicate"]
    if isinstance(p, Partial):
        return ["partial", p.reduce_op]
    raise TypeError(f"DTensor placement {p!r} is not supported")


def _placement(doc: list[Any]) -> Any:
    kind = doc[0]
    if kind == "strided_shard":
        return _StridedShard(doc[1], split_factor=doc[2])
    if kind == "shard":
        return Shard(doc[1])
    if kind == "replicate":
        return Replicate()
    if kind == "partial":
        return Partial(doc[1])
    raise RestoreError(f"unknown DTensor placement {doc!r}")


def _mesh(doc: dict[str, Any], made: dict[str, DeviceMesh]) -> DeviceMesh:
    key = repr((doc["device_type"], doc["ranks"], doc["dim_names"]))
    if key not in made:
        names = tuple(doc["dim_names"]) or None
        made[key] = DeviceMesh(doc["device_type"], torch.tensor(doc["ranks"]),
                               mesh_dim_names=names)
    return made[key]


def _map_state(x: Any, fn: Any, stop: Any = None) -> Any:
    """``x`` with ``fn`` applied to every leaf (and to every dict ``stop`` says is one);
    dicts, OrderedDicts (with a module state_dict's ``_metadata``), lists, tuples kept."""
    if stop is not None and stop(x):
        return fn(x)
    if isinstance(x, dict):
        out = type(x)() if type(x) in (dict, OrderedDict) else {}
        for k, v in x.items():
            out[k] = _map_state(v, fn, stop)
        if hasattr(x, "_metadata"):
            out._metadata = x._metadata  # type: ignore[attr-defined]
        return out
    if type(x) in (list, tuple):
        return type(x)(_map_state(v, fn, stop) for v in x)
    return fn(x)


# --------------------------------------------------------------- plumbing


def _reader_group(group: Any) -> Any:
    """``group``, else the default group if it is gloo, else one new gloo group per process."""
    global _gloo_group
    if group is not None:
        return group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo")
    return _gloo_group


def _rank(group: Any) -> int:
    return dist.get_rank(group) if group is not None else 0


def _all_gather(obj: Any, group: Any) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _status(socket_path: str, job: str) -> pb.StatusReply:
    with grpc.insecure_channel(grpc_target(socket_path)) as ch:
        try:
            return pb_grpc.AgentStub(ch).Status(pb.StatusRequest(job=job),
                                                timeout=DEFAULT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
