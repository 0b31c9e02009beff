"""A training state in a slot, on torch's side of the manifest contract (``manifest.py``).

:func:`flatten` walks a state once per snapshot: it records scalars in the
manifest tree and lists every leaf that owns bytes (tensors, numpy arrays,
bytes, pickles) as a :class:`Leaf`. :class:`Plan` places those leaves in a
slot; it depends only on their sizes, so it is computed once and reused while
the sizes stay the same (a changed structure simply gets a new plan).
:func:`rebuild` reads a manifest and a slot back into a state.

The trainer's client writes and reads slots with it, and the tier's flusher reads
them with it, so both return the same state. It imports torch: the daemon, which
handles bytes only, never imports this module.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from shardguard.proto import manifest as mf
from shardguard.proto.arena import align_up
from shardguard.proto.errors import IntoMismatchError, ManifestError, RestoreError

#: Every torch dtype by the name a manifest gives it (``str(dtype)`` without ``torch.``).
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


# JSON integers past ~4300 digits are refused by Python's int/str conversion limit.
MAX_INT_BITS = 8192


@dataclass
class Leaf:
    """A state leaf that owns bytes in the slot; ``node`` is its manifest entry."""

    kind: str  # tensor | ndarray | bytes | pickle
    value: Any  # torch.Tensor, np.ndarray, or bytes
    nbytes: int
    node: dict[str, Any]


def flatten(state: Any, allow_pickle: bool = False) -> tuple[dict[str, Any], list[Leaf]]:
    """Manifest tree (offsets still unset) and the byte-owning leaves, in walk order."""
    leaves: list[Leaf] = []
    tree = _encode(state, "state", leaves, allow_pickle, 0)
    return tree, leaves


def _encode(x: Any, path: str, leaves: list[Leaf], allow_pickle: bool, depth: int) -> dict:
    if depth > mf.MAX_DEPTH:
        raise TypeError(f"state nested deeper than {mf.MAX_DEPTH} at {path}")
    if isinstance(x, torch.Tensor) and type(x).__name__ == "DTensor":
        raise TypeError(f"{path}: a DTensor; snapshot its local shard with "
                        "shardguard.client.sharded_state_dict_to_local(state), or save "
                        "through torch.distributed.checkpoint with ShardguardWriter")
    if isinstance(x, torch.Tensor):
        if x.is_quantized or x.is_sparse or x.layout != torch.strided:
            raise TypeError(f"{path}: only dense strided tensors are supported, got {x.layout}")
        node = {"t": "tensor", "dtype": str(x.dtype).removeprefix("torch."),
                "shape": list(x.shape), "dev": str(x.device)}
        leaves.append(Leaf("tensor", x.detach(), x.numel() * x.element_size(), node))
        return node
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject:
            return _pickled(x, path, leaves, allow_pickle)
        node = {"t": "ndarray", "dtype": np.lib.format.dtype_to_descr(x.dtype),
                "shape": list(x.shape)}
        leaves.append(Leaf("ndarray", x, x.nbytes, node))
        return node
    if isinstance(x, (bytes, bytearray, memoryview)):
        b = bytes(x)
        node = {"t": "bytes"}
        leaves.append(Leaf("bytes", b, len(b), node))
        return node
    if x is None:
        return {"t": "none"}
    if isinstance(x, bool):
        return {"t": "bool", "v": x}
    if type(x) is int:
        if x.bit_length() > MAX_INT_BITS:
            raise TypeError(f"{path}: an int of {x.bit_length()} bits is too big for a manifest "
                            "(store it as bytes)")
        return {"t": "int", "v": x}
    if type(x) is float:
        return {"t": "float", "v": mf.encode_float(x)}
    if type(x) is str:
        return {"t": "str", "v": x}
    if type(x) in (list, tuple):
        return {"t": type(x).__name__,
                "v": [_encode(v, f"{path}[{i}]", leaves, allow_pickle, depth + 1)
                      for i, v in enumerate(x)]}
    if type(x) in (dict, OrderedDict):
        keys, values = [], []
        for i, (k, v) in enumerate(x.items()):
            keys.append(_encode(k, f"{path}.key{i}", leaves, allow_pickle, depth + 1))
            values.append(_encode(v, f"{path}[{k!r}]", leaves, allow_pickle, depth + 1))
        node: dict[str, Any] = {"t": "dict", "k": keys, "v": values}
        if type(x) is OrderedDict:
            # A module state_dict is an OrderedDict whose _metadata carries per-module
            # versions that load_state_dict reads.
            node["ordered"] = True
            meta = getattr(x, "_metadata", None)
            if meta is not None:
                node["meta"] = _encode(meta, f"{path}._metadata", leaves, allow_pickle,
                                       depth + 1)
        return node
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return _encode(x.item(), path, leaves, allow_pickle, depth)
    return _pickled(x, path, leaves, allow_pickle)


def _pickled(x: Any, path: str, leaves: list[Leaf], allow_pickle: bool) -> dict:
    if not allow_pickle:
        raise TypeError(
            f"{path}: {type(x).__qualname__} is not plain data (tensors, numpy arrays, bytes, "
            "str, int, float, bool, None, lists, tuples, dicts); pass allow_pickle=True to "
            "store it pickled")
    b = pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)
    node = {"t": "pickle"}
    leaves.append(Leaf("pickle", b, len(b), node))
    return node


class Plan:
    """Offsets of the leaves in a slot; reusable while the leaf sizes stay the same."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        offsets, pos = [], 0
        for n in sizes:
            pos = align_up(pos, mf.align_for(n))
            offsets.append(pos)
            pos += n
        self.offsets = offsets
        self.data_bytes = pos
        self.manifest_offset = align_up(pos)

    def matches(self, leaves: list[Leaf]) -> bool:
        return len(leaves) == len(self.sizes) and all(
            lf.nbytes == n for lf, n in zip(leaves, self.sizes))

    def place(self, leaves: list[Leaf]) -> None:
        for lf, off in zip(leaves, self.offsets):
            lf.node["off"], lf.node["n"] = off, lf.nbytes


