"""The persistent tier on the trainer's side: a rank's state read back by ``restore()``
when memory holds nothing (the flusher process the daemon starts, ``shardguard.flusher``,
wrote it).

A rank's flushed state is what ``dcp.save(state, storage_writer=FileSystemWriter(dir))``
writes for the state a restore returns (an object stored with ``allow_pickle`` appears
there as its pickle bytes), so a plain ``dcp.load`` of a state of the same structure
reads it without shardguard::

    dcp.load(state, storage_reader=FileSystemReader(f"{tier_dir}/{job}/step-{n}/rank-{r}"))

(with torch.distributed initialized, pass ``no_dist=True``: each rank reads its own
checkpoint). Beside it, ``shardguard.json`` keeps the rank's manifest, plain data. A
restore lays the slot's bytes out again from the checkpoint (tensors are loaded
straight into place, other leaves through ``torch.load(weights_only=True)``) and hands
them to the same ``rebuild`` as a restore from memory: both return the same state, types,
dtypes and ``allow_pickle`` rule included. DCP's own ``.metadata`` is unpickled, as by
every DCP load: the tier directory is trusted like any checkpoint directory (the daemon
makes it 0700). Layout and commit order: ``shardguard.proto.tier``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from shardguard.proto import manifest as mf
from shardguard.proto import tier as layout
from shardguard.proto.errors import ManifestError, RestoreError, ShardguardError
from shardguard.proto.state_layout import TORCH_DTYPES, rebuild, tensor_view

logger = logging.getLogger(__name__)

_EMPTY = torch.empty(0, dtype=torch.uint8)


def _cpu(_: str) -> torch.device:
    return torch.device("cpu")


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP warns whenever it runs without a process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest(root: str, job: str, rank: int, world: int) -> int:
    """The step the tier's pointer names, if this rank's part of it is there; else -1."""
    try:
        step = layout.read_pointer(root, job)
        if step is None:
            return -1
        where = layout.step_dir(root, job, step)
        doc = layout.read_doc(os.path.join(where, layout.STEP_DOC))
        if doc.get("world") != world:
            logger.warning("job=%s rank=%d: the tier's step %d is of a world of %s ranks, not "
                           "%d; not used", job, rank, step, doc.get("world"), world)
            return -1
        mine = layout.rank_dir(where, rank)
        for name in (layout.RANK_DOC, ".metadata"):
            if not os.path.exists(os.path.join(mine, name)):
                logger.warning("job=%s rank=%d: the tier's step %d lacks %s", job, rank, step,
                               os.path.join(mine, name))
                return -1
        return step
    except (OSError, ValueError) as exc:
        logger.warning("job=%s rank=%d: cannot read the tier in %s: %s", job, rank, root, exc)
        return -1


def restore(root: str, job: str, step: int, rank: int, world: int, into: Any,
            allow_pickle: bool, device_for: Callable[[str], torch.device]) -> Any:
    """Rank ``rank``'s state of ``step`` from the tier, as a restore from memory returns it.

    Raises:
        RestoreError: the checkpoint is missing, of another job, rank, step or world, or
            DCP cannot read it.
    """
    path = layout.rank_dir(layout.step_dir(root, job, step), rank)
    try:
        doc = layout.read_doc(os.path.join(path, layout.RANK_DOC))
        manifest = doc["manifest"]
        want = {"job": job, "rank": rank, "step": step, "world": world}
        got = {k: doc.get(k) for k in want}
        if got != want:
            raise RestoreError(f"{path} holds {got}, not {want}")
        mf.parse(json.dumps(manifest).encode(), manifest.get("data_bytes"))
        buf = torch.empty(manifest["data_bytes"], dtype=torch.uint8)
        arr = buf.numpy()
        with _single_process():
            dcp.load(_skeleton(manifest["tree"], buf), storage_reader=FileSystemReader(path),
                     planner=_Loader(buf, arr, manifest["tree"]), no_dist=True)
    except ShardguardError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, CheckpointException) as exc:
        raise RestoreError(f"job {job} rank {rank}: cannot read step {step} from the tier "
                           f"({path}): {type(exc).__name__}: {exc}") from None
    return rebuild(manifest, buf, arr, 0, into, allow_pickle, device_for)


def _skeleton(node: dict[str, Any], buf: torch.Tensor) -> Any:
    """A state of the snapshot's structure for DCP to load into: tensors are views of
    ``buf`` at their slot offsets (loaded in place), dicts and lists are real (DCP walks
    them as it walked the state it saved), scalars are themselves, and what DCP keeps
    as one pickled item (a tuple, an ndarray, bytes) is None until it is loaded."""
    t = node["t"]
    if t == "tensor":
        dtype = TORCH_DTYPES.get(node["dtype"])
        if dtype is None:
            raise ManifestError(f"unknown tensor dtype {node['dtype']!r}")
        return tensor_view(buf, node["off"], dtype, node["shape"])
    if t in ("tuple", "ndarray", "bytes", "pickle"):
        return None
    if t == "list":
        return [_skeleton(c, buf) for c in node["v"]]
    if t == "dict":
        return {_plain(k): _skeleton(v, buf) for k, v in zip(node["k"], node["v"])}
    return _plain(node)


def _plain(node: dict[str, Any]) -> Any:
    """A manifest subtree that owns no bytes (a scalar, a key), decoded."""
    if any(True for _ in mf.data_entries(node)):
        raise RestoreError("a dict key holds bytes or tensors: the tier cannot name it")
    return rebuild({"tree": node}, _EMPTY, _EMPTY.numpy(), 0, None, False, _cpu)


class _Loader(DefaultLoadPlanner):
    """DCP's default load planner, except that a pickled item is loaded with
    ``weights_only`` (plain data, tensors, numpy arrays) and its bytes copied to their
    slot offsets, found by the item's path in the manifest."""

    def __init__(self, buf: torch.Tensor, arr: np.ndarray, tree: dict[str, Any]) -> None:
        super().__init__()
        self._buf, self._arr, self._tree = buf, arr, tree
        self._keys: dict[int, dict[str, dict[str, Any]]] = {}
        # What an ndarray unpickles through (numpy's module path differs across versions).
        safe: list[Any] = [np.ndarray, np.dtype, np.zeros(0).__reduce__()[0]]
        safe += list({type(mf.ndarray_dtype(n["dtype"])) for n in mf.data_entries(tree)
                      if n["t"] == "ndarray"})
        self._safe = safe

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        node = self._node_at(self.mappings[fqn], fqn)
        if not any(True for _ in mf.data_entries(node)):
            return  # scalars only: the manifest holds them
        with torch.serialization.safe_globals(self._safe):
            obj = torch.load(value, weights_only=True)
        _fill(node, obj, self._buf, self._arr, fqn)

    def _node_at(self, path: tuple[Any, ...], fqn: str) -> dict[str, Any]:
        """The manifest node at DCP's path (dict keys as DCP names them: ``str(key)``)."""
        node = self._tree
        for part in path:
            if node["t"] == "dict":
                keys = self._keys.get(id(node))
                if keys is None:
                    keys = self._keys[id(node)] = {
                        str(_plain(k)): v for k, v in zip(node["k"], node["v"])}
                child = keys.get(str(part))
            elif node["t"] == "list" and isinstance(part, int) and part < len(node["v"]):
                child = node["v"][part]
            else:
                child = None
            if child is None:
                raise RestoreError(f"the checkpoint's item {fqn} is not in the manifest")
            node = child
        return node


