"""DLRover flash checkpoint: ``DdpCheckpointer.save_checkpoint(..., StorageType.MEMORY)`` every step.

The call copies the state into shared memory that the launcher's agent owns, so the
checkpoint is in memory, and survives the trainer, when the call returns; the agent
writes it to storage only when asked (``StorageType.DISK``) or when the trainer dies.
bench_peers.py runs this under ``dlrover-run --standalone`` (agent and a local master,
as in production); run alone, DLRover starts its own saver process instead.
Restore: ``load_checkpoint()`` returns tensors that view the shared memory (timed
too, as ``zero_copy_load_s``), then they are copied into the state's tensors, which
is what ``load_state_dict`` would do.
"""

from __future__ import annotations

import os
import time
from typing import Any

import _harness as h
from dlrover.python.common.constants import CheckpointConstant
from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer


class DlroverFlash(h.Peer):
    name = "DLRover flash checkpoint (MEMORY)"
    restore_way = "load_checkpoint() views of its shared memory, copied into the state"

    def __init__(self, args: Any, state: dict[str, Any]) -> None:
        super().__init__(args, state)
        self.ckpt = DdpCheckpointer(os.path.join(args.scratch, "dlrover"))
        self.extra["under_dlrover_run"] = os.environ.get("ROLE_NAME") == "dlrover-trainer"

    def checkpoint(self, step: int, state: dict[str, Any]) -> h.Pending | None:
        p = h.Pending(time.perf_counter())
        # save_checkpoint(..., StorageType.MEMORY) is this call on its engine, less the flag that
        # says whether it was taken (False while the agent holds the lock, persisting the memory).
        key = CheckpointConstant.MODEL_STATES_NAME
        path = os.path.join(self.ckpt.checkpoint_dir, f"{step}/rank_0.pt")
        if not self.ckpt._engine.save_to_memory(step, {key: state}, {key: path}):
            return None
        p.finish()
        return p

    def restore(self, state: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        got = self.ckpt.load_checkpoint()
        self.extra["zero_copy_load_s"] = time.perf_counter() - t0
        h.copy_state(state, got)

    def daemon_pid(self) -> int | None:
        if self.extra["under_dlrover_run"]:
            return os.getppid()  # the agent: dlrover-run's process that spawned this trainer
        proc = self.ckpt._engine.saver_proc
        return proc.pid if proc is not None else None

    def close(self) -> None:
        self.ckpt._engine.close()


if __name__ == "__main__":
    h.main(DlroverFlash)
