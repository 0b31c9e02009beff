"""DCP's StorageWriter into shardguard: each rank snapshots the items of its final save plan
as one step (see the package's docstring for the save path and its limits)."""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from shardguard.client.client import Client
from shardguard.client.dcp.connect import connect_dcp
from shardguard.client.dcp.items import FORMAT, describe, parse_step
from shardguard.proto.errors import ShardguardError

logger = logging.getLogger(__name__)


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
            self.step = parse_step(checkpoint_id)

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
        handle.fence()
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
        group = self.client.group
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
            items.append(describe(item, nbytes))
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
