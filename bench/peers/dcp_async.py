"""DCP ``async_save`` into /dev/shm, as ``bench/bench_node.py`` runs it (``DefaultStager``, shared-memory
staging); restored with ``dcp.load`` into the state's tensors. Runs in the project's venv."""

from __future__ import annotations

import os
from typing import Any

import _harness as h
import bench_node as bn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader


class DcpAsync(h.BenchNodePeer):
    name = "DCP async_save -> /dev/shm"
    restore_way = "dcp.load into the state's tensors"

    def __init__(self, args: Any, state: dict[str, Any]) -> None:
        super().__init__(args, state)
        # bench_node's method: optimizer.step() waits for staging, a step whose previous write
        # is in flight is skipped, and the checkpoint is complete when the files are written,
        # here to /dev/shm, which outlives the trainer.
        self.inner = bn.DcpAsync(os.path.join(args.scratch, "dcp"), agree=None)
        self.extra["staging"] = vars(self.inner.options)

    def restore(self, state: dict[str, Any]) -> None:
        assert self.inner.latest is not None
        dcp.load(state, storage_reader=FileSystemReader(self.inner.latest), no_dist=True)

    def close(self) -> None:
        self.inner.close()


if __name__ == "__main__":
    h.main(DcpAsync)
