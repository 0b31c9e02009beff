"""The client's layout: flatten, plan, copy into a plain byte buffer, rebuild; no daemon."""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardguard.proto.state_layout import Leaf, Plan, copy_leaf, flatten, rebuild, tensor_view
from shardguard.proto import arena as fmt
from shardguard.proto import manifest as mf
from shardguard.proto.crc32c import crc32c
from shardguard.proto.errors import CorruptionError, IntoMismatchError, ManifestError, RestoreError

SLOT_BYTES = 1 << 20


class Opaque:
    """Not plain data: only stored pickled."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.x == self.x


def cpu(_: str) -> torch.device:
    return torch.device("cpu")


class Slot:
    """One snapshot written into slot 1 of an arena-shaped buffer, the way the client does it."""

    def __init__(self, state: Any, allow_pickle: bool = False, step: int = 7) -> None:
        tree, self.leaves = flatten(state, allow_pickle)
        self.plan = Plan(tuple(lf.nbytes for lf in self.leaves))
        self.plan.place(self.leaves)
        slot_bytes = fmt.align_up(self.plan.manifest_offset + 4 * fmt.PAGE + len(str(tree)))
        # Garbage everywhere first: nothing may depend on the buffer starting zeroed.
        g = torch.Generator().manual_seed(1)
        self.u8 = torch.randint(0, 256, (fmt.arena_bytes(slot_bytes),), dtype=torch.uint8,
                                generator=g)
        self.arr = self.u8.numpy()
        self.base = fmt.slot_offset(1, slot_bytes)
        for lf in self.leaves:
            copy_leaf(lf, self.u8, self.arr, self.base)
        raw = mf.dumps(tree, step, self.plan.data_bytes)
        mo = self.base + self.plan.manifest_offset
        self.arr[mo:mo + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        # Read the manifest back from the buffer, as restore does.
        self.doc = mf.parse(self.arr[mo:mo + len(raw)], self.plan.data_bytes)

    def rebuild(self, into: Any = None, allow_pickle: bool = False,
                device_for: Callable[[str], torch.device] = cpu) -> Any:
        return rebuild(self.doc, self.u8, self.arr, self.base, into, allow_pickle, device_for)


def round_trip(state: Any, **kw: Any) -> Any:
    return Slot(state, **kw).rebuild(allow_pickle=kw.get("allow_pickle", False))


def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so that NaN payloads, -0.0 and odd float8 codes compare exactly."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Exact equality, types included: a float is compared bit for bit, a tuple is not a list."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(raw(a), raw(b)), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for (ka, va), kb in zip(a.items(), b):
            assert_same(ka, kb, f"{path}.key")
            assert_same(va, b[kb], f"{path}[{ka!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a.hex() == b.hex(), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included) of any dtype."""
    n = math.prod(shape) * dtype.itemsize
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        bits &= 1
    return bits.view(dtype).reshape(shape)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
          torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES.append(torch.float8_e8m0fnu)


# --------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (7, 5))
    got = round_trip({"t": t})["t"]
    assert_same(t, got)
    assert got.is_contiguous() and got.device.type == "cpu"


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_complex32_round_trips() -> None:
    t = random_tensor(torch.complex32, (3, 4))
    assert_same(t, round_trip(t))


def test_floats_keep_nan_payloads_and_signed_zero() -> None:
    t = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), float("nan"), 1e-45])
    payloads = np.array([0x7FC00001, 0xFFC00002], dtype=np.uint32).view(np.float32)
    t = torch.cat([t, torch.from_numpy(payloads)])
    assert_same(t, round_trip(t))


def _big() -> torch.Tensor:
    return torch.arange(600 * 500, dtype=torch.float32).reshape(600, 500)


