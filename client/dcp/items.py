"""What a rank's DCP snapshot holds besides its bytes, as plain data (the manifest stores
it; no pickle): each DCP write item described, and read back as DCP's own types."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from shardguard.proto.errors import RestoreError
from shardguard.proto.state_layout import TORCH_DTYPES

#: The ``format`` of a rank's DCP snapshot; a reader refuses anything else.
FORMAT = "shardguard-dcp/1"

#: Where a stored item is: (fqn, chunk offset), as DCP's MetadataIndex names it.
ItemKey = tuple[str, tuple[int, ...] | None]


def parse_step(checkpoint_id: Any) -> int:
    """A step from a checkpoint_id: an int, or a name ending in digits (``.../step-100``)."""
    if isinstance(checkpoint_id, int):
        return checkpoint_id
    m = re.search(r"(\d+)$", str(os.fspath(checkpoint_id)).rstrip("/"))
    if m is None:
        raise ValueError(f"checkpoint_id {checkpoint_id!r} names no step: pass an int or a "
                         "name ending in the step (e.g. 'step-100')")
    return int(m.group(1))


def describe(item: WriteItem, nbytes: int) -> dict[str, Any]:
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


def write_item(d: dict[str, Any]) -> WriteItem:
    td = None
    if "dtype" in d:
        td = TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(d["chunk"][0]), torch.Size(d["chunk"][1])),
            properties=TensorProperties(dtype=dtype(d["dtype"]),
                                        requires_grad=d["requires_grad"]),
            size=torch.Size(d["size"]))
    return WriteItem(index=MetadataIndex(d["fqn"], d["offset"]), type=WriteItemType[d["type"]],
                     tensor_data=td)


def dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise RestoreError(f"unknown tensor dtype {name!r} in a DCP snapshot") from None


def key(index: MetadataIndex) -> ItemKey:
    return index.fqn, None if index.offset is None else tuple(index.offset)


def summary(state: Any) -> dict[str, Any]:
    """A restored rank's snapshot without its bytes (what the other ranks need to plan)."""
    if not isinstance(state, dict):
        return {"format": None}
    return {"format": state.get("format"), "world": state.get("world"),
            "items": state.get("items", []), "planner_data": state.get("planner_data")}