def tensor_view(u8: torch.Tensor, off: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A typed view of ``u8[off:]`` (a uint8 tensor over the arena)."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return u8[off:off + n].view(dtype).view(shape)


def copy_leaf(lf: Leaf, u8: torch.Tensor, arr: np.ndarray, base: int,
              non_blocking: bool = False) -> None:
    """Copy one leaf's bytes into the slot that starts at ``base``."""
    off, n = base + lf.node["off"], lf.nbytes
    if n == 0:
        return
    if lf.kind == "tensor":
        t: torch.Tensor = lf.value
        tensor_view(u8, off, t.dtype, list(t.shape)).copy_(t, non_blocking=non_blocking)
    elif lf.kind == "ndarray":
        a: np.ndarray = lf.value
        np.copyto(arr[off:off + n].view(a.dtype).reshape(a.shape), a, casting="no")
    else:
        arr[off:off + n] = np.frombuffer(lf.value, dtype=np.uint8)


def rebuild(doc: dict[str, Any], u8: torch.Tensor, arr: np.ndarray, base: int, into: Any,
            allow_pickle: bool, device_for: Callable[[str], torch.device]) -> Any:
    """The state a manifest describes, its bytes copied out of the slot at ``base``.

    ``into`` (None: none) is overwritten in place. Everything it holds must have its equal
    in the snapshot: each tensor and numpy array at the same path with the same dtype and
    shape (arrays writable), each dict key present, each list or tuple of the same length.
    What it leaves out (a missing key, None) is allocated; its plain values (numbers,
    strings) are replaced by the snapshot's in the returned state.

    Raises:
        IntoMismatchError: the first path where ``into`` differs; nothing was copied.
    """
    if into is not None:
        _check_into(doc["tree"], "state", into, u8, arr, base, allow_pickle)
    return _decode(doc["tree"], "state", u8, arr, base, into, allow_pickle, device_for)


def _check_into(node: dict[str, Any], path: str, into: Any, u8: torch.Tensor, arr: np.ndarray,
                base: int, allow_pickle: bool) -> None:
    """Raise IntoMismatchError where ``into`` has no equal in the snapshot (see rebuild).

    Every check runs before any byte is copied: a restore that cannot finish leaves
    ``into`` as it was, not half overwritten.
    """
    if into is None:
        return
    t = node["t"]
    if t == "tensor":
        ok = isinstance(into, torch.Tensor) and list(into.shape) == node["shape"] \
            and str(into.dtype).removeprefix("torch.") == node["dtype"]
    elif t == "ndarray":
        ok = isinstance(into, np.ndarray) and list(into.shape) == node["shape"] \
            and into.dtype == mf.ndarray_dtype(node["dtype"]) and into.flags.writeable
    elif t in ("list", "tuple"):
        ok = isinstance(into, (list, tuple)) and len(into) == len(node["v"])
    elif t == "dict":
        ok = isinstance(into, dict)
    else:  # a plain value: the snapshot's replaces it, unless it is something to fill
        ok = not isinstance(into, (torch.Tensor, np.ndarray, list, tuple, dict))
    if not ok:
        raise IntoMismatchError(f"{path}: snapshot holds {_described(node)}, into holds "
                                f"{_described_value(into)}; nothing was restored into it")
    if t in ("list", "tuple"):
        for i, (child, sub) in enumerate(zip(node["v"], into)):
            _check_into(child, f"{path}[{i}]", sub, u8, arr, base, allow_pickle)
    elif t == "dict":
        keys = {_decode(kn, f"{path}.key{i}", u8, arr, base, None, allow_pickle,
                        lambda _: torch.device("cpu")): vn
                for i, (kn, vn) in enumerate(zip(node["k"], node["v"]))}
        for key, sub in into.items():
            if key not in keys:
                raise IntoMismatchError(f"{path}[{key!r}]: not in the snapshot (it holds keys "
                                        f"{_some(keys)}); nothing was restored into it")
            _check_into(keys[key], f"{path}[{key!r}]", sub, u8, arr, base, allow_pickle)


def _described(node: dict[str, Any]) -> str:
    t = node["t"]
    if t == "tensor":
        return f"{node['dtype']}{node['shape']}"
    if t == "ndarray":
        return f"ndarray {mf.ndarray_dtype(node['dtype'])}{node['shape']}"
    if t in ("list", "tuple"):
        return f"a {t} of {len(node['v'])}"
    return _a(t)


def _described_value(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"{'' if x.flags.writeable else 'a read-only '}ndarray {x.dtype}{list(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    return _a(type(x).__name__)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {noun}"


def _some(keys: dict[Any, Any], most: int = 8) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:most])
    return f"[{shown}{', ...' if len(keys) > most else ''}]"