@pytest.mark.parametrize("make", [
    lambda: _big().t(),
    lambda: _big()[::3, 1::7],
    lambda: _big()[100:],  # storage offset
    lambda: torch.ones(3, 1).expand(3, 4),  # stride 0
    lambda: random_tensor(torch.bfloat16, (4, 6))[:, ::2],
    lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    lambda: torch.randn(4, 4, dtype=torch.complex64).conj(),  # lazy conjugate bit
    lambda: torch.arange(10.0).flip(0),
], ids=["transpose", "strided", "offset", "expanded", "bf16-strided", "channels-last", "conj",
        "flipped"])
def test_views_come_back_as_plain_tensors(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    got = round_trip([t])[0]
    assert got.is_contiguous() and got.shape == t.shape and not got.is_conj()
    assert torch.equal(got, t.resolve_conj())


@pytest.mark.parametrize("t", [
    torch.tensor(3.5), torch.tensor(7, dtype=torch.int64), torch.tensor(True),
    torch.tensor(1.25, dtype=torch.bfloat16), torch.empty(0), torch.empty(0, 4),
    torch.empty(2, 0, 3, dtype=torch.bfloat16), torch.empty(0, dtype=torch.float8_e5m2),
], ids=lambda t: f"{str(t.dtype)[6:]}{list(t.shape)}")
def test_zero_dim_and_empty_tensors(t: torch.Tensor) -> None:
    got = round_trip({"before": torch.ones(3), "t": t, "after": torch.full((2,), 9.0)})
    assert_same(t, got["t"])
    assert torch.equal(got["after"], torch.full((2,), 9.0))  # the empty one overwrote nothing


def test_parameters_and_grad_tensors_are_stored_detached() -> None:
    p = torch.nn.Parameter(torch.randn(3, 3))
    got = round_trip({"p": p, "y": p * 2})
    assert type(got["p"]) is torch.Tensor and not got["p"].requires_grad
    assert torch.equal(got["p"], p.detach()) and torch.equal(got["y"], (p * 2).detach())


def test_sparse_tensors_are_refused() -> None:
    with pytest.raises(TypeError, match=r"state\['s'\]: only dense strided"):
        flatten({"s": torch.eye(3).to_sparse()})


def test_restored_data_does_not_alias_the_slot() -> None:
    state = {"t": torch.arange(5.0), "a": np.arange(4), "b": b"abc"}
    s = Slot(state)
    got = s.rebuild()
    s.u8.zero_()
    assert torch.equal(got["t"], torch.arange(5.0))
    assert np.array_equal(got["a"], np.arange(4)) and got["a"].flags.writeable
    assert got["b"] == b"abc"


def test_the_recorded_device_is_asked_for() -> None:
    s = Slot({"t": torch.ones(2)})
    s.doc["tree"]["v"][0]["dev"] = "cuda:3"
    asked: list[str] = []

    def resolve(dev: str) -> torch.device:
        asked.append(dev)
        return torch.device("cpu")

    assert torch.equal(s.rebuild(device_for=resolve)["t"], torch.ones(2))
    assert asked == ["cuda:3"]


def test_unknown_dtype_in_the_manifest() -> None:
    s = Slot({"t": torch.ones(2)})
    s.doc["tree"]["v"][0]["dtype"] = "float33"
    with pytest.raises(ManifestError, match=r"state\['t'\]: unknown tensor dtype 'float33'"):
        s.rebuild()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES),
                          st.lists(st.integers(0, 6), max_size=3),
                          st.booleans(), st.integers(0, 2**32 - 1)), max_size=6))
def test_random_tensors_round_trip(specs: list) -> None:
    state = []
    for dtype, shape, transpose, seed in specs:
        t = random_tensor(dtype, tuple(shape), seed)
        state.append(t.t() if transpose and t.dim() == 2 else t)
    assert_same(state, round_trip(state))


