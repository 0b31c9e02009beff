"""The manifest: a plain-data description of one snapshot's state tree.

A manifest is UTF-8 JSON and never code. Its ``tree`` is made of nodes::

    {"t": "tensor",  "dtype": "bfloat16", "shape": [..], "off": o, "n": n, "dev": "cpu"}
    {"t": "ndarray", "dtype": "<f4", "shape": [..], "off": o, "n": n}
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
from typing import Any, Iterator

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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
        raise ManifestError(f"manifest format version is not {FORMAT_VERSION}")
    if doc.get("data_bytes") != data_bytes:
        raise ManifestError(
            f"manifest data_bytes {doc.get('data_bytes')!r} != sealed data_bytes {data_bytes}")
    if not isinstance(doc.get("step"), int):
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
            if (not isinstance(node.get("dtype"), str) or not isinstance(shape, list)
                    or not all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ManifestError(f"manifest {t} at {path} has a bad dtype or shape")
    elif t != "none":
        raise ManifestError(f"manifest node at {path} has unknown type {t!r}")


def _check_extent(node: dict[str, Any], data_bytes: int) -> None:
    if node["t"] not in _LEAF_DATA:
        return
    off, n = node.get("off"), node.get("n")
    if not isinstance(off, int) or not isinstance(n, int) or off < 0 or n < 0 \
            or off + n > data_bytes:
        raise ManifestError(
            f"manifest entry ({node['t']}, off={off!r}, n={n!r}) lies outside the "
            f"{data_bytes}-byte data region")


def encode_float(x: float) -> str:
    return x.hex()


def decode_float(s: str) -> float:
    return float.fromhex(s)
