"""One rank's staged slot written as a DCP checkpoint of the state a restore returns.

The checkpoint is what ``dcp.save(state, storage_writer=FileSystemWriter(dir))`` writes
for that state (an object stored with ``allow_pickle`` appears as its pickle bytes), with
the rank's manifest beside it; the client's ``tier.restore`` reads it back. Layout and
commit order: ``shardguard.proto.tier``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from shardguard.proto import manifest as mf
from shardguard.proto import tier as layout
from shardguard.proto.errors import ManifestError
from shardguard.proto.state_layout import rebuild


def _cpu(_: str) -> torch.device:
    return torch.device("cpu")


def write_rank(path: str, u8: torch.Tensor, arr: np.ndarray, base: int, data_bytes: int,
               manifest_offset: int, manifest_bytes: int, *, job: str, rank: int, step: int,
               world: int) -> None:
    """Write one rank's snapshot (a slot's bytes at ``base`` of ``u8``/``arr``) as a DCP
    checkpoint in ``path``, with its manifest beside it; every file and ``path`` fsynced."""
    raw = arr[base + manifest_offset:base + manifest_offset + manifest_bytes]
    doc = mf.parse(raw, data_bytes)
    if doc["step"] != step:
        raise ManifestError(f"rank {rank}: the manifest is for step {doc['step']}, not {step}")
    # Pickles stay bytes: the flusher never runs code from a snapshot.
    state = rebuild({"tree": _pickles_as_bytes(doc["tree"])}, u8, arr, base, None, False, _cpu)
    layout.remove_tree(path)
    os.makedirs(path, mode=0o700)
    with warnings.catch_warnings():
        # DCP warns whenever it runs without a process group: here that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=FileSystemWriter(path, sync_files=True), no_dist=True)
    layout.write_durably(os.path.join(path, layout.RANK_DOC), json.dumps(
        {"format": layout.FORMAT, "job": job, "rank": rank, "step": step, "world": world,
         "manifest": doc}, separators=(",", ":")).encode())
    layout.fsync_tree(path)


def _pickles_as_bytes(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("t") == "pickle":
            return {**node, "t": "bytes"}
        return {k: _pickles_as_bytes(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_pickles_as_bytes(v) for v in node]
    return node