# --------------------------------------------------------------------------
# numpy arrays and bytes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("a", [
    np.linspace(0, 1, 11), np.arange(6, dtype=np.int16).reshape(2, 3),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(100).reshape(10, 10)[::2, ::3], np.array(2.5), np.array(3, dtype=np.uint64),
    np.empty((0, 3), dtype=np.float32), np.arange(5, dtype=">i4"),
    np.array([1 + 2j, -0.0 - 1j], dtype=np.complex64), np.array([True, False]),
    np.array(["a", "ünï"]), np.array([b"xy", b""]),
    np.array(["2024-01-01T00:00:00.5"], dtype="datetime64[ns]"),
    np.array([np.nan, -np.inf, -0.0], dtype=np.float16),
], ids=["linspace", "int16", "fortran", "strided", "0d", "0d-u64", "empty", "big-endian",
        "complex", "bool", "unicode", "bytes", "datetime", "specials"])
def test_ndarrays_round_trip(a: np.ndarray) -> None:
    got = round_trip({"a": a})["a"]
    assert got.dtype == a.dtype and got.shape == a.shape
    assert np.array_equal(got, a, equal_nan=a.dtype.kind in "fc")
    assert got.tobytes() == np.ascontiguousarray(a).tobytes()
    assert got.flags.c_contiguous and got.flags.owndata


def test_structured_array_keeps_its_fields() -> None:
    a = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    a["a"], a["b"] = [1, 2, 3], [0.5, 1.5, 2.5]
    got = round_trip(a)
    assert got.dtype == a.dtype and np.array_equal(got, a)


def test_object_arrays_need_pickle() -> None:
    a = np.array([1, "x", None], dtype=object)
    with pytest.raises(TypeError, match=r"state\[0\]: ndarray is not plain data"):
        flatten([a])
    got = round_trip([a], allow_pickle=True)[0]
    assert got.dtype == object and list(got) == [1, "x", None]


@pytest.mark.parametrize("b", [b"", b"\x00\x01binary", bytes(range(256)) * 300,
                               bytearray(b"mutable"), memoryview(b"viewed")],
                         ids=["empty", "short", "big", "bytearray", "memoryview"])
def test_bytes_round_trip_as_bytes(b: Any) -> None:
    assert_same(bytes(b), round_trip({"b": b})["b"])


# --------------------------------------------------------------------------
# scalars and containers
# --------------------------------------------------------------------------

SCALARS = [0, 1, -1, 2**63, -(2**63) - 1, 2**200, -(3**300), 0.0, -0.0, 1.5, float("inf"),
           float("-inf"), float("nan"), 1e-310, 5e-324, 1.7976931348623157e308, True, False,
           None, "", "ünïcode \x00 \ud800 ✓", "x" * 10_000]


@pytest.mark.parametrize("x", SCALARS, ids=repr)
def test_scalars_round_trip_exactly(x: Any) -> None:
    assert_same([x], round_trip([x]))


def test_numpy_scalars_become_python_scalars() -> None:
    got = round_trip([np.float32(1.5), np.int64(-3), np.bool_(True), np.float64("nan")])
    assert_same([1.5, -3, True, float("nan")], got)


def test_huge_int_round_trips_or_is_refused_by_flatten() -> None:
    x = 10**5000
    try:
        tree, leaves = flatten({"x": x})
    except TypeError as exc:
        assert "state['x']" in str(exc)
        return
    Plan(tuple(lf.nbytes for lf in leaves)).place(leaves)
    mf.dumps(tree, 0, 0)


def test_tuples_and_lists_are_kept_apart() -> None:
    state = (1, [2, (3, [4])], (), [], ([],), [()])
    assert_same(state, round_trip(state))


def test_dict_keys_keep_their_types_and_order() -> None:
    state = {3: "int", "3": "str", (1, "a"): "tuple", (): "empty tuple", None: "none",
             2.5: "float", False: "bool", b"k": "bytes", -(2**70): "big"}
    got = round_trip(state)
    assert_same(state, got)
    assert [type(k) for k in got] == [type(k) for k in state]