def _fill(node: dict[str, Any], obj: Any, buf: torch.Tensor, arr: np.ndarray, where: str) -> None:
    """Copy the bytes of every data leaf of ``obj`` (shaped as ``node``) to its slot offset."""
    t = node["t"]
    if t == "tensor":
        dtype = TORCH_DTYPES[node["dtype"]]
        if not isinstance(obj, torch.Tensor) or obj.dtype != dtype \
                or list(obj.shape) != node["shape"]:
            raise RestoreError(f"{where}: the checkpoint holds {_what(obj)}, the manifest a "
                               f"{node['dtype']}{node['shape']} tensor")
        tensor_view(buf, node["off"], dtype, node["shape"]).copy_(obj)
    elif t == "ndarray":
        dt = mf.ndarray_dtype(node["dtype"])
        if not isinstance(obj, np.ndarray) or obj.dtype != dt or list(obj.shape) != node["shape"]:
            raise RestoreError(f"{where}: the checkpoint holds {_what(obj)}, the manifest an "
                               f"ndarray {dt}{node['shape']}")
        off, n = node["off"], node["n"]
        np.copyto(arr[off:off + n].view(dt).reshape(obj.shape), obj, casting="no")
    elif t in ("bytes", "pickle"):
        if not isinstance(obj, bytes) or len(obj) != node["n"]:
            raise RestoreError(f"{where}: the checkpoint holds {_what(obj)}, the manifest "
                               f"{node['n']} bytes")
        arr[node["off"]:node["off"] + node["n"]] = np.frombuffer(obj, dtype=np.uint8)
    elif t in ("list", "tuple"):
        if not isinstance(obj, (list, tuple)) or len(obj) != len(node["v"]):
            raise RestoreError(f"{where}: the checkpoint holds {_what(obj)}, the manifest a "
                               f"{t} of {len(node['v'])}")
        for i, (child, value) in enumerate(zip(node["v"], obj)):
            _fill(child, value, buf, arr, f"{where}[{i}]")
    elif t == "dict":
        if not isinstance(obj, dict) or len(obj) != len(node["k"]):
            raise RestoreError(f"{where}: the checkpoint holds {_what(obj)}, the manifest a "
                               f"dict of {len(node['k'])}")
        for k, child in zip(node["k"], node["v"]):
            key = _plain(k)
            if key not in obj:
                raise RestoreError(f"{where}: the checkpoint lacks key {key!r}")
            _fill(child, obj[key], buf, arr, f"{where}[{key!r}]")


def _what(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {str(obj.dtype).removeprefix('torch.')}{list(obj.shape)} tensor"
    return f"a {type(obj).__name__}"
