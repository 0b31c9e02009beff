"""shardguard.client.ddp in one process (a gloo group of one): what is captured when, what a
load installs, and every case it refuses with a warning. The multi-rank bit-exactness is in
tests/integration/test_ddp.py."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import shardguard.client as sg
from shardguard.client import ddp as sgddp
from shardguard.proto.state_layout import flatten


@pytest.fixture(autouse=True)
def group() -> Iterator[None]:
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    sgddp._WARNED.clear()
    yield
    dist.destroy_process_group()


def wrap(widths: tuple[int, ...] = (16, 32, 64, 32, 8), **kwargs: object
         ) -> DistributedDataParallel:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    # 0.005 MB: the rebuilt order has several buckets.
    return DistributedDataParallel(torch.nn.Sequential(*layers), bucket_cap_mb=0.005, **kwargs)


def train_step(ddp: DistributedDataParallel) -> None:
    ddp(torch.randn(4, ddp.module[0].in_features)).square().mean().backward()


def buckets_of(ddp: DistributedDataParallel) -> list[list[int]]:
    """The reducer's buckets now (allocates a zeroed copy of every bucket: tests only)."""
    index = {id(p): i for i, p in enumerate(ddp._build_params_for_reducer()[0])}
    return [[index[id(p)] for p in b.parameters()]
            for b in ddp.reducer._get_zeros_like_grad_buckets()]


def buckets_in(state: dict) -> list[list[int]]:
    return [list(b) for b in sgddp.DdpState.from_dict(state).buckets]


def test_initial_until_the_first_backward_then_the_rebuilt_order_cached() -> None:
    ddp = wrap()
    assert sg.ddp_state(ddp)["kind"] == "initial"
    train_step(ddp)
    assert not ddp._has_rebuilt_buckets  # DDP would rebuild at the next forward
    state = sg.ddp_state(ddp)
    assert ddp._has_rebuilt_buckets  # ddp_state did it, as that forward would have
    assert state["kind"] == "rebuilt"
    assert buckets_in(state) == buckets_of(ddp)
    assert len(buckets_in(state)) >= 3
    assert sg.ddp_state(ddp) is state  # steady state: a cache lookup
    train_step(ddp)
    assert sg.ddp_state(ddp) is state


def test_state_is_plain_data_a_snapshot_takes() -> None:
    ddp = wrap()
    train_step(ddp)
    state = sg.ddp_state(ddp)
    flatten(state, allow_pickle=False)  # raises on anything that is not plain data
    assert sgddp.DdpState.from_dict(state).as_dict().keys() == state.keys()


def test_load_installs_the_order_before_the_first_iteration() -> None:
    old = wrap()
    train_step(old)
    state = sg.ddp_state(old)
    fresh = wrap()
    initial = buckets_of(fresh)
    assert initial != buckets_in(state)
    assert sg.load_ddp_state(fresh, state) is True
    assert buckets_of(fresh) == buckets_in(state)
    assert sg.ddp_state(fresh)["kind"] == "rebuilt"  # before its own first iteration
    train_step(fresh)
    train_step(fresh)  # its own rebuild: the same order, no warning
    assert buckets_in(sg.ddp_state(fresh)) == buckets_in(state)


def test_a_state_from_before_any_backward_installs_nothing() -> None:
    state = sg.ddp_state(wrap())
    fresh = wrap()
    reducer = fresh.reducer
    assert sg.load_ddp_state(fresh, state) is True
    assert fresh.reducer is reducer


def test_find_unused_parameters_never_rebuilds_nothing_to_install() -> None:
    ddp = wrap(find_unused_parameters=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified")
        train_step(ddp)
        train_step(ddp)
    state = sg.ddp_state(ddp)
    assert state["kind"] == "initial"
    assert sg.load_ddp_state(wrap(find_unused_parameters=True), state) is True


def test_python_comm_hooks_move_to_the_new_reducer() -> None:
    old = wrap()
    train_step(old)
    state = sg.ddp_state(old)
    fresh = wrap()
    calls = []

    # Unannotated: DDP checks the annotations' objects, which `from __future__ import
    # annotations` turns into strings.
    def hook(st, bucket):  # type: ignore[no-untyped-def]
        calls.append(bucket.index())
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    fresh.register_comm_hook(None, hook)
    assert sg.load_ddp_state(fresh, state) is True
    train_step(fresh)
    assert sorted(calls) == list(range(len(buckets_in(state))))


def refused(ddp: DistributedDataParallel, state: dict, why: str) -> None:
    with pytest.warns(sg.DdpResumeWarning, match=why):
        assert sg.load_ddp_state(ddp, state) is False


def test_static_graph_after_its_first_iteration_is_refused_later_ones_load() -> None:
    ddp = wrap(static_graph=True)
    train_step(ddp)
    first = sg.ddp_state(ddp)
    assert first["kind"] == "unsupported"
    refused(wrap(static_graph=True), first, "static_graph wrapper after its first iteration")
    train_step(ddp)
    later = sg.ddp_state(ddp)
    assert later["kind"] == "rebuilt"
    fresh = wrap(static_graph=True)
    assert sg.load_ddp_state(fresh, later) is True
    assert buckets_of(fresh) == buckets_in(later)


def test_another_model_or_bucket_size_is_refused() -> None:
    old = wrap()
    train_step(old)
    state = sg.ddp_state(old)
    refused(wrap(widths=(16, 32, 8)), state, "parameters")
    torch.manual_seed(0)
    other_cap = DistributedDataParallel(wrap().module, bucket_cap_mb=1)
    refused(other_cap, state, "bucket_bytes_cap")


def test_a_load_after_the_first_iteration_is_refused() -> None:
    old = wrap()
    train_step(old)
    state = sg.ddp_state(old)
    late = wrap()
    train_step(late)
    refused(late, state, "after the wrapper's first iteration")


def test_another_torch_version_is_installed_but_not_called_exact() -> None:
    old = wrap()
    train_step(old)
    state = {**sg.ddp_state(old), "torch": "2.12.0"}
    fresh = wrap()
    refused(fresh, state, "taken under torch 2.12.0")
    assert buckets_of(fresh) == buckets_in(state)


def test_a_reason_warns_once() -> None:
    old = wrap()
    train_step(old)
    state = sg.ddp_state(old)
    refused(wrap(widths=(16, 8)), state, "parameters")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sg.load_ddp_state(wrap(widths=(16, 8)), state) is False


def test_not_a_ddp_state_raises() -> None:
    with pytest.raises(ValueError, match="not a shardguard ddp_state"):
        sg.load_ddp_state(wrap(), {"format": 1})