def _decode(node: dict[str, Any], path: str, u8: torch.Tensor, arr: np.ndarray, base: int,
            into: Any, allow_pickle: bool, device_for: Callable[[str], torch.device]) -> Any:
    t = node["t"]
    if t == "tensor":
        dtype = TORCH_DTYPES.get(node["dtype"])
        if dtype is None:
            raise ManifestError(f"{path}: unknown tensor dtype {node['dtype']!r}")
        src = tensor_view(u8, base + node["off"], dtype, node["shape"])
        if isinstance(into, torch.Tensor):  # its dtype and shape match: _check_into
            with torch.no_grad():
                into.copy_(src)
            return into
        out = torch.empty(node["shape"], dtype=dtype, device=device_for(node.get("dev", "cpu")))
        out.copy_(src)
        return out
    if t == "ndarray":
        off, n = base + node["off"], node["n"]
        a = arr[off:off + n].view(mf.ndarray_dtype(node["dtype"])).reshape(node["shape"])
        if isinstance(into, np.ndarray):  # of the same dtype and shape, writable: _check_into
            np.copyto(into, a)
            return into
        return a.copy()
    if t in ("bytes", "pickle"):
        off, n = base + node["off"], node["n"]
        b = arr[off:off + n].tobytes()
        if t == "bytes":
            return b
        if not allow_pickle:
            raise RestoreError(f"{path}: the snapshot holds a pickled object; restore with "
                               "allow_pickle=True to load it")
        return pickle.loads(b)  # noqa: S301 - explicit opt-in above
    if t == "none":
        return None
    if t in ("bool", "int", "str"):
        return node["v"]
    if t == "float":
        return mf.decode_float(node["v"])
    if t in ("list", "tuple"):
        subs = into if isinstance(into, (list, tuple)) and len(into) == len(node["v"]) else None
        items = [_decode(c, f"{path}[{i}]", u8, arr, base, subs[i] if subs else None,
                         allow_pickle, device_for) for i, c in enumerate(node["v"])]
        return items if t == "list" else tuple(items)
    if t == "dict":
        out_d: dict[Any, Any] = OrderedDict() if node.get("ordered") else {}
        for i, (kn, vn) in enumerate(zip(node["k"], node["v"])):
            key = _decode(kn, f"{path}.key{i}", u8, arr, base, None, allow_pickle, device_for)
            sub = into.get(key, None) if isinstance(into, dict) else None
            out_d[key] = _decode(vn, f"{path}[{key!r}]", u8, arr, base, sub, allow_pickle,
                                 device_for)
        if "meta" in node:
            out_d._metadata = _decode(node["meta"], f"{path}._metadata", u8, arr, base,  # type: ignore[attr-defined]
                                      None, allow_pickle, device_for)
        return out_d
    raise ManifestError(f"{path}: unknown manifest node type {t!r}")
