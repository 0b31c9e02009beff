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

from shardguard.proto import parallel_copy
from shardguard.proto import manifest as mf
from shardguard.proto.arena import align_up
from shardguard.proto.crc32c import crc32c_at, crc32c_combine
from shardguard.proto.errors import CorruptionError, IntoMismatchError, ManifestError, RestoreError

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
            allow_pickle: bool, device_for: Callable[[str], torch.device], *,
            data_crc: int | None = None, copy: bool = True) -> Any:
    """The state a manifest describes, its bytes copied out of the slot at ``base``.

    ``into`` (None: none) is overwritten in place. Everything it holds must have its equal
    in the snapshot: each tensor and numpy array at the same path with the same dtype and
    shape (arrays writable), each dict key present, each list or tuple of the same length.
    What it leaves out (a missing key, None) is allocated (fresh memory, faulted in
    ahead of the copy: see ``hostmem``); its plain values (numbers, strings) are
    replaced by the snapshot's in the returned state.

    Args:
        data_crc: the CRC32C the slot's data (``doc["data_bytes"]`` from ``base``) was
            sealed with. Every byte is checked against it as it is copied, chunk by
            chunk, so the slot is read once (proto/parallel_copy.py: from the source just
            before the chunk is copied out of cache, or from the destination right after;
            a tensor on another device or a strided ``into`` is checked at the source just
            before its copy). Pickles are loaded only once the
            whole check passed. None: nothing is checked.
        copy: False: host tensors and numpy arrays are views of ``u8``/``arr`` instead of
            copies (the caller checks those bytes first and keeps them unchanged while the
            views live; ``data_crc`` must be None, ``into`` too).

    Raises:
        IntoMismatchError: the first path where ``into`` differs; nothing was copied.
        CorruptionError: the bytes do not match ``data_crc``; nothing is returned (what
            ``into`` holds may be overwritten in part).
    """
    if not copy and (into is not None or data_crc is not None):
        raise ValueError("a restore without copies makes new tensors and checks nothing")
    if into is not None:
        _check_into(doc["tree"], "state", into, _Decoder(_Slot(u8, arr, base, copy=False),
                                                         allow_pickle, _on_cpu))
    slot = _Slot(u8, arr, base, copy=copy,
                 data_bytes=doc["data_bytes"] if data_crc is not None else 0,
                 data_crc=data_crc)
    decoder = _Decoder(slot, allow_pickle, device_for)
    state = decoder.decode(doc["tree"], "state", into)
    if copy:
        slot.check()
    return _unpickled(state) if decoder.deferred else state


def _on_cpu(_: str) -> torch.device:
    return torch.device("cpu")


#: A checked restore copies this many bytes at a time, each chunk checksummed while it is
#: in cache (proto/parallel_copy.py): the chunk's source and destination fit a core's
#: 1 MiB L2 here. Measured for the memmove fallback (two ctypes calls, ~2 us, per chunk):
#: copy and CRC of 512 MiB into pre-faulted memory against one memcpy of it, same
#: rounds: 256 KiB chunks 1.02x, 512 KiB 1.03x, 1 MiB 0.97x, 2 MiB 0.91x.
CHECK_CHUNK_BYTES = 512 << 10


