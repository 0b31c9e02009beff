"""The manifest codec: every valid node parses, every malformed one is refused by name."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardguard.proto.state_layout import Plan, flatten
from shardguard.proto import manifest as mf
from shardguard.proto.errors import ManifestError


def doc(tree: Any, data_bytes: int = 4096, step: int = 5, **changes: Any) -> bytes:
    d = {"v": mf.FORMAT_VERSION, "step": step, "data_bytes": data_bytes, "tree": tree}
    d.update(changes)
    return json.dumps(d).encode()


def nested_lists(depth: int) -> dict[str, Any]:
    """A chain of ``depth`` lists around a ``none`` leaf: the leaf sits at depth ``depth``."""
    node: dict[str, Any] = {"t": "none"}
    for _ in range(depth):
        node = {"t": "list", "v": [node]}
    return node


EVERY_KIND = {"t": "dict", "ordered": True,
              "k": [{"t": "str", "v": k} for k in "abcdefghijklm"] + [
                  {"t": "int", "v": 7}, {"t": "tuple", "v": [{"t": "int", "v": 1}]}],
              "v": [
                  {"t": "tensor", "dtype": "bfloat16", "shape": [2, 3], "off": 0, "n": 12,
                   "dev": "cuda:0"},
                  {"t": "ndarray", "dtype": "<f4", "shape": [3], "off": 64, "n": 12},
                  {"t": "bytes", "off": 128, "n": 5},
                  {"t": "pickle", "off": 192, "n": 30},
                  {"t": "str", "v": "ünïcode"},
                  {"t": "int", "v": 2**80},
                  {"t": "bool", "v": False},
                  {"t": "float", "v": (-0.0).hex()},
                  {"t": "float", "v": "nan"},
                  {"t": "float", "v": "-inf"},
                  {"t": "none"},
                  {"t": "list", "v": []},
                  {"t": "tuple", "v": [{"t": "none"}]},
                  {"t": "dict", "k": [], "v": []},
                  {"t": "tensor", "dtype": "float32", "shape": [0, 4], "off": 4096, "n": 0},
              ],
              "meta": {"t": "dict", "k": [{"t": "str", "v": ""}],
                       "v": [{"t": "dict", "k": [{"t": "str", "v": "version"}],
                              "v": [{"t": "int", "v": 2}]}]}}


# --------------------------------------------------------------------------
# what parses
# --------------------------------------------------------------------------


def test_every_node_kind_parses() -> None:
    got = mf.parse(doc(EVERY_KIND), 4096)
    assert got["tree"] == EVERY_KIND and got["step"] == 5
    kinds = [n["t"] for n in mf.data_entries(got["tree"])]
    assert kinds == ["tensor", "ndarray", "bytes", "pickle", "tensor"]


def test_parse_takes_a_memoryview() -> None:
    raw = doc({"t": "bytes", "off": 0, "n": 10}, data_bytes=10)
    assert mf.parse(memoryview(bytearray(raw)), 10)["tree"]["n"] == 10


def test_extent_may_end_exactly_at_the_data_region() -> None:
    mf.parse(doc({"t": "bytes", "off": 4000, "n": 96}), 4096)
    mf.parse(doc({"t": "bytes", "off": 0, "n": 0}, data_bytes=0), 0)


def test_nesting_up_to_the_limit_parses() -> None:
    mf.parse(doc(nested_lists(mf.MAX_DEPTH)), 4096)


@pytest.mark.parametrize("x", [0.0, -0.0, 1.5, 1e-310, 1e308, float("inf"), float("-inf")])
def test_float_codec_is_exact(x: float) -> None:
    y = mf.decode_float(mf.encode_float(x))
    assert y == x and str(y) == str(x)  # str tells -0.0 from 0.0


def test_align_for() -> None:
    assert mf.align_for(0) == mf.align_for(65535) == 64
    assert mf.align_for(65536) == mf.align_for(1 << 30) == 4096


# --------------------------------------------------------------------------
# what is refused
# --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe{}", b"{'v': 1}", b"[" * 100_000])
def test_not_json(raw: bytes) -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.parse(raw, 0)


@pytest.mark.parametrize("raw", [
    doc({"t": "none"}, v=0), doc({"t": "none"}, v=2), doc({"t": "none"}, v="1"),
    doc({"t": "none"}, v=None), json.dumps({"step": 1, "data_bytes": 0}).encode(),
    b"[1, 2]", b"1", b"null",
], ids=["0", "2", "str", "null", "missing", "list", "int", "json-null"])
def test_wrong_version(raw: bytes) -> None:
    with pytest.raises(ManifestError, match=f"version is not {mf.FORMAT_VERSION}"):
        mf.parse(raw, 0)


@pytest.mark.parametrize("written, sealed", [(4096, 4095), (0, 1), (None, 0), ("4096", 4096)])
def test_data_bytes_mismatch(written: Any, sealed: int) -> None:
    with pytest.raises(ManifestError, match=f"sealed data_bytes {sealed}"):
        mf.parse(doc({"t": "none"}, data_bytes=written), sealed)


@pytest.mark.parametrize("step", [None, "5", 5.0, [5]])
def test_step_not_an_integer(step: Any) -> None:
    with pytest.raises(ManifestError, match="step is not an integer"):
        mf.parse(doc({"t": "none"}, step=step), 4096)


@pytest.mark.parametrize("kind", ["tensor", "ndarray", "bytes", "pickle"])
@pytest.mark.parametrize("off, n", [
    (4000, 97), (4096, 1), (0, 4097), (2**62, 2**62),  # past the end
    (-1, 1), (-4096, 4096),  # negative offsets, even ones that end inside
    (0, -1), (100, -50),  # negative lengths
    (None, 1), (0, None), ("0", 1), (0.0, 1), (0, 1.0),  # not integers
])
def test_extent_outside_the_data_region(kind: str, off: Any, n: Any) -> None:
    node: dict[str, Any] = {"t": kind, "off": off, "n": n}
    if kind in ("tensor", "ndarray"):
        node.update(dtype="uint8", shape=[1])
    tree = {"t": "list", "v": [{"t": "none"}, node]}
    with pytest.raises(ManifestError, match=rf"\({kind}, off=.*4096-byte data region"):
        mf.parse(doc(tree), 4096)


def test_missing_extent() -> None:
    with pytest.raises(ManifestError, match="outside"):
        mf.parse(doc({"t": "bytes"}), 4096)


@pytest.mark.parametrize("node, message", [
    ({"t": "set", "v": []}, "unknown type 'set'"),
    ({"t": "object", "cls": "os.system"}, "unknown type 'object'"),
    ({"t": "Tensor"}, "unknown type 'Tensor'"),
    ({"t": 3}, "not an object with a type"),
    ({"type": "none"}, "not an object with a type"),
    ([{"t": "none"}], "not an object with a type"),
    ("none", "not an object with a type"),
    (None, "not an object with a type"),
])
def test_unknown_node(node: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        mf.parse(doc(node), 4096)


@pytest.mark.parametrize("node", [
    {"t": "int", "v": "1"}, {"t": "int", "v": 1.0}, {"t": "int", "v": True}, {"t": "int"},
    {"t": "bool", "v": 1}, {"t": "bool", "v": "true"}, {"t": "bool", "v": None},
    {"t": "str", "v": 5}, {"t": "str", "v": None}, {"t": "str", "v": ["a"]},
])
def test_scalar_of_the_wrong_type(node: dict) -> None:
    with pytest.raises(ManifestError, match=f"manifest {node['t']} at state has a value of the "
                                            "wrong type"):
        mf.parse(doc(node), 4096)


@pytest.mark.parametrize("v", [1.5, 1, None, "zz", "0x1.8p", ["nan"]])
def test_float_that_is_not_a_hex_float(v: Any) -> None:
    with pytest.raises(ManifestError, match="float at state is not a hex float"):
        mf.parse(doc({"t": "float", "v": v}), 4096)


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
@pytest.mark.parametrize("changes", [
    {"shape": [-1]}, {"shape": [2, -3]}, {"shape": [1.0]}, {"shape": ["2"]}, {"shape": None},
    {"shape": 4}, {"dtype": None}, {"dtype": 4},
])
def test_array_with_a_bad_dtype_or_shape(kind: str, changes: dict) -> None:
    node = {"t": kind, "dtype": "uint8", "shape": [4], "off": 0, "n": 4, **changes}
    with pytest.raises(ManifestError, match=rf"{kind} at state has (a bad shape|unknown dtype)"
                                            r"|unknown numpy dtype"):
        mf.parse(doc(node), 4096)


@pytest.mark.parametrize("depth", [mf.MAX_DEPTH + 1, 200])
def test_nested_too_deep(depth: int) -> None:
    with pytest.raises(ManifestError, match=f"nested deeper than {mf.MAX_DEPTH}"):
        mf.parse(doc(nested_lists(depth)), 4096)


def test_dict_keys_count_towards_depth() -> None:
    deep_key = {"t": "dict", "k": [nested_lists(mf.MAX_DEPTH)], "v": [{"t": "none"}]}
    with pytest.raises(ManifestError, match="nested deeper"):
        mf.parse(doc(deep_key), 4096)


@pytest.mark.parametrize("node", [
    {"t": "dict", "k": [{"t": "int", "v": 1}], "v": []},
    {"t": "dict", "k": [], "v": [{"t": "none"}]},
    {"t": "dict", "v": []},
    {"t": "dict", "k": []},
    {"t": "dict", "k": {}, "v": {}},
    {"t": "dict", "k": "ab", "v": "cd"},
])
def test_dict_with_mismatched_keys_and_values(node: dict) -> None:
    with pytest.raises(ManifestError, match="dict at state has mismatched keys and values"):
        mf.parse(doc(node), 4096)


@pytest.mark.parametrize("kind", ["list", "tuple"])
@pytest.mark.parametrize("items", [None, {}, "abc", 3])
def test_sequence_without_an_item_list(kind: str, items: Any) -> None:
    node = {"t": kind} if items is None else {"t": kind, "v": items}
    with pytest.raises(ManifestError, match=f"{kind} at state has no item list"):
        mf.parse(doc(node), 4096)


@pytest.mark.parametrize("tree, path", [
    ({"t": "list", "v": [{"t": "none"}, {"t": "none"}, {"t": "int", "v": "x"}]}, r"state\[2\]"),
    ({"t": "dict", "k": [{"t": "none"}, {"t": "bogus"}], "v": [{"t": "none"}] * 2},
     r"state\.key1"),
    ({"t": "dict", "k": [{"t": "none"}], "v": [{"t": "tuple", "v": [{"t": "str"}]}]},
     r"state\[0\]\[0\]"),
    ({"t": "dict", "k": [], "v": [], "meta": {"t": "int", "v": None}}, r"state\._metadata"),
])
def test_faults_name_the_path(tree: dict, path: str) -> None:
    with pytest.raises(ManifestError, match=rf"at {path} "):
        mf.parse(doc(tree), 4096)


@pytest.mark.parametrize("node", [
    {"t": "ndarray", "dtype": "<f4", "shape": [1000], "off": 0, "n": 4},
    {"t": "tensor", "dtype": "float32", "shape": [1000], "off": 0, "n": 4, "dev": "cpu"},
    {"t": "tensor", "dtype": "float32", "shape": [2], "off": 0, "n": 16, "dev": "cpu"},
])
def test_array_size_must_match_its_extent(node: dict) -> None:
    with pytest.raises(ManifestError):
        mf.parse(doc(node, data_bytes=16), 16)


@pytest.mark.parametrize("raw", [
    doc({"t": "none"}, v=True),
    doc({"t": "none"}, step=True),
    doc({"t": "bytes", "off": True, "n": 1}),
    doc({"t": "ndarray", "dtype": "|u1", "shape": [True], "off": 0, "n": 1}),
], ids=["version", "step", "off", "shape"])
def test_booleans_are_not_integers(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        mf.parse(raw, 4096)


# --------------------------------------------------------------------------
# property: whatever the client writes, the daemon accepts
# --------------------------------------------------------------------------

TENSOR_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                 torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]
shapes = st.lists(st.integers(0, 5), max_size=3)
tensors = st.builds(lambda d, s: torch.zeros(s, dtype=d), st.sampled_from(TENSOR_DTYPES), shapes)
ndarrays = st.builds(lambda d, s: np.zeros(s, dtype=d),
                     st.sampled_from(["<f4", ">i8", "|b1", "<c16", "<U3", "|S2", "<M8[ns]"]),
                     shapes)
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**100), 2**100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=40),
    tensors, ndarrays)
keys = st.one_of(st.text(max_size=4), st.integers(-5, 5), st.tuples(st.integers(), st.text()))
states = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(st.text(max_size=4), children, max_size=4).map(OrderedDict),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(states, st.integers(0, 2**63 - 1))
def test_any_flattened_state_parses_back(state: Any, step: int) -> None:
    tree, lvs = flatten(state)
    plan = Plan(tuple(lf.nbytes for lf in lvs))
    plan.place(lvs)
    raw = mf.dumps(tree, step, plan.data_bytes)
    got = mf.parse(raw, plan.data_bytes)
    assert got["step"] == step and got["tree"] == json.loads(json.dumps(tree))
    entries = list(mf.data_entries(got["tree"]))
    assert [(e["off"], e["n"]) for e in entries] == [(lf.node["off"], lf.nbytes) for lf in lvs]
    ends = [0] + [e["off"] + e["n"] for e in entries]
    assert all(e["off"] >= end for e, end in zip(entries, ends))  # in order, disjoint


def test_the_deepest_state_flatten_accepts_parses() -> None:
    # The client and the daemon must agree on the limit, or a snapshot fails at seal.
    state: Any = None
    deepest = None
    for _ in range(mf.MAX_DEPTH + 5):
        try:
            tree, _ = flatten(state)
        except TypeError as exc:
            assert "deeper" in str(exc)
            break
        deepest = tree
        state = [state]
    else:
        pytest.fail("flatten accepted any depth")
    mf.parse(mf.dumps(deepest, 0, 0), 0)
    with pytest.raises(ManifestError, match="deeper"):
        mf.parse(mf.dumps({"t": "list", "v": [deepest]}, 0, 0), 0)
