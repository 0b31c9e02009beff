"""The client API against a real daemon: every kind of state round-trips exactly."""

from __future__ import annotations

import math
import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

import shardguard.client as sg
from shardguard.client.errors import IntoMismatchError, RestoreError


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    out = {str(d): base.to(d) for d in (torch.float32, torch.float64, torch.float16,
                                         torch.bfloat16, torch.complex64)}
    for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        out[str(d)] = (base * 50).to(d)
    out["bool"] = base > 0
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            out[name] = base.to(getattr(torch, name))
    return out


def assert_equal(a: object, b: object, path: str = "state") -> None:
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.is_floating_point()
                           else a, b.view(torch.uint8) if b.dtype.itemsize == 1
                           and b.is_floating_point() else b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


def rich_state() -> dict:
    big = torch.arange(300_000, dtype=torch.float32).reshape(600, 500)
    sd = OrderedDict(w=torch.ones(3), b=torch.zeros(2))
    sd._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    return {
        "dtypes": _all_dtypes(),
        "views": {"t": big.t(), "strided": big[::3, 1::7], "scalar": torch.tensor(3.5),
                  "empty": torch.empty(0, 4), "big": big},
        "np": {"f": np.linspace(0, 1, 11), "i": np.arange(6, dtype=np.int16).reshape(2, 3),
               "fortran": np.asfortranarray(np.ones((3, 4)))},
        "bytes": b"\x00\x01binary",
        "scalars": [1, 2**80, -0.0, float("inf"), float("nan"), 1e-310, True, None, "ünïcode"],
        "tuple": (1, (2, 3), [4, {5: "five", (6, 7): 8}]),
        "sd": sd,
    }


def test_every_kind_of_state_round_trips(daemon) -> None:
    state = rich_state()
    with sg.connect(daemon.socket, "rt") as c:
        assert c.latest() is None
        h = c.snapshot(0, state)
        h.wait()
        assert not h.skipped and h.done()
        assert c.latest() == 0
        step, got = c.restore()
    assert step == 0
    assert_equal(state, got)
    assert got["sd"]._metadata == {"": {"version": 2}}
    assert got["views"]["t"].is_contiguous()  # views come back as plain tensors


def test_restore_into_overwrites_in_place(daemon) -> None:
    model = torch.nn.Linear(40, 30)
    with sg.connect(daemon.socket, "into") as c:
        c.snapshot(1, {"model": model.state_dict()}).wait()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
        target = {"model": model.state_dict()}
        step, got = c.restore(into=target)
    assert step == 1
    assert got["model"]["weight"] is target["model"]["weight"]
    assert torch.equal(model.weight, saved["weight"])


def test_restore_into_mismatched_shape_raises(daemon) -> None:
    with sg.connect(daemon.socket, "mismatch") as c:
        c.snapshot(0, {"w": torch.zeros(4)}).wait()
        with pytest.raises(RestoreError, match=r"state\['w'\]"):
            c.restore(into={"w": torch.zeros(5)})
        assert c.restore()[0] == 0


def test_restore_into_other_keys_raises_and_changes_nothing(daemon) -> None:
    """Issue 15 item 12: a key of ``into`` the snapshot does not hold used to be skipped in
    silence (fresh tensors returned, ``into`` left stale); now it is refused like a shape."""
    with sg.connect(daemon.socket, "into-keys") as c:
        c.snapshot(0, {"w": torch.ones(4), "b": torch.ones(2)}).wait()
        mine = {"b": torch.zeros(2), "weight": torch.zeros(4)}
        with pytest.raises(RestoreError, match=r"state\['weight'\]: not in the snapshot") as err:
            c.restore(into=mine)  # every rank raises a RestoreError; this rank's says why
        assert isinstance(err.value, IntoMismatchError) \
            or isinstance(err.value.__cause__, IntoMismatchError)
        assert torch.equal(mine["b"], torch.zeros(2)) and torch.equal(mine["weight"],
                                                                      torch.zeros(4))
        step, got = c.restore(into={"b": mine["b"]})  # what it leaves out is allocated
    assert step == 0 and got["b"] is mine["b"] and torch.equal(mine["b"], torch.ones(2))
    assert torch.equal(got["w"], torch.ones(4))


def test_changed_structure_is_replanned(daemon) -> None:
    with sg.connect(daemon.socket, "replan") as c:
        c.snapshot(0, {"a": torch.ones(10)}).wait()
        bigger = {"a": torch.ones(10), "b": torch.randn(2000, 1000), "c": [1, 2, 3]}
        c.snapshot(1, bigger).wait()
        step, got = c.restore()
        assert step == 1
        assert_equal(bigger, got)
        c.snapshot(2, {"only": torch.full((3,), 7.0)}).wait()
        assert_equal({"only": torch.full((3,), 7.0)}, c.restore()[1])


class Opaque:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.x == self.x


def test_pickle_only_on_opt_in(daemon) -> None:
    with sg.connect(daemon.socket, "pickle") as c:
        with pytest.raises(TypeError, match="allow_pickle"):
            c.snapshot(0, {"o": Opaque(1)})
        c.snapshot(1, {"o": Opaque(2)}, allow_pickle=True).wait()
        with pytest.raises(RestoreError, match="allow_pickle"):
            c.restore()
        assert c.restore(allow_pickle=True)[1]["o"] == Opaque(2)