def test_ordered_dict_keeps_its_metadata() -> None:
    sd: OrderedDict = OrderedDict(w=torch.ones(3), b=torch.zeros(2))
    meta = OrderedDict({"": {"version": 2}, "sub": {"version": 1}})
    sd._metadata = meta  # type: ignore[attr-defined]
    plain = OrderedDict(x=1)
    got = round_trip({"sd": sd, "plain": plain, "d": {"k": 1}})
    assert type(got["sd"]) is OrderedDict and type(got["d"]) is dict
    assert got["sd"]._metadata == sd._metadata  # type: ignore[attr-defined]
    assert not hasattr(got["plain"], "_metadata")
    assert_same(sd, got["sd"])


def test_module_state_dict_loads_back_strictly() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model(torch.randn(5, 4))  # moves the running statistics and num_batches_tracked
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    got = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(got["model"], strict=True)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    fresh_opt.load_state_dict(got["opt"])
    assert_same(model.state_dict(), fresh.state_dict())
    assert_same(opt.state_dict(), fresh_opt.state_dict())


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    state: Any = 1
    for _ in range(mf.MAX_DEPTH + 1):
        state = [state]
    with pytest.raises(TypeError, match=f"nested deeper than {mf.MAX_DEPTH}"):
        flatten(state)


# --------------------------------------------------------------------------
# pickle is opt-in
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value, kind", [
    (Opaque(1), "Opaque"), ({1, 2}, "set"), (range(3), "range"), (lambda: 1, "function"),
], ids=["class", "set", "range", "lambda"])
def test_pickle_refused_without_opt_in(value: Any, kind: str) -> None:
    state = {"a": [0, {"o": value}]}
    with pytest.raises(TypeError, match=rf"state\['a'\]\[1\]\['o'\]: .*{kind}.* allow_pickle=True"):
        flatten(state)


def test_pickle_accepted_with_opt_in() -> None:
    state = {"o": Opaque(2), "s": {3, 4}, "t": torch.ones(2)}
    s = Slot(state, allow_pickle=True)
    assert [lf.kind for lf in s.leaves] == ["pickle", "pickle", "tensor"]
    got = s.rebuild(allow_pickle=True)
    assert got["o"] == Opaque(2) and got["s"] == {3, 4} and torch.equal(got["t"], torch.ones(2))
    # The slot holds the pickle's exact bytes.
    assert pickle.loads(s.leaves[0].value) == Opaque(2)


def test_restoring_a_pickle_needs_the_opt_in_again() -> None:
    s = Slot({"o": [Opaque(3)]}, allow_pickle=True)
    with pytest.raises(RestoreError, match=r"state\['o'\]\[0\]: .*allow_pickle=True"):
        s.rebuild(allow_pickle=False)


# --------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 70_000), st.sampled_from([65535, 65536, 4096, 64, 0])),
                max_size=12))
def test_plan_alignment(sizes: list[int]) -> None:
    plan = Plan(tuple(sizes))
    end = 0
    for n, off in zip(sizes, plan.offsets):
        assert off % (4096 if n >= 65536 else 64) == 0, (n, off)
        assert end <= off < end + (4096 if n >= 65536 else 64)  # no hole larger than needed
        end = off + n
    assert plan.data_bytes == end
    assert plan.manifest_offset == fmt.align_up(end) and plan.manifest_offset % fmt.PAGE == 0


def test_plan_places_big_entries_on_pages() -> None:
    s = Slot({"small": torch.ones(3), "big": torch.ones(65536, dtype=torch.uint8),
              "odd": b"x" * 5, "just_under": torch.ones(65535, dtype=torch.uint8)})
    offs = [lf.node["off"] for lf in s.leaves]
    assert offs == [0, 4096, 4096 + 65536, 4096 + 65536 + 64]


def test_empty_plan() -> None:
    plan = Plan(())
    assert (plan.offsets, plan.data_bytes, plan.manifest_offset) == ([], 0, 0)
    assert round_trip({"x": 1, "y": [None]}) == {"x": 1, "y": [None]}