class _Slot:
    """A slot's data region read out in address order: copied, each chunk checksummed
    as it is copied, or viewed (``copy=False``).

    Leaves come in address order when the manifest is the client's (its plan places them
    in the order the state is walked, and decoding walks it in the same order); padding
    between them is checksummed from the slot. A manifest whose leaves go backwards is
    checked by reading the whole region again at the end.
    """

    def __init__(self, u8: torch.Tensor, arr: np.ndarray, base: int, *, copy: bool,
                 data_bytes: int = 0, data_crc: int | None = None) -> None:
        self.u8, self.arr, self.base, self.copy = u8, arr, base, copy
        self.addr = u8.data_ptr() + base
        self.data_bytes = data_bytes
        self.expected = data_crc
        self.checking = data_crc is not None and copy
        self.pos = 0  # the data before it is checksummed (self.crc)
        self.crc = 0
        self.ordered = True

    def _reach(self, off: int) -> bool:
        """Checksum from where the last leaf ended up to ``off``; whether to checksum the
        leaf at ``off`` as it is copied."""
        if off < self.pos:
            self.ordered = False
        if not (self.checking and self.ordered):
            return False
        if off > self.pos:
            self.crc = crc32c_at(self.addr + self.pos, off - self.pos, self.crc)
        self.pos = off
        return True

    def to_host(self, off: int, n: int, dst: int, fresh: bool = False) -> None:
        """Copy data bytes [off, off + n) to host memory at address ``dst`` (``fresh``:
        new memory, not yet written), each chunk checksummed as it is copied (a large
        leaf in parts on several threads: proto/parallel_copy.py)."""
        if n == 0:
            return
        check = self._reach(off)
        crc = parallel_copy.copy(dst, self.addr + off, n, CHECK_CHUNK_BYTES, check, fresh)
        if check:
            self.crc = crc32c_combine(self.crc, crc, n)
            self.pos = off + n

    def at_source(self, off: int, n: int) -> None:
        """Checksum data bytes [off, off + n) in the slot, for a copy that cannot be
        checked where it lands (another device, a strided tensor): it follows at once."""
        if n and self._reach(off):
            self.crc = crc32c_at(self.addr + off, n, self.crc)
            self.pos = off + n

    def tensor(self, off: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        return tensor_view(self.u8, self.base + off, dtype, shape)

    def ndarray(self, off: int, n: int, dtype: np.dtype, shape: list[int]) -> np.ndarray:
        return self.arr[self.base + off:self.base + off + n].view(dtype).reshape(shape)

    def check(self) -> None:
        """Raise CorruptionError unless the data region, read out, matches its CRC."""
        if self.expected is None:
            return
        if self.ordered:
            self._reach(self.data_bytes)
            crc = self.crc
        else:
            crc = crc32c_at(self.addr, self.data_bytes)
        if crc != self.expected:
            raise CorruptionError(f"the snapshot's data fails its checksum (CRC32C "
                                  f"{crc:#010x}, sealed as {self.expected:#010x})")


@dataclass(frozen=True, eq=False)  # a dict key, by identity
class _Pickled:
    """A pickle read out of a slot whose check is not finished: loaded after it."""

    data: np.ndarray

    def load(self) -> Any:
        return pickle.loads(self.data)  # noqa: S301 - allow_pickle was asked for


def _unpickled(x: Any) -> Any:
    """``x`` (a state :func:`rebuild` made: its own dicts, lists and tuples) with its
    deferred pickles loaded."""
    if isinstance(x, _Pickled):
        return x.load()
    if isinstance(x, list):
        x[:] = [_unpickled(v) for v in x]
        return x
    if isinstance(x, tuple):
        return tuple(_unpickled(v) for v in x)
    if isinstance(x, dict):
        out = type(x)((_unpickled(k), _unpickled(v)) for k, v in x.items())
        meta = getattr(x, "_metadata", None)
        if meta is not None:
            out._metadata = _unpickled(meta)  # type: ignore[attr-defined]
        return out
    return x


def _check_into(node: dict[str, Any], path: str, into: Any, peek: _Decoder) -> None:
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
            _check_into(child, f"{path}[{i}]", sub, peek)
    elif t == "dict":
        keys = {peek.decode(kn, f"{path}.key{i}", None): vn
                for i, (kn, vn) in enumerate(zip(node["k"], node["v"]))}
        for key, sub in into.items():
            if key not in keys:
                raise IntoMismatchError(f"{path}[{key!r}]: not in the snapshot (it holds keys "
                                        f"{_some(keys)}); nothing was restored into it")
            _check_into(keys[key], f"{path}[{key!r}]", sub, peek)


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


class _Decoder:
    """Decodes manifest nodes, reading leaves through a :class:`_Slot`."""

    def __init__(self, slot: _Slot, allow_pickle: bool,
                 device_for: Callable[[str], torch.device]) -> None:
        self.slot, self.allow_pickle, self.device_for = slot, allow_pickle, device_for
        #: Pickles were read before the check finished: :func:`_unpickled` loads them.
        self.deferred = False

    def decode(self, node: dict[str, Any], path: str, into: Any) -> Any:
        t = node["t"]
        if t == "tensor":
            return self._tensor(node, path, into)
        if t == "ndarray":
            return self._ndarray(node, into)
        if t in ("bytes", "pickle"):
            return self._bytes(node, path)
        if t == "none":
            return None
        if t in ("bool", "int", "str"):
            return node["v"]
        if t == "float":
            return mf.decode_float(node["v"])
        if t in ("list", "tuple"):
            subs = into if isinstance(into, (list, tuple)) and len(into) == len(node["v"]) \
                else None
            items = [self.decode(c, f"{path}[{i}]", subs[i] if subs else None)
                     for i, c in enumerate(node["v"])]
            return items if t == "list" else tuple(items)
        if t == "dict":
            out_d: dict[Any, Any] = OrderedDict() if node.get("ordered") else {}
            for i, (kn, vn) in enumerate(zip(node["k"], node["v"])):
                key = self.decode(kn, f"{path}.key{i}", None)
                sub = into.get(key, None) if isinstance(into, dict) else None
                out_d[key] = self.decode(vn, f"{path}[{key!r}]", sub)
            if "meta" in node:
                out_d._metadata = self.decode(node["meta"], f"{path}._metadata",  # type: ignore[attr-defined]
                                              None)
            return out_d
        raise ManifestError(f"{path}: unknown manifest node type {t!r}")

    def _tensor(self, node: dict[str, Any], path: str, into: Any) -> torch.Tensor:
        dtype = TORCH_DTYPES.get(node["dtype"])
        if dtype is None:
            raise ManifestError(f"{path}: unknown tensor dtype {node['dtype']!r}")
        slot, off, n, shape = self.slot, node["off"], node["n"], node["shape"]
        device = self.device_for(node.get("dev", "cpu"))
        if not slot.copy:
            view = slot.tensor(off, dtype, shape)
            return view if device.type == "cpu" else view.to(device)
        # New tensors on plain pages: huge ones stalled a first restore (proto/hostmem.py).
        out = into if isinstance(into, torch.Tensor) else torch.empty(shape, dtype=dtype,
                                                                      device=device)
        if n == 0:
            return out
        if out.device.type == "cpu" and out.is_contiguous() and not out.is_conj() \
                and not out.is_neg():
            slot.to_host(off, n, out.data_ptr(), fresh=out is not into)
            if out is into:
                torch.autograd.graph.increment_version(out)  # as an in-place copy_ would
        else:
            slot.at_source(off, n)
            with torch.no_grad():
                out.copy_(slot.tensor(off, dtype, shape))
        return out

    def _ndarray(self, node: dict[str, Any], into: Any) -> np.ndarray:
        slot, off, n, shape = self.slot, node["off"], node["n"], node["shape"]
        dtype = mf.ndarray_dtype(node["dtype"])
        if not slot.copy:
            return slot.ndarray(off, n, dtype, shape)
        # into: of the same dtype and shape, writable (_check_into)
        out = into if isinstance(into, np.ndarray) else np.empty(shape, dtype=dtype)
        if n == 0:
            return out
        if out.flags.c_contiguous:
            slot.to_host(off, n, out.ctypes.data, fresh=out is not into)
        else:
            slot.at_source(off, n)
            np.copyto(out, slot.ndarray(off, n, dtype, shape))
        return out

    def _bytes(self, node: dict[str, Any], path: str) -> Any:
        slot, off, n = self.slot, node["off"], node["n"]
        if node["t"] == "pickle" and not self.allow_pickle:
            raise RestoreError(f"{path}: the snapshot holds a pickled object; restore with "
                               "allow_pickle=True to load it")
        if slot.copy:
            data = np.empty(n, dtype=np.uint8)
            slot.to_host(off, n, data.ctypes.data, fresh=True)
        else:
            data = slot.ndarray(off, n, np.dtype(np.uint8), [n])
        if node["t"] == "bytes":
            return data.tobytes()
        if slot.checking:
            self.deferred = True
            return _Pickled(data)
        return pickle.loads(data)  # noqa: S301 - explicit opt-in above
