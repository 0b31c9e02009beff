"""ml-flashpoint 0.0.10 through PyTorch DCP, thread mode: ``dcp.async_save(...,
storage_writer=MemoryStorageWriter, async_checkpointer_type=AsyncCheckpointerType.THREAD)``, as its
user guide's "PyTorch DCP" section sets it up (one rank here, so nothing is replicated).

``async_save`` stages the state (the writer is DCP's ``BlockingAsyncStager``: a copy into host
buffers before the call returns), then a thread in the trainer writes the staged copy into
ml-flashpoint's buffers in /dev/shm. The checkpoint is complete, and loadable, once
``finalize_checkpoint`` has run (the user guide's Megatron strategy runs it as a finalize step;
DCP's path leaves it to the caller: without it the checkpoint stays marked dirty). A step whose
previous save is still in flight is skipped. Restore: ``dcp.load`` with its ``MemoryStorageReader``
of the newest finalized checkpoint, into the state's tensors.

Installing it here needs the abseil shim of bench/peers/absl (see its CMakeLists.txt).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any
from unittest import mock

import _harness as h
import bench_node as bn
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
import torch.multiprocessing as torch_mp
from _common import free_port
from ml_flashpoint.adapter.pytorch.memory_storage_reader import MemoryStorageReader
from ml_flashpoint.adapter.pytorch.memory_storage_writer import MemoryStorageWriter
from ml_flashpoint.checkpoint_object_manager.checkpoint_object_manager import CheckpointObjectManager
from ml_flashpoint.core.checkpoint_id_types import CheckpointContainerId
from ml_flashpoint.core.checkpoint_loader import DefaultMLFlashpointCheckpointLoader
from ml_flashpoint.core.checkpoint_saver import DefaultMLFlashpointCheckpointSaver
from ml_flashpoint.replication.replication_manager import ReplicationManager

# Its buffers default to 16 GB per rank; the state and its metadata fit in this much more.
BUFFER_SLACK = 1.25


class FlashpointThread(h.Peer):
    name = "ml-flashpoint (DCP async_save, thread)"
    restore_way = "dcp.load(MemoryStorageReader) of the newest checkpoint, into the state"

    def __init__(self, args: Any, state: dict[str, Any]) -> None:
        super().__init__(args, state)
        # ml-flashpoint reads ranks (LOCAL_RANK too, as torchrun sets it), barriers and gathers
        # from torch.distributed: one rank.
        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(var, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        objects = CheckpointObjectManager()
        replication = ReplicationManager()
        # Shims: its default replication strategy takes the processes per node from
        # torch.cuda.device_count(), 0 on a CPU (ZeroDivisionError), and counts nodes as world
        # size over GPUs unless NNODES says (RuntimeError: torch.cuda.device_count() returned 0).
        # One node, one trainer on it.
        os.environ.setdefault("NNODES", "1")
        with mock.patch.object(torch.cuda, "device_count", return_value=1):
            replication.initialize(objects)
        manager: concurrent.futures.Future[Any] = concurrent.futures.Future()
        manager.set_result(torch_mp.get_context("spawn").Manager())
        self.saver = DefaultMLFlashpointCheckpointSaver(
            global_rank_getter=dist.get_rank, local_rank_getter=dist.get_node_local_rank,
            global_barrier_func=dist.barrier, ckpt_obj_manager=objects, replication_manager=replication,
            initial_buffer_size_bytes=int(BUFFER_SLACK * bn.nbytes_of(state)),
        )
        self.writer = MemoryStorageWriter(checkpoint_saver=self.saver, mp_manager_future=manager)
        self.loader = DefaultMLFlashpointCheckpointLoader(
            checkpoint_object_manager=objects, replication_manager=replication,
            global_rank_getter=dist.get_rank, local_rank_getter=dist.get_node_local_rank,
            broadcast_object_list_func=dist.broadcast_object_list, all_gather_object_func=dist.all_gather_object,
            world_size_getter=dist.get_world_size,
        )
        self.base = CheckpointContainerId(os.path.join(args.scratch, "mlf", "job"))
        self.future: concurrent.futures.Future[Any] | None = None
        self.latest: CheckpointContainerId | None = None
        self.pending: h.Pending | None = None

    def checkpoint(self, step: int, state: dict[str, Any]) -> h.Pending | None:
        if self.pending is not None and self.pending.done_s is None:
            return None
        p = h.Pending(time.perf_counter())
        ckpt = CheckpointContainerId.create_child(self.base, CheckpointContainerId.format_version_container(step))
        self.future = dcp.async_save(state, checkpoint_id=str(ckpt), storage_writer=self.writer,
                                     async_checkpointer_type=AsyncCheckpointerType.THREAD)
        self.pending = p
        self.future.add_done_callback(lambda f: self._finalize(f, ckpt, p))
        return p

    def _finalize(self, future: concurrent.futures.Future[Any], ckpt: CheckpointContainerId, p: h.Pending) -> None:
        try:
            future.result()
            self.saver.finalize_checkpoint(ckpt)
            self.latest = ckpt
        except BaseException as exc:  # noqa: BLE001 - reported with the run
            p.error = exc
        p.finish()

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()

    def restore(self, state: dict[str, Any]) -> None:
        # The newest finalized checkpoint, as the trainer knows it: 0.0.10's
        # get_latest_complete_checkpoint() (the user guide's first recovery step) asks every
        # checkpoint for Megatron's common.pt, which the DCP path never writes, and so finds none.
        assert self.latest is not None
        reader = MemoryStorageReader(path=str(self.latest), checkpoint_loader=self.loader)
        dcp.load(state, checkpoint_id=str(self.latest), storage_reader=reader)

    def close(self) -> None:
        self.wait()
        dist.destroy_process_group()


if __name__ == "__main__":
    h.main(FlashpointThread)