def test_plan_is_reused_while_sizes_stay_the_same() -> None:
    _, leaves = flatten({"a": torch.ones(4), "b": b"12345678"})
    plan = Plan(tuple(lf.nbytes for lf in leaves))
    assert plan.matches(leaves)
    # Other kinds and values of the same sizes: the same offsets serve.
    _, same = flatten([np.zeros(2, dtype=np.float64), torch.zeros(8, dtype=torch.uint8)])
    assert plan.matches(same)
    plan.place(same)
    assert [(lf.node["off"], lf.node["n"]) for lf in same] == [(0, 16), (64, 8)]
    for state in ({"a": torch.ones(5), "b": b"12345678"}, {"a": torch.ones(4)},
                  {"a": torch.ones(4), "b": b"12345678", "c": b""}):
        assert not plan.matches(flatten(state)[1])


def test_copy_leaf_writes_only_its_extent() -> None:
    u8 = torch.zeros(256, dtype=torch.uint8)
    arr = u8.numpy()
    cases = [Leaf("tensor", torch.full((2,), 1.0), 8, {"off": 64}),
             Leaf("ndarray", np.full(3, 7, dtype=np.uint8), 3, {"off": 128}),
             Leaf("bytes", b"\xff\xfe", 2, {"off": 192}),
             Leaf("tensor", torch.empty(0), 0, {"off": 200})]
    for lf in cases:
        copy_leaf(lf, u8, arr, base=0)
    want = np.zeros(256, dtype=np.uint8)
    want[64:72] = np.frombuffer(np.full(2, 1.0, dtype=np.float32).tobytes(), dtype=np.uint8)
    want[128:131] = 7
    want[192:194] = [0xFF, 0xFE]
    assert np.array_equal(arr, want)


def test_tensor_view_is_a_view() -> None:
    u8 = torch.zeros(64, dtype=torch.uint8)
    v = tensor_view(u8, 8, torch.int32, [2, 2])
    v.fill_(-1)
    assert u8[8:24].eq(255).all() and u8[:8].eq(0).all() and u8[24:].eq(0).all()


# --------------------------------------------------------------------------
# restore into an existing state
# --------------------------------------------------------------------------


def test_rebuild_into_copies_in_place() -> None:
    saved = {"w": torch.randn(3, 4), "n": [torch.arange(3), (torch.ones(2),)],
             "a": np.arange(4.0), "lr": 0.1}
    s = Slot(saved)
    target = {"w": torch.zeros(3, 4), "n": [torch.zeros(3, dtype=torch.int64),
                                            (torch.zeros(2),)],
              "a": np.zeros(4), "lr": 0.5}
    ids = (target["w"], target["n"][0], target["n"][1][0], target["a"])
    got = s.rebuild(into=target)
    assert got["w"] is ids[0] and got["n"][0] is ids[1] and got["n"][1][0] is ids[2]
    assert got["a"] is ids[3]
    assert_same(saved, got)