def test_rng_streams_resume(daemon) -> None:
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    with sg.connect(daemon.socket, "rng") as c:
        c.snapshot(0, {"rng": sg.rng_state()}).wait()
        want = (torch.rand(4), random.random(), np.random.rand(3))
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
        sg.set_rng_state(c.restore()[1]["rng"])
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and np.array_equal(want[2], got[2])


def test_protect_makes_optimizer_wait_for_the_copy(daemon) -> None:
    model = torch.nn.Linear(600, 600)
    opt = torch.optim.AdamW(model.parameters())
    with sg.connect(daemon.socket, "protect") as c:
        c.protect(opt)
        model(torch.randn(2, 600)).sum().backward()
        opt.step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        h = c.snapshot(0, {"model": model.state_dict()})
        model(torch.randn(2, 600)).sum().backward()
        opt.step()  # mutates the parameters: only after the copy is done
        assert h._copied.is_set()
        h.wait()
        _, got = c.restore()
    for k in before:
        assert torch.equal(before[k], got["model"][k])


def test_daemon_sigkill_keeps_the_restorable_snapshot(daemon) -> None:
    state = {"w": torch.randn(700, 300), "step": 3}
    with sg.connect(daemon.socket, "survive") as c:
        c.snapshot(3, state).wait()
        daemon.kill()
        daemon.start()
        # The same client goes on: it re-registers with the restarted daemon.
        with pytest.raises(sg.ShardguardError):
            c.snapshot(4, state).wait()
        h = c.snapshot(5, {"w": state["w"] * 2, "step": 5})
        h.wait()
        assert c.latest() == 5
    daemon.kill()
    daemon.start()
    with sg.connect(daemon.socket, "survive") as c:
        step, got = c.restore()
    assert step == 5 and torch.equal(got["w"], state["w"] * 2)


def test_environment_names_job_and_rank(daemon, monkeypatch) -> None:
    monkeypatch.setenv("SHARDGUARD_SOCKET", daemon.socket)
    monkeypatch.setenv("SHARDGUARD_JOB", "from-env")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with sg.connect() as c:
        assert (c.job, c.rank, c.world_size) == ("from-env", 0, 1)
        c.snapshot(0, {"x": 1}).wait()
    assert [j.job for j in daemon.status().jobs] == ["from-env"]


def test_arena_files_are_private(daemon) -> None:
    with sg.connect(daemon.socket, "perm") as c:
        c.snapshot(0, {"x": torch.ones(3)}).wait()
    for path in daemon.shm_files():
        assert os.stat(path).st_mode & 0o777 == 0o600, path
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o600


def test_a_failed_copy_fails_the_handle_and_the_client_goes_on(daemon) -> None:
    """A leaf that cannot be copied raises from snapshot(); nothing waits on it afterwards."""

    class Exploding(torch.Tensor):
        """Copying it out fails (as a DTensor's redistribution or a bad device might)."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") == "copy_":
                raise RuntimeError("this tensor cannot be copied")
            return super().__torch_function__(func, types, args, kwargs or {})

    with sg.connect(daemon.socket, "boom") as c:
        c.snapshot(0, {"w": torch.ones(10)}).wait()
        bad = torch.ones(10).as_subclass(Exploding)
        with pytest.raises(RuntimeError, match="cannot be copied"):
            c.snapshot(1, {"w": bad})
        c.snapshot(2, {"w": torch.full((10,), 2.0)}).wait()
        step, state = c.restore()
        assert step == 2 and torch.equal(state["w"], torch.full((10,), 2.0))


def test_a_dtensor_is_refused_with_a_pointer_to_the_helpers(daemon) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dt = distribute_tensor(torch.ones(4), mesh, [Replicate()])
        with sg.connect(daemon.socket, "dt") as c:
            with pytest.raises(TypeError, match="sharded_state_dict_to_local"):
                c.snapshot(0, {"w": dt})
            c.snapshot(1, {"w": torch.ones(4)}).wait()
    finally:
        dist.destroy_process_group()


def test_protect_looks_through_accelerates_optimizer_wrapper(daemon) -> None:
    """``protect(trainer.optimizer)`` under accelerate used to raise AttributeError
    ('AcceleratedOptimizer' has no '_optimizer_step_pre_hooks'): the hook now goes on the
    torch optimizer inside, and a step still waits for the copy in flight."""
    accelerate = pytest.importorskip("accelerate")

    model = torch.nn.Linear(64, 64)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    model, wrapped = accelerate.Accelerator(cpu=True).prepare(model, inner)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    with sg.connect(daemon.socket, "accel") as c:
        c.protect(wrapped)
        assert len(inner._optimizer_step_pre_hooks) == 1
        h = c.snapshot(0, {"model": model.state_dict()})
        model(torch.ones(1, 64)).sum().backward()
        wrapped.step()  # waits for the copy: the snapshot holds the weights before the step
        h.wait()
        _, got = c.restore()
    assert not torch.equal(got["model"]["weight"], model.weight.detach())
    assert accelerate.__version__
