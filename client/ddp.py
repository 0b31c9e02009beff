"""A ``DistributedDataParallel`` wrapper's gradient bucket order, kept with a snapshot and put
back into a fresh wrapper, so that a resumed DDP run reduces exactly as the uninterrupted one.

    ddp = DistributedDataParallel(model, ...)
    if client.latest() is not None:
        step, state = client.restore()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sg.load_ddp_state(ddp, state["ddp"])      # before the wrapper's first forward
    for step in range(start, total_steps):
        ...
        client.snapshot(step, {..., "ddp": sg.ddp_state(ddp)})   # on every rank, every time

**Why.** A wrapper reduces its first iteration in its initial buckets (every parameter in
one bucket, in parameter order), then rebuilds them once (``Reducer::rebuild_buckets``)
in the order rank 0's gradients became ready, capped at ``bucket_cap_mb``. With three
or more ranks a float sum depends on where an element sits in the all-reduced buffer
(gloo's ring chunks it by position), so a fresh wrapper's first iteration after a
restore sums differently from the long-lived wrapper's same step: the resumed run
drifts by an ulp or so per element and never comes back (measured: 6e-8 after a few
steps at 4 ranks; with 2 ranks a sum of two is exact either way).

**What is kept.** :func:`ddp_state` returns, as plain data (ints, a str, a small dict,
three int64 tensors), the bucket assignment the wrapper's *next* iteration reduces
with: ``"initial"`` while it has not had a synchronised backward (a fresh wrapper does
the same: nothing to install), otherwise the rebuilt buckets as DDP logs them
(``rebuilt_per_bucket_param_indices``, already agreed with rank 0). After the first
backward the rebuild is pending until the next forward; :func:`ddp_state` performs it
then, exactly as that forward would have (``reducer._rebuild_buckets()``, one
broadcast from rank 0), so a snapshot of step 0 already holds the order that step 1
will use. That makes the first call after the first backward collective: call it on
every rank at the same point, as ``snapshot`` itself is. Once the buckets are rebuilt
the state is computed once and returned from a cache (a dictionary lookup a step;
nothing is added to forward or backward).

:func:`load_ddp_state` builds the fresh wrapper's reducer again with the kept buckets
(the arguments DDP's own ``_ddp_init_helper`` passes, with that bucket list), before
its first iteration. Python communication hooks registered with
``register_comm_hook`` are moved onto the new reducer; built-in ones
(``_register_builtin_comm_hook``) cannot be seen, so register them after the load.

**Where it is exact** (tested: torch 2.13, gloo, 3 and 4 ranks, killed and resumed at
several steps): ``find_unused_parameters=False`` (installs the order) or ``True``
(DDP never rebuilds then: nothing to install), ``gradient_as_bucket_view`` either way,
``static_graph`` from any snapshot but the one of the wrapper's first iteration, with
the same torch version, world size, bucket caps and parameters, and a graph whose
gradients become ready in the same order every step. :func:`load_ddp_state` returns
False and warns once (:class:`DdpResumeWarning`, naming why) where it cannot promise
that: a ``static_graph`` wrapper's first-iteration snapshot (its next two iterations
reduce in two different bucket lists, a fresh wrapper can be given one), DDP's mixed
precision, the python reducer (compiled DDP), a wrapper without a reducer
(``delay_all_reduce_named_params`` covering every parameter), a load after the
wrapper's first iteration, a snapshot taken under another torch version, a torch
version these internals were not checked against, or a state whose model or bucket
configuration differs. :func:`ddp_state` warns once if a restored wrapper's own rebuild
chose another order than the one installed (the graph's ready order changed).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

FORMAT = 1
# The torch versions whose DDP internals (the Reducer constructor's arguments, the
# logger's rebuilt-bucket fields, _ddp_init_helper's choices) this module was checked
# against, bit-exact in tests/integration/test_ddp.py.
TESTED_TORCH = ("2.13",)

INITIAL = "initial"
REBUILT = "rebuilt"
UNSUPPORTED = "unsupported"
_KINDS = (INITIAL, REBUILT, UNSUPPORTED)
# torch.__version__ is a str subclass a snapshot would have to pickle.
TORCH_VERSION = str(torch.__version__)


class DdpResumeWarning(UserWarning):
    """A restored DDP wrapper will not reduce exactly as the snapshotted one would have."""


@dataclass(frozen=True)
class BucketConfig:
    """The wrapper settings a bucket order is only valid with."""

    bucket_bytes_cap: int
    first_bucket_bytes_cap: int
    bucket_bytes_cap_list: tuple[int, ...]
    find_unused_parameters: bool
    gradient_as_bucket_view: bool

    def as_dict(self) -> dict[str, Any]:
        return {"bucket_bytes_cap": self.bucket_bytes_cap,
                "first_bucket_bytes_cap": self.first_bucket_bytes_cap,
                "bucket_bytes_cap_list": list(self.bucket_bytes_cap_list),
                "find_unused_parameters": self.find_unused_parameters,
                "gradient_as_bucket_view": self.gradient_as_bucket_view}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BucketConfig:
        return cls(int(d["bucket_bytes_cap"]), int(d["first_bucket_bytes_cap"]),
                   tuple(int(x) for x in d["bucket_bytes_cap_list"]),
                   bool(d["find_unused_parameters"]), bool(d["gradient_as_bucket_view"]))

    def differences(self, other: BucketConfig) -> list[str]:
        return [f"{k}={v!r} (snapshot: {other.as_dict()[k]!r})"
                for k, v in self.as_dict().items() if v != other.as_dict()[k]]


@dataclass(frozen=True)
class DdpState:
    """What :func:`ddp_state` captures; :meth:`as_dict` is its plain-data form.

    ``buckets`` are parameter indices (DDP's reducer order) per bucket, in reduction
    order; empty unless ``kind`` is ``"rebuilt"``. ``reason`` says why ``kind`` is
    ``"unsupported"``.
    """

    kind: str
    buckets: tuple[tuple[int, ...], ...]
    param_numels: tuple[int, ...]
    param_dtypes: tuple[str, ...]
    config: BucketConfig | None
    torch_version: str
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        # Tensors, not lists: a snapshot copies a tensor's bytes but walks a list's
        # every element into its manifest (hundreds of parameters, every step).
        flat = [i for b in self.buckets for i in b]
        return {"format": FORMAT, "kind": self.kind, "torch": self.torch_version,
                "reason": self.reason,
                "bucket_params": torch.tensor(flat, dtype=torch.int64),
                "bucket_lengths": torch.tensor([len(b) for b in self.buckets], dtype=torch.int64),
                "param_numels": torch.tensor(self.param_numels, dtype=torch.int64),
                "param_dtypes": ",".join(self.param_dtypes),
                "config": None if self.config is None else self.config.as_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DdpState:
        """The state :meth:`as_dict` made (after a restore: tensors may be on any device).

        Raises:
            ValueError: ``d`` is not something :meth:`as_dict` made.
        """
        try:
            if d["format"] != FORMAT or d["kind"] not in _KINDS:
                raise ValueError(f"format {d['format']!r}, kind {d['kind']!r}")
            flat = [int(x) for x in torch.as_tensor(d["bucket_params"]).tolist()]
            lengths = [int(x) for x in torch.as_tensor(d["bucket_lengths"]).tolist()]
            if sum(lengths) != len(flat) or any(n <= 0 for n in lengths):
                raise ValueError(f"bucket lengths {lengths} do not cover {len(flat)} indices")
            buckets, pos = [], 0
            for n in lengths:
                buckets.append(tuple(flat[pos:pos + n]))
                pos += n
            dtypes = tuple(d["param_dtypes"].split(",")) if d["param_dtypes"] else ()
            return cls(d["kind"], tuple(buckets),
                       tuple(int(x) for x in torch.as_tensor(d["param_numels"]).tolist()),
                       dtypes, None if d["config"] is None else BucketConfig.from_dict(d["config"]),
                       str(d["torch"]), str(d["reason"]))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a shardguard ddp_state: {exc}") from exc


@dataclass
class _Captured:
    """The state of one reducer, cached once its buckets can no longer change."""

    reducer: Any
    state: dict[str, Any]
    final: bool


# Per wrapper: the cached capture, and the buckets load_ddp_state installed.
_CACHE: weakref.WeakKeyDictionary[DistributedDataParallel, _Captured] = weakref.WeakKeyDictionary()
_INSTALLED: weakref.WeakKeyDictionary[DistributedDataParallel, tuple[Any, tuple]] = \
    weakref.WeakKeyDictionary()
_WARNED: set[str] = set()

# A static_graph reducer collects the gradient order in its second iteration, not its
# first, and rebuilds before the third: the long-lived wrapper's next two iterations use
# two different bucket lists, a fresh wrapper's can only be given one.
_STATIC_FIRST = ("a static_graph wrapper after its first iteration: the buckets its third "
                 "iteration will use are not known until its second (resume from a later step)")


def ddp_state(model: DistributedDataParallel) -> dict[str, Any]:
    """The bucket order ``model``'s next iteration reduces with, as plain data for a snapshot.

    Call it on every rank at the same point (see the module docstring: the first call
    after the first backward performs DDP's pending bucket rebuild, a broadcast). The
    result is cached once the buckets are final; treat it as read-only.
    """
    cached = _CACHE.get(model)
    if cached is not None and cached.reducer is getattr(model, "reducer", None) and (
            cached.final or model._has_rebuilt_buckets):
        return cached.state
    why = _unsupported(model)
    if why:
        state = _plain(model, UNSUPPORTED, (), why)
        _CACHE[model] = _Captured(getattr(model, "reducer", None), state, final=True)
        return state
    reducer = model.reducer
    if model.find_unused_parameters and not model.static_graph:
        # DDP never rebuilds then: its initial buckets (by size, in parameter order)
        # are the same in a fresh wrapper.
        state = _plain(model, INITIAL, ())
        _CACHE[model] = _Captured(reducer, state, final=True)
        return state
    if not model._has_rebuilt_buckets and reducer._rebuild_buckets():
        # What the next forward would do first (DistributedDataParallel._pre_forward).
        model._has_rebuilt_buckets = True
        logger.info("rank %s: DDP buckets rebuilt at capture, as the next forward would",
                    dist.get_rank(model.process_group))
    if not model._has_rebuilt_buckets:
        installed = _INSTALLED.get(model)
        if installed is not None and installed[0] is reducer:
            return _plain(model, REBUILT, installed[1])  # restored, not rebuilt since
        if model.static_graph and getattr(model, "_static_graph_delay_allreduce_enqueued", True):
            return _plain(model, UNSUPPORTED, (), _STATIC_FIRST)
        return _plain(model, INITIAL, ())  # no synchronised backward yet
    buckets = _logged_buckets(model)
    if buckets is None:
        state = _plain(model, UNSUPPORTED, (), "DDP's logger did not record the rebuilt "
                       "buckets (the rebuild came after the wrapper's 10th iteration, between "
                       "two of the logger's samples)")
    else:
        _check_own_rebuild(model, buckets)
        state = _plain(model, REBUILT, buckets)
    _CACHE[model] = _Captured(reducer, state, final=False)
    return state


def load_ddp_state(model: DistributedDataParallel, state: Mapping[str, Any]) -> bool:
    """Make ``model`` (freshly wrapped, before its first forward) reduce its next iterations
    exactly as the wrapper that :func:`ddp_state` captured ``state`` from would have.

    Returns:
        True when the resumed run's reductions are those of the uninterrupted run (as far as
        this module can tell); False after warning once (:class:`DdpResumeWarning`) why not.

    Raises:
        ValueError: ``state`` is not a :func:`ddp_state` result.
    """
    snap = DdpState.from_dict(state)
    if snap.kind == UNSUPPORTED:
        return _not_exact(f"the snapshotted wrapper's buckets could not be kept: {snap.reason}")
    why = _unsupported(model)
    if why:
        return _not_exact(why)
    mismatch = _mismatch(model, snap)
    if mismatch:
        return _not_exact(mismatch)
    if any(model.reducer.get_backward_stats()):
        return _not_exact("load_ddp_state was called after the wrapper's first iteration; "
                          "call it right after wrapping, before the first forward")
    if snap.kind == REBUILT:
        try:
            _install(model, snap.buckets)
        except (TypeError, AttributeError, RuntimeError) as exc:
            return _not_exact(f"the restored bucket order could not be installed ({exc})")
    version = _version_note(snap.torch_version)
    return _not_exact(version) if version else True


# ------------------------------------------------------------------ helpers


def _plain(model: DistributedDataParallel, kind: str, buckets: Any, reason: str = "") -> dict:
    params = _reducer_params(model)
    return DdpState(
        kind, tuple(tuple(b) for b in buckets), tuple(p.numel() for p in params),
        tuple(_dtype_name(p) for p in params),
        _config(model) if kind != UNSUPPORTED else None, TORCH_VERSION, reason).as_dict()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _reducer_params(model: DistributedDataParallel) -> list[torch.Tensor]:
    try:
        return list(model._build_params_for_reducer()[0])
    except (AttributeError, TypeError):
        return []


def _config(model: DistributedDataParallel) -> BucketConfig:
    cfg = model._bucket_config
    return BucketConfig(int(cfg.bucket_bytes_cap), int(cfg.first_bucket_bytes_cap),
                        tuple(int(x) for x in cfg.per_bucket_bytes_caps),
                        bool(model.find_unused_parameters), bool(model.gradient_as_bucket_view))


_MODEL_ATTRS = ("reducer", "logger", "_has_rebuilt_buckets", "_bucket_config", "_comm_hooks",
                "_build_params_for_reducer", "_build_debug_param_to_name_mapping",
                "skip_all_reduce_unused_params", "batched_grad_copy", "forward_sync_buffers")
_REDUCER_ATTRS = ("_rebuild_buckets", "_remove_autograd_hooks", "get_backward_stats")
_LOGGER_ATTRS = ("set_runtime_stats_and_log", "_get_ddp_logging_data",
                 "set_construction_data_and_log")


def _unsupported(model: DistributedDataParallel) -> str:
    """Why this wrapper's reductions cannot be reproduced here ('' if they can)."""
    if not isinstance(model, DistributedDataParallel):
        return f"{type(model).__qualname__} is not a DistributedDataParallel wrapper"
    if getattr(model, "_delay_all_reduce_all_params", False):
        return "delay_all_reduce_named_params covers every parameter (DDP has no reducer)"
    missing = [a for a in _MODEL_ATTRS if not hasattr(model, a)]
    missing += [f"reducer.{a}" for a in _REDUCER_ATTRS if not hasattr(model.reducer, a)] \
        if hasattr(model, "reducer") else []
    missing += [f"logger.{a}" for a in _LOGGER_ATTRS if not hasattr(model.logger, a)] \
        if getattr(model, "logger", None) is not None else []
    if missing:
        return (f"torch {TORCH_VERSION}'s DistributedDataParallel lacks the internals "
                f"the bucket order is kept with ({', '.join(missing)})")
    if getattr(model, "mixed_precision", None) is not None:
        return "DDP mixed_precision (its reducer is built with a reduced-precision dtype)"
    if getattr(model, "_use_python_reducer", False):
        return "the python reducer (compiled DDP) reduces per parameter, not by buckets"
    return ""


def _logged_buckets(model: DistributedDataParallel) -> list[list[int]] | None:
    """The reducer's rebuilt buckets as DDP's logger records them (agreed with rank 0).

    The logger records them at the first sampled forward after the rebuild; between the
    rebuild and that forward, recording now is what that forward would do first.
    """
    data = model.logger._get_ddp_logging_data()
    if data.ints_map.get("has_rebuilt_buckets") != 1:
        model.logger.set_runtime_stats_and_log()
        data = model.logger._get_ddp_logging_data()
        if data.ints_map.get("has_rebuilt_buckets") != 1:
            return None
    text = data.strs_map.get("rebuilt_per_bucket_param_indices", "")
    buckets = [[int(i) for i in b.split()] for b in text.split(",") if b.strip()]
    n = len(_reducer_params(model))
    if sorted(i for b in buckets for i in b) != list(range(n)):
        return None
    return buckets


def _check_own_rebuild(model: DistributedDataParallel, buckets: list[list[int]]) -> None:
    installed = _INSTALLED.pop(model, None)
    if installed is not None and installed[0] is model.reducer and \
            tuple(tuple(b) for b in buckets) != installed[1]:
        _warn_once("after the restore, DDP rebuilt its buckets in another order than the one "
                   "installed (the gradients became ready in another order than in the first "
                   "step of the snapshotted wrapper): the resumed run is not bit-exact")


def _mismatch(model: DistributedDataParallel, snap: DdpState) -> str:
    params = _reducer_params(model)
    numels = tuple(p.numel() for p in params)
    dtypes = tuple(_dtype_name(p) for p in params)
    if numels != snap.param_numels or dtypes != snap.param_dtypes:
        return (f"the wrapped model's parameters ({len(numels)}, their sizes or dtypes) differ "
                f"from the snapshot's ({len(snap.param_numels)})")
    if snap.config is not None:
        diff = _config(model).differences(snap.config)
        if diff:
            return f"the wrapper's bucket settings differ from the snapshot's: {', '.join(diff)}"
    return ""


def _install(model: DistributedDataParallel, buckets: tuple[tuple[int, ...], ...]) -> None:
    """Give ``model`` a new reducer whose buckets are ``buckets``; as ``_ddp_init_helper``
    builds one, with the restored bucket list instead of the initial one."""
    params, expect_sparse = model._build_params_for_reducer()
    _, rebuild_limits = model._bucket_config.compute_bucket_size_limits(
        static_graph=model.static_graph, find_unused_parameters=model.find_unused_parameters)
    old = model.reducer
    # Built before the old reducer lets go of its hooks: if this version's constructor
    # differs, the wrapper is left as it was.
    reducer = dist.Reducer(
        params, [list(b) for b in buckets], [model.bucket_bytes_cap] * len(buckets),
        model.process_group,
        expect_sparse_gradients=list(expect_sparse),
        bucket_bytes_cap=model.bucket_bytes_cap,
        find_unused_parameters=model.find_unused_parameters,
        gradient_as_bucket_view=model.gradient_as_bucket_view,
        param_to_name_mapping=model._build_debug_param_to_name_mapping(params),
        first_bucket_bytes_cap=model._bucket_config.first_bucket_bytes_cap,
        skip_all_reduce_unused_params=model.skip_all_reduce_unused_params,
        use_python_reducer=model._use_python_reducer,
        bucket_bytes_cap_list=list(rebuild_limits),
        batched_grad_copy=model.batched_grad_copy)
    ddp_logger = dist.Logger(reducer)
    reducer.set_logger(ddp_logger)
    has_sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.module.modules())
    ddp_logger.set_construction_data_and_log(
        type(model.module).__name__, [] if model.device_ids is None else model.device_ids,
        -1 if model.output_device is None else model.output_device,
        model.forward_sync_buffers, has_sync_bn, model.static_graph)
    if model.static_graph:
        reducer._set_static_graph()
        ddp_logger._set_static_graph()
    for hook, hook_state in model._comm_hooks:
        dist._register_comm_hook(reducer, hook_state, hook)
        ddp_logger._set_comm_hook_name(hook.__qualname__)
    old._remove_autograd_hooks()
    model.reducer, model.logger = reducer, ddp_logger
    _INSTALLED[model] = (reducer, buckets)
    _CACHE.pop(model, None)
    logger.info("rank %s: restored %d DDP buckets", dist.get_rank(model.process_group),
                len(buckets))


def _version_note(captured: str) -> str:
    if captured != TORCH_VERSION:
        return (f"the snapshot was taken under torch {captured}, this is {TORCH_VERSION}: "
                "its reductions may differ")
    if ".".join(TORCH_VERSION.split(".")[:2]) not in TESTED_TORCH:
        return (f"torch {TORCH_VERSION} is not one whose DDP internals shardguard checked "
                f"({', '.join(TESTED_TORCH)}); the bucket order was installed, exactness is "
                "not verified")
    return ""


def _not_exact(why: str) -> bool:
    _warn_once(f"DDP resume is not bit-exact: {why}")
    return False


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, DdpResumeWarning, stacklevel=4)
