"""The manifest: a plain-data description of one snapshot's state tree.

A manifest is UTF-8 JSON and never code. Its ``tree`` is made of nodes::

    {"t": "tensor",  "dtype": "bfloat16", "shape": [..], "off": o, "n": n, "dev": "cpu"}
    {"t": "ndarray", "dtype": "<f4" or [[field, type], ..], "shape": [..], "off": o, "n": n}
    {"t": "bytes",   "off": o, "n": n}
    {"t": "pickle",  "off": o, "n": n}          # only with allow_pickle
    {"t": "str", "v": "..."}   {"t": "int", "v": 12}   {"t": "bool", "v": true}
    {"t": "float", "v": "0x1.8p+1"}              # float.hex: exact, inf and nan too
    {"t": "none"}
    {"t": "list", "v": [node, ..]}   {"t": "tuple", "v": [node, ..]}
    {"t": "dict", "k": [node, ..], "v": [node, ..]}   # keys keep their type;
        optional "ordered": true and "meta": node (an OrderedDict's _metadata)

``off``/``n`` locate bytes in the slot's data region. :func:`parse` checks a
manifest received from a client before the daemon seals it: shape, types and
every byte range within the data region.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import numpy as np

from shardguard.proto.errors import ManifestError

FORMAT_VERSION = 1
MAX_DEPTH = 64
_LEAF_DATA = {"tensor", "ndarray", "bytes", "pickle"}
_SCALARS = {"str": str, "int": int, "bool": bool}


def align_for(nbytes: int) -> int:
    """Alignment of a data entry: pages for big entries (fast copies), cache lines otherwise."""
    return 4096 if nbytes >= 65536 else 64


def dumps(tree: dict[str, Any], step: int, data_bytes: int) -> bytes:
    return json.dumps({"v": FORMAT_VERSION, "step": step, "data_bytes": data_bytes, "tree": tree},
                      separators=(",", ":")).encode()


def parse(raw: bytes | memoryview, data_bytes: int) -> dict[str, Any]:
    """Parse and validate a manifest; raises ManifestError naming the fault."""
    try:
        doc = json.loads(bytes(raw).decode())
    except (ValueError, RecursionError) as exc:  # incl. ints past Python's 4300 digits
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not _is_int(doc.get("v")) or doc["v"] != FORMAT_VERSION:
        raise ManifestError(f"manifest format version is not {FORMAT_VERSION}")
    if not _is_int(doc.get("data_bytes")) or doc["data_bytes"] != data_bytes:
        raise ManifestError(
            f"manifest data_bytes {doc.get('data_bytes')!r} != sealed data_bytes {data_bytes}")
    if not _is_int(doc.get("step")):
        raise ManifestError("manifest step is not an integer")
    for node in _walk(doc.get("tree"), "state", 0):
        _check_extent(node, data_bytes)
    return doc


def data_entries(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of ``tree`` that owns bytes in the data region."""
    return (n for n in _walk(tree, "state", 0) if n["t"] in _LEAF_DATA)


def _walk(node: Any, path: str, depth: int) -> Iterator[dict[str, Any]]:
    if depth > MAX_DEPTH:
        raise ManifestError(f"manifest nested deeper than {MAX_DEPTH} at {path}")
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise ManifestError(f"manifest node at {path} is not an object with a type")
    t = node["t"]
    yield node
    if t in ("list", "tuple"):
        items = node.get("v")
        if not isinstance(items, list):
            raise ManifestError(f"manifest {t} at {path} has no item list")
        for i, child in enumerate(items):
            yield from _walk(child, f"{path}[{i}]", depth + 1)
    elif t == "dict":
        keys, values = node.get("k"), node.get("v")
        if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
            raise ManifestError(f"manifest dict at {path} has mismatched keys and values")
        for i, (k, v) in enumerate(zip(keys, values)):
            yield from _walk(k, f"{path}.key{i}", depth + 1)
            yield from _walk(v, f"{path}[{i}]", depth + 1)
        if "meta" in node:
            yield from _walk(node["meta"], f"{path}._metadata", depth + 1)
    elif t in _SCALARS:
        if type(node.get("v")) is not _SCALARS[t]:
            raise ManifestError(f"manifest {t} at {path} has a value of the wrong type")
    elif t == "float":
        try:
            float.fromhex(node.get("v"))
        except (TypeError, ValueError):
            raise ManifestError(f"manifest float at {path} is not a hex float") from None
    elif t in _LEAF_DATA:
        if t in ("tensor", "ndarray"):
            shape = node.get("shape")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise ManifestError(f"manifest {t} at {path} has a bad shape")
            size = itemsize(t, node.get("dtype"), path) * math.prod(shape)
            if node.get("n") != size:
                raise ManifestError(
                    f"manifest {t} at {path} holds {node.get('n')!r} bytes, its dtype and shape "
                    f"need {size}")
    elif t != "none":
        raise ManifestError(f"manifest node at {path} has unknown type {t!r}")


# Bytes per element of every tensor dtype a manifest may name (torch's names).
TENSOR_ITEMSIZE: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2, "complex32": 4,
    "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
    "complex64": 8, "complex128": 16,
}


def _is_int(v: Any) -> bool:
    return type(v) is int  # JSON true/false are not integers here


def ndarray_dtype(descr: Any) -> np.dtype:
    """The numpy dtype a manifest names (``dtype_to_descr`` form); no object dtypes."""
    try:
        if isinstance(descr, list):
            dt = np.lib.format.descr_to_dtype([tuple(f) for f in descr])
        elif isinstance(descr, str):
            dt = np.dtype(descr)
        else:
            raise TypeError(descr)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest names an unknown numpy dtype {descr!r}: {exc}") from None
    if dt.hasobject:
        raise ManifestError(f"manifest numpy dtype {descr!r} holds Python objects")
    return dt


def itemsize(kind: str, dtype: Any, path: str = "state") -> int:
    if kind == "tensor":
        if dtype not in TENSOR_ITEMSIZE:
            raise ManifestError(f"manifest tensor at {path} has unknown dtype {dtype!r}")
        return TENSOR_ITEMSIZE[dtype]
    return ndarray_dtype(dtype).itemsize


def _check_extent(node: dict[str, Any], data_bytes: int) -> None:
    if node["t"] not in _LEAF_DATA:
        return
    off, n = node.get("off"), node.get("n")
    if not _is_int(off) or not _is_int(n) or off < 0 or n < 0 \
            or off + n > data_bytes:
        raise ManifestError(
            f"manifest entry ({node['t']}, off={off!r}, n={n!r}) lies outside the "
            f"{data_bytes}-byte data region")


def encode_float(x: float) -> str:
    return x.hex()


def decode_float(s: str) -> float:
    return float.fromhex(s)