def test_rebuild_into_parameters_and_views() -> None:
    model = torch.nn.Linear(3, 2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    s = Slot({"model": saved, "t": torch.arange(6.0).reshape(2, 3)})
    with torch.no_grad():
        model.weight.add_(1.0)
    base = torch.zeros(3, 2)
    target = {"model": model.state_dict(), "t": base.t()}  # a non-contiguous target
    got = s.rebuild(into=target)
    assert torch.equal(model.weight, saved["weight"]) and model.weight.requires_grad
    assert got["t"] is target["t"] and torch.equal(base, torch.arange(6.0).reshape(2, 3).t())


def test_rebuild_into_allocates_what_is_missing() -> None:
    s = Slot({"a": torch.ones(2), "b": torch.full((3,), 2.0), "c": np.ones(2), "d": [1, 2]})
    target = {"a": torch.zeros(2), "c": None, "d": [5, None]}  # no b; c left out too
    got = s.rebuild(into=target)
    assert got["a"] is target["a"] and torch.equal(got["b"], torch.full((3,), 2.0))
    assert got["c"].dtype == np.float64 and np.array_equal(got["c"], np.ones(2))
    assert got["d"] == [1, 2]  # plain values come from the snapshot


def snapshot_for_into() -> Slot:
    return Slot({"a": torch.ones(2), "c": np.ones(2), "n": [torch.ones(3), 4],
                 "t": (torch.ones(1),), "lr": 0.1})


# One rule for every mismatch (issue 15, item 12): what ``into`` holds must have its equal
# in the snapshot, else a clear error naming the first path that differs, and nothing of
# ``into`` is touched (here "a", checked first, matches and must still be zeros).
@pytest.mark.parametrize("extra, message", [
    ({"weight": torch.zeros(2)}, r"state\['weight'\]: not in the snapshot \(it holds keys "
                                 r"\['a', 'c', 'n', 't', 'lr'\]\)"),
    ({"c": np.zeros(2, dtype=np.float32)},
     r"state\['c'\]: snapshot holds ndarray float64\[2\], into holds ndarray float32\[2\]"),
    ({"c": np.zeros(2).view()}, None),  # a writable view: fine (checked below)
    ({"c": np.broadcast_to(np.zeros(1), (2,))},
     r"state\['c'\]: .* into holds a read-only ndarray"),
    ({"c": torch.zeros(2, dtype=torch.float64)},
     r"state\['c'\]: snapshot holds ndarray float64\[2\], into holds float64\[2\]"),
    ({"n": [torch.zeros(3)]}, r"state\['n'\]: snapshot holds a list of 2, into holds a list of 1"),
    ({"n": [torch.zeros(3), torch.zeros(1)]},
     r"state\['n'\]\[1\]: snapshot holds an int, into holds float32\[1\]"),
    ({"t": (torch.zeros(2),)}, r"state\['t'\]\[0\]: snapshot holds float32\[1\], "
                              r"into holds float32\[2\]"),
    ({"lr": {"x": 1}}, r"state\['lr'\]: snapshot holds a float, into holds a dict"),
    ({"c": [1.0, 1.0]}, r"state\['c'\]: snapshot holds ndarray float64\[2\], into holds a list of 2"),
])
def test_rebuild_into_a_mismatch_raises_and_changes_nothing(extra: dict, message: str | None
                                                            ) -> None:
    s = snapshot_for_into()
    target = {"a": torch.zeros(2), **extra}
    if message is None:
        got = s.rebuild(into=target)
        assert got["c"] is target["c"] and np.array_equal(target["c"], np.ones(2))
        return
    with pytest.raises(IntoMismatchError, match=message) as err:
        s.rebuild(into=target)
    assert isinstance(err.value, RestoreError) and "nothing was restored" in str(err.value)
    assert torch.equal(target["a"], torch.zeros(2))  # nothing copied, not even what matched


@pytest.mark.parametrize("into, message", [
    (torch.zeros(5), r"float32\[4\].* float32\[5\]"),
    (torch.zeros(2, 2), r"float32\[4\].* float32\[2, 2\]"),
    (torch.zeros(4, dtype=torch.float64), r"float32\[4\].* float64\[4\]"),
    (torch.zeros(4, dtype=torch.bfloat16), r"float32\[4\].* bfloat16\[4\]"),
])
def test_rebuild_into_a_mismatched_tensor_raises(into: torch.Tensor, message: str) -> None:
    s = Slot({"opt": [{"w": torch.arange(4.0)}]})
    before = into.clone()
    path = r"state\['opt'\]\[0\]\['w'\]"
    with pytest.raises(RestoreError, match=rf"{path}: snapshot holds {message}"):
        s.rebuild(into={"opt": [{"w": into}]})
    assert torch.equal(into, before)


# --------------------------------------------------------------------------
# checked restore: every byte against the seal's CRC32C, as it is copied
# --------------------------------------------------------------------------

#: A class whose unpickling is seen: a pickle must not be loaded before the check passes.
LOADED: list[int] = []


class Loud:
    def __init__(self, x: int) -> None:
        self.x = x

    def __setstate__(self, state: dict) -> None:
        LOADED.append(state["x"])
        self.__dict__.update(state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Loud) and other.x == self.x


def checked_state() -> dict:
    """Leaves that cross chunks (over CHECK_CHUNK_BYTES), small ones, padding between them
    (odd sizes), arrays, bytes and a pickle."""
    g = torch.Generator().manual_seed(3)
    return {"big": torch.randn(700_001, generator=g),  # 2.8 MB: several chunks
            "small": torch.arange(7, dtype=torch.int16),
            "t": torch.randn(33, 17, generator=g).t(),
            "np": np.arange(1001, dtype=np.float64), "b": b"\x05" * 333,
            "obj": Loud(4), "tail": torch.ones(3)}


def data_crc(s: Slot) -> int:
    return crc32c(s.arr[s.base:s.base + s.plan.data_bytes])


def target_for(state: dict, strided: bool) -> dict:
    """An ``into`` of ``state``'s structure, zeroed; ``strided``: its tensors are strided views
    (checked at the source, then copied)."""
    def zero(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(t.shape[::-1], dtype=t.dtype).t() if strided and t.dim() == 2 \
            else torch.zeros_like(t)
    return {k: zero(v) if isinstance(v, torch.Tensor) else
            np.zeros_like(v) if isinstance(v, np.ndarray) else None for k, v in state.items()}


@pytest.mark.parametrize("path", ["fresh", "into", "into-strided"])
def test_a_checked_restore_is_bit_exact(path: str) -> None:
    state = checked_state()
    s = Slot(state, allow_pickle=True)
    into = None if path == "fresh" else target_for(state, path == "into-strided")
    got = rebuild(s.doc, s.u8, s.arr, s.base, into, True, cpu, data_crc=data_crc(s))
    assert_same(state, got)
    if into is not None:
        assert got["big"] is into["big"] and got["t"] is into["t"] and got["np"] is into["np"]


def test_a_restore_without_copies_views_the_slot() -> None:
    state = checked_state()
    s = Slot(state, allow_pickle=True)
    got = rebuild(s.doc, s.u8, s.arr, s.base, None, True, cpu, copy=False)
    assert_same(state, got)
    big = s.base + s.doc["tree"]["v"][0]["off"]
    assert got["big"].data_ptr() == s.u8[big:].data_ptr()  # the slot's bytes, not a copy
    with pytest.raises(ValueError, match="without copies"):
        rebuild(s.doc, s.u8, s.arr, s.base, target_for(state, False), True, cpu, copy=False)


def leaf_offsets(s: Slot) -> dict[str, int]:
    return {k["v"]: v["off"] for k, v in zip(s.doc["tree"]["k"], s.doc["tree"]["v"])
            if "off" in v}


# Places in the data region: the first byte, inside the second chunk of a big tensor, in the
# padding between two leaves, inside a strided target's bytes, inside the pickle, the last byte.
WHERE = ["first", "big-mid", "padding", "t", "pickle", "last"]


def flip_at(s: Slot, where: str) -> None:
    offs = leaf_offsets(s)
    at = {"first": 0, "big-mid": offs["big"] + 700_000, "padding": offs["small"] + 14,
          "t": offs["t"] + 5, "pickle": offs["obj"] + 3, "last": s.plan.data_bytes - 1}[where]
    assert where != "padding" or offs["small"] + 14 < offs["t"]  # past "small", before "t"
    s.arr[s.base + at] ^= 0xFF


@pytest.mark.parametrize("path", ["fresh", "into", "into-strided"])
@pytest.mark.parametrize("where", WHERE)
def test_a_flipped_byte_fails_the_check_and_no_pickle_is_loaded(path: str, where: str) -> None:
    state = checked_state()
    s = Slot(state, allow_pickle=True)
    crc = data_crc(s)
    flip_at(s, where)
    LOADED.clear()
    into = None if path == "fresh" else target_for(state, path == "into-strided")
    with pytest.raises(CorruptionError, match="fails its checksum"):
        rebuild(s.doc, s.u8, s.arr, s.base, into, True, cpu, data_crc=crc)
    assert LOADED == []  # the pickle (sound or not) was never loaded


def test_leaves_out_of_address_order_are_checked_too() -> None:
    """A manifest the client did not write may list leaves in any order: the region is then
    checked whole, from the slot."""
    state = {"a": torch.arange(5000.0), "b": torch.ones(3000)}
    s = Slot(state)
    tree = s.doc["tree"]
    tree["k"].reverse()
    tree["v"].reverse()  # "b" is decoded first, though "a" lies first in the slot
    crc = data_crc(s)
    assert_same({"b": state["b"], "a": state["a"]},
                rebuild(s.doc, s.u8, s.arr, s.base, None, False, cpu, data_crc=crc))
    s.arr[s.base + 4 * 4999] ^= 1  # in "a", decoded last
    with pytest.raises(CorruptionError):
        rebuild(s.doc, s.u8, s.arr, s.base, None, False, cpu, data_crc=crc)


@pytest.mark.parametrize("native", [True, False], ids=["c-copy", "memmove"])
@pytest.mark.parametrize("flip", [None, "part-0", "part-1", "part-3", "last"])
@pytest.mark.parametrize("into", [False, True])
def test_a_large_leaf_is_copied_in_parallel_parts_and_checked_whole(
        monkeypatch: pytest.MonkeyPatch, flip: str | None, into: bool, native: bool) -> None:
    """A leaf over PARALLEL_MIN_BYTES is copied by several threads, each part checksummed
    as it is copied and the parts' CRCs combined in order: bit-exact, and a byte flipped in
    any part fails the check; with the C copy (proto/_fastcopy.c) and without it."""
    import shardguard.proto.parallel_copy as pc
    from shardguard.proto.state_layout import CHECK_CHUNK_BYTES

    if native and pc.native() is None:
        pytest.skip("proto/_fastcopy.c was not built by this install")
    monkeypatch.setattr(pc, "USE_NATIVE", native)
    monkeypatch.setattr(pc, "COPY_THREADS", 4)
    monkeypatch.setattr(pc, "_copy_pool", None)
    n = 3 * pc.PARALLEL_MIN_BYTES + 12345  # 4 parts, the last one short
    parts = pc._parts(n, CHECK_CHUNK_BYTES)
    assert len(parts) == 4
    g = torch.Generator().manual_seed(3)
    state = {"small": torch.arange(10.0), "big": torch.randint(0, 256, (n,), dtype=torch.uint8,
                                                                generator=g),
             "after": torch.ones(7)}
    s = Slot(state)
    crc = data_crc(s)
    if flip is not None:
        big = leaf_offsets(s)["big"]
        lo = {"part-0": 17, "part-1": parts[1][0] + 5, "part-3": parts[3][0],
              "last": n - 1}[flip]
        s.arr[s.base + big + lo] ^= 0x40
    target = target_for(state, False) if into else None
    if flip is None:
        got = rebuild(s.doc, s.u8, s.arr, s.base, target, False, cpu, data_crc=crc)
        assert_same(state, got)
        assert not into or got["big"] is target["big"]
    else:
        with pytest.raises(CorruptionError, match="fails its checksum"):
            rebuild(s.doc, s.u8, s.arr, s.base, target, False, cpu, data_crc=crc)
    monkeypatch.setattr(pc, "_copy_pool", None)
