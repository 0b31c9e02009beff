"""The trainer's side: register with the node daemon, snapshot asynchronously, restore.

A snapshot is decided on every rank together (one small collective on a gloo
control group), then copied into the rank's arena slot off the critical path:
CPU tensors on a background thread, CUDA tensors on a side stream into the
arena registered as pinned memory. The next ``optimizer.step()`` waits for the
copy (the tensors are immutable during forward and backward, which is the
window the copy hides in); the slot is sealed with the daemon when the copy is
done.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np
import torch
import torch.distributed as dist

from shardguard.client import _faults, tier
from shardguard.proto.state_layout import Leaf, Plan, copy_leaf, flatten, rebuild
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto import arena as fmt
from shardguard.proto import manifest as mf
from shardguard.proto.errors import (
    ArenaFormatError,
    CorruptionError,
    DaemonUnavailableError,
    ClockSkewError,
    ConfigMismatchError,
    InsufficientPiecesError,
    JobNameError,
    LeaseError,
    NoSpaceError,
    NotRestorableError,
    RestoreError,
    ShardguardError,
    error_from_rpc,
)
from shardguard.proto.paths import default_socket_path, grpc_target
from shardguard.proto.tier import TIER_DIR_ENV

logger = logging.getLogger(__name__)

JOB_ENV = "SHARDGUARD_JOB"
# Tensors up to this size are copied inside snapshot() itself, so that small
# buffers a forward pass may update in place (BatchNorm statistics, counters)
# are captured as they were at the snapshot, not as forward left them.
SYNC_COPY_BYTES = 256 << 10
# Room for the manifest: twice what the first plan needs, at least this much.
MIN_MANIFEST_ROOM = 64 << 10
DEFAULT_TIMEOUT_S = 120.0
# Consecutive skipped snapshots after which the client warns that protection stalled.
SKIP_WARNING = 50
#: A sealed step not restorable after this long is given up (its protection was lost
#: with a daemon that crashed mid-step), so that the next snapshots are taken again.
#: ``SHARDGUARD_PROTECT_TIMEOUT_S`` overrides it.
PROTECT_TIMEOUT_S = 60.0


@dataclass
class SnapshotHandle:
    """The fate of one ``snapshot()`` call."""

    step: int
    skipped: bool = False
    error: BaseException | None = None
    restorable_step: int | None = None
    _copied: threading.Event = field(default_factory=threading.Event, repr=False)
    _sealed: threading.Event = field(default_factory=threading.Event, repr=False)
    _cuda_event: Any = field(default=None, repr=False)
    # When the copy was sealed; a step pending protection far past this is given up.
    _sealed_at: float = field(default=0.0, repr=False)
    _given_up: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.skipped:
            self._copied.set()
            self._sealed.set()

    def done(self) -> bool:
        """True once the snapshot is sealed (or failed, or was skipped)."""
        return self._sealed.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until sealed; re-raises the error of a failed snapshot."""
        if not self._sealed.wait(timeout):
            raise TimeoutError(f"snapshot of step {self.step} not sealed within {timeout}s")
        if self.error is not None:
            raise self.error

    def wait_copied(self) -> None:
        self._copied.wait()

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._copied.set()
        self._sealed.set()


@dataclass
class _Mapped:
    """The rank's arena, mapped into this process."""

    path: str
    size: int
    slot_bytes: int
    mm: mmap.mmap
    u8: torch.Tensor
    arr: np.ndarray
    cuda_registered: bool = False

    def header(self) -> fmt.Header:
        # The daemon may be rewriting the header this instant; a torn read fails its checksum.
        for _ in range(100):
            try:
                return fmt.unpack_header(self.arr[:fmt.HEADER_BYTES])
            except ArenaFormatError:
                time.sleep(0.001)
        return fmt.unpack_header(self.arr[:fmt.HEADER_BYTES])

    def close(self) -> None:
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.u8.data_ptr())
            self.cuda_registered = False
        del self.u8, self.arr
        try:
            self.mm.close()
        except BufferError:
            logger.debug("arena %s still referenced; unmapped at exit", self.path)


# Restore failures by precedence (a higher one wins when ranks fail differently).
_RESTORE_FAILURES: tuple[type[ShardguardError], ...] = (
    RestoreError, NotRestorableError, InsufficientPiecesError)


# Failures that mean "memory holds nothing to restore": the persistent tier answers instead.
_TIER_FALLBACK = (_RESTORE_FAILURES.index(NotRestorableError) + 1,
                  _RESTORE_FAILURES.index(InsufficientPiecesError) + 1)


def _failure_code(exc: BaseException) -> int:
    """1-based index of the most specific class in _RESTORE_FAILURES that ``exc`` is, else 1."""
    return max((i for i, cls in enumerate(_RESTORE_FAILURES, 1) if isinstance(exc, cls)),
               default=1)


def _detect_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


#: The run id torchrun uses when ``--rdzv-id`` is not given (c10d, etcd rendezvous): every
#: such launch shares it, so two unrelated runs would share one job and the second would
#: resume the first. It never names a job.
TORCHRUN_DEFAULT_RUN_ID = "none"


def _detect_job() -> str:
    """The job name: ``$SHARDGUARD_JOB``, else ``$SLURM_JOB_ID``, else torchrun's run id
    when it is one the user chose (``--rdzv-id``); anything ambiguous is refused."""
    for key in (JOB_ENV, "SLURM_JOB_ID"):
        if os.environ.get(key):
            return os.environ[key]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id == TORCHRUN_DEFAULT_RUN_ID:
        raise JobNameError(
            f"no job name: torchrun was started without --rdzv-id, so its run id is "
            f"{TORCHRUN_DEFAULT_RUN_ID!r} for every run and would mix unrelated runs' "
            f"snapshots; set {JOB_ENV}=<name> (the same on every node and every relaunch of "
            f"this run) or pass --rdzv-id=<name> to torchrun")
    if run_id:
        logger.info("job name %r from TORCHELASTIC_RUN_ID (torchrun --standalone draws a new "
                    "one per launch: set %s to resume across launches)", run_id, JOB_ENV)
        return run_id
    raise JobNameError(
        f"no job name: pass job= or set {JOB_ENV} (or run under Slurm, or torchrun with "
        f"--rdzv-id)")


class Client:
    """A trainer rank's connection to its node daemon. Use :func:`connect`."""

    def __init__(self, socket_path: str, job: str, rank: int, world_size: int, *,
                 group: Any = None, local_ranks: list[int] | None = None,
                 allow_pickle: bool = False, force: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 nodes: list[tuple[str, str]] | None = None, node_index: int = 0,
                 group_size: int = 0, parity: int = 0, tier_dir: str | None = None) -> None:
        self.socket_path = socket_path
        # The persistent tier's directory ("": none), read when memory holds nothing.
        self.tier_dir = os.environ.get(TIER_DIR_ENV, "") if tier_dir is None else tier_dir
        self._from_tier = False
        self.nodes = nodes or []
        self.node_index = node_index
        self._code = (group_size, parity)
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.allow_pickle = allow_pickle
        self.timeout_s = timeout_s
        self.protect_timeout_s = float(os.environ.get("SHARDGUARD_PROTECT_TIMEOUT_S",
                                                      PROTECT_TIMEOUT_S))
        self._group = group
        self._force = force
        self._local_ranks = local_ranks or [rank]
        self._channel = grpc.insecure_channel(
            grpc_target(socket_path), options=[("grpc.enable_retries", 0)])
        self._stub = pb_grpc.AgentStub(self._channel)
        self._lease = ""
        self._lost_daemon = False
        self._skips = 0
        self._map: _Mapped | None = None
        self._plan: Plan | None = None
        self._last: SnapshotHandle | None = None
        # The last snapshot, when it was skipped: wait() and close() take it, so that the
        # final step is protected. Forgotten at the next snapshot() and when the optimizer
        # steps (the tensors it names change then).
        self._pending: tuple[int, Any, bool] | None = None
        self._hooks: list[Any] = []
        self._side_stream: Any = None
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name=f"sg-copy-r{rank}", daemon=True)
        self._worker.start()
        self._closed = False
        self._register(fmt.PAGE)

    # ------------------------------------------------------------ public API

    def protect(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` wait until an in-flight snapshot copy is done."""
        self._hooks.append(optimizer.register_step_pre_hook(
            lambda *_: self._before_optimizer_step()))

    def _before_optimizer_step(self) -> None:
        self._pending = None  # the state a skipped snapshot named is about to change
        self._wait_copy()

    def snapshot(self, step: int, state: Any, *, allow_pickle: bool | None = None
                 ) -> SnapshotHandle:
        """Start a snapshot of ``state`` as ``step``; returns at once.

        Every rank takes the step or every rank skips it (``handle.skipped``): a
        step is skipped while the previous one is still being copied or is not
        yet restorable.
        """
        self._check_open()
        self._pending = None
        _faults.fault_point("before-snapshot", step, self.rank)
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        verdict, error = self._local_verdict()
        manifest = leaves = None
        # "pending" plans too: a failed or given-up step elsewhere makes every rank take.
        if verdict in ("ready", "pending"):
            try:
                tree, leaves = flatten(state, pickle_ok)
                manifest = self._ensure_plan(leaves, step, tree)
            except (ShardguardError, TypeError, ValueError) as exc:
                verdict, error = "error", exc
        decision = self._agree(verdict)
        if decision == "error":
            raise error or ShardguardError(
                f"job {self.job} step {step}: snapshot refused on another rank")
        if decision == "skip":
            self._skips += 1
            if self._skips % SKIP_WARNING == 0 and self._skips // SKIP_WARNING in (1, 2, 4, 8,
                                                                               16, 32):
                # The daemon names the cause when it knows it (clock skew, a port that
                # does not answer, mismatched config, a link too slow for the step rate).
                why = self._stall() or "is a node or its daemon down?"
                logger.warning(
                    "job=%s rank=%d: %d snapshots skipped in a row (step %s not yet "
                    "restorable everywhere): %s", self.job, self.rank, self._skips,
                    self._last.step if self._last else None, why)
            self._pending = (step, state, pickle_ok)
            return SnapshotHandle(step, skipped=True)
        skipped, self._skips = self._skips, 0
        assert manifest is not None and leaves is not None and self._plan is not None
        try:
            slot = self._call("Begin", pb.BeginRequest(job=self.job, rank=self.rank,
                                                       lease=self._lease, step=step,
                                                       skipped=min(skipped, 2**32 - 1))).slot
        except (DaemonUnavailableError, LeaseError, NoSpaceError) as exc:
            # The daemon died or restarted since the agreement, or its shm directory is
            # full: this step is not protected (it can't become restorable without this
            # rank), training goes on, the restorable step stays; the next one is taken.
            logger.warning("job=%s rank=%d: step %d not snapshotted: %s", self.job, self.rank,
                           step, exc)
            self._last = SnapshotHandle(step, skipped=True, error=exc)
            self._pending = (step, state, pickle_ok)
            return self._last
        handle = SnapshotHandle(step)
        self._last = handle
        try:
            self._start_copy(handle, slot, manifest, leaves)
        except BaseException as exc:
            handle._fail(exc)  # never sealed: the next snapshot and close() must not wait
            raise
        return handle

    def wait(self, restorable: bool = False, timeout: float | None = None) -> None:
        """Wait for every in-flight snapshot to be sealed (and, optionally, restorable).

        If the last ``snapshot()`` was skipped (the one before it was still in flight)
        and the optimizer has not stepped since, it is taken now: after ``wait()`` the
        newest snapshot is the last step snapshotted. That makes ``wait()`` collective
        then: call it on every rank, as at the end of training.
        """
        if self._pending is not None:
            self._take_pending(timeout)
        h = self._last
        if h is None or h.skipped:
            return
        h.wait(timeout)
        if restorable:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._is_restorable(h.step):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"step {h.step} not restorable within {timeout}s")
                time.sleep(0.005)

    def _take_pending(self, timeout: float | None) -> None:
        """Take the skipped last snapshot once the step in flight has settled here.

        Each rank first waits until its own previous step is sealed and restorable,
        so that the agreement inside ``snapshot()`` finds every rank ready; a rank
        that was still behind makes everyone skip once more, and the loop agrees
        again. Protection that cannot settle (the daemon unreachable, a stall its
        daemon names, ``protect_timeout_s`` or ``timeout`` passed on any rank) gives
        the last snapshot up on every rank, with a warning: every round is one
        agreement on every rank, so the ranks leave the loop together.
        """
        limit = self.protect_timeout_s if timeout is None else min(timeout,
                                                                  self.protect_timeout_s)
        deadline = time.monotonic() + limit
        while self._pending is not None:
            step, state, pickle_ok = self._pending
            why = self._settle(deadline)
            hopeless = self._reduce_max([int(why is not None)])[0]
            if hopeless:
                self._pending = None
                logger.warning("job=%s rank=%d: the last snapshot (step %d) was skipped and "
                               "cannot be taken now: %s", self.job, self.rank, step,
                               why or "protection did not settle on another rank")
                return
            self.snapshot(step, state, allow_pickle=pickle_ok)

    def _settle(self, deadline: float) -> str | None:
        """Wait until this rank may take a snapshot; None, or why it cannot soon."""
        next_look = 0.0
        while self._local_verdict()[0] in ("busy", "pending"):
            now = time.monotonic()
            if now > deadline:
                return "the step before it was not protected in time"
            if self._lost_daemon:
                return "the node's daemon does not answer"
            if now >= next_look:
                next_look = now + 0.5
                stall = self._stall()
                if stall:
                    return stall
            time.sleep(0.005)
        return None

    def _first_reason(self, error: BaseException | None) -> str:
        """The first failing rank's error in words, on every rank (collective: only on a
        failure path that every rank takes, after an agreement that something failed)."""
        mine = f"{type(error).__name__}: {error}" if error is not None else ""
        if self._group is None:
            return mine
        everyone: list[Any] = [None] * dist.get_world_size(self._group)
        try:
            dist.all_gather_object(everyone, mine, group=self._group)
        except Exception:  # noqa: BLE001 - a rank that raised first may have left already:
            return mine    # the class is agreed, only the words of another rank are lost
        for rank, text in enumerate(everyone):
            if text:
                return text if rank == self.rank else f"rank {rank}: {text}"
        return ""

    def _stall(self) -> str:
        """Why the daemon says protection is stalled ("" when it does not, or is only slow)."""
        try:
            st = self._stub.Status(pb.StatusRequest(job=self.job), timeout=self.timeout_s)
        except grpc.RpcError:
            return ""
        for js in st.jobs:
            if js.job == self.job and js.stall_cause and js.stall_cause != "too_slow":
                return f"{js.stall_cause}: {js.stall_detail}"
        return ""

    def latest(self) -> int | None:
        """The newest restorable step, the same on every rank (rank 0 asks, all agree)."""
        self._check_open()
        step = self._agreed_step(None)
        return None if step < 0 else step

    def _agreed_step(self, wanted: int | None) -> int:
        """The step every rank uses: ``wanted``, or the oldest of the ranks' daemons'
        restorable steps (-1: none), so that a step announced to some nodes and not yet
        to others is not chosen; an error on any rank is raised on every rank.

        With a persistent tier, its step (the oldest the ranks see) is used instead when
        memory holds nothing (whole-job loss, too many nodes lost) or only older steps;
        ``self._from_tier`` then says so, on every rank.
        """
        self._reduce_max([0])  # every rank has drained its seals before anyone asks
        step, code, error = -1, 0, None
        try:
            if wanted is not None and not self.tier_dir:
                step = wanted
            else:
                reply = self._call("Latest", pb.LatestRequest(job=self.job))
                step = reply.step if reply.HasField("step") else -1
        except ShardguardError as exc:
            error, code = exc, _failure_code(exc)
        flushed = tier.latest(self.tier_dir, self.job, self.rank, self.world_size) \
            if self.tier_dir else -1
        worst, neg_oldest, neg_flushed = self._reduce_max([code, -step, -flushed])
        flushed = -neg_flushed
        self._from_tier = flushed >= 0 and wanted in (None, flushed) and (
            worst in _TIER_FALLBACK or (not worst and -neg_oldest < flushed))
        if self._from_tier:
            if worst:
                logger.warning("job=%s rank=%d: memory holds no restorable step (%s); using "
                               "step %d of the persistent tier", self.job, self.rank,
                               error or "on another rank", flushed)
            return flushed
        if worst:
            # The same class on every rank; the rank that failed says why.
            cls = _RESTORE_FAILURES[worst - 1]
            # Every rank gathers the reason (a collective: none may skip it).
            why = self._first_reason(error) or "another rank could not find the restorable step"
            if error is not None and type(error) is cls:
                raise error
            raise cls(f"job {self.job}: {why}") from error
        return -neg_oldest if wanted is None else wanted

    def restore(self, step: int | None = None, into: Any = None, *,
                map_location: str | torch.device | None = None,
                allow_pickle: bool | None = None) -> tuple[int, Any]:
        """The newest restorable step (or ``step``) and its state, the same on every rank.

        Args:
            step: a specific step; it must be the restorable one.
            into: a state of the same structure whose tensors are overwritten in place
                where dtype and shape match (others are allocated).
            map_location: device for restored tensors; default: where they were,
                if that device exists here, else CPU.

        Raises:
            NotRestorableError: nothing (or not ``step``) is restorable, on every rank.
            RestoreError: restore failed on some rank; raised on every rank.
        """
        self._check_open()
        self._drain()
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        agreed = self._agreed_step(step)
        if agreed < 0:
            raise NotRestorableError(f"job {self.job} has no restorable step")
        state, error = None, None
        for _ in range(1 if self._from_tier else 2):
            try:
                state = (self._restore_tier(agreed, into, map_location, pickle_ok)
                         if self._from_tier else
                         self._restore_local(agreed, into, map_location, pickle_ok))
                error = None
                break
            except CorruptionError as exc:
                # The bytes failed their checksum while we copied them: what we read is
                # dropped; a daemon that can repair from parity does so on the next open.
                error = exc
            except (ShardguardError, ValueError, TypeError, RuntimeError) as exc:
                error = exc
                break
        # Every rank raises the same class: the most specific failure on any rank.
        code = _failure_code(error) if error is not None else 0
        worst = self._reduce_max([code])[0]
        if worst:
            cls = _RESTORE_FAILURES[worst - 1]
            why = self._first_reason(error) or "failed on another rank"
            raise cls(f"job {self.job} rank {self.rank}: restore of step {agreed} failed "
                      f"({why})") from error
        self._last = None
        self._pending = None
        logger.info("job=%s rank=%d: resumed from step %d (%s)", self.job, self.rank, agreed,
                    "persistent tier" if self._from_tier else "memory")
        return agreed, state

    def close(self, *, flush: bool = True) -> None:
        """Seal in-flight snapshots, give up the rank's claim; snapshots stay stored.

        With ``flush`` (the default), a skipped last snapshot is taken first, as
        :meth:`wait` does (collective: every rank closes). Leaving a ``with`` block
        on an exception does not flush.
        """
        if self._closed:
            return
        try:
            if flush and self._pending is not None:
                self._take_pending(None)
            self._drain()
        finally:
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._queue.put(None)
            self._worker.join(timeout=self.timeout_s)
            try:
                self._call("Unregister", pb.UnregisterRequest(job=self.job, rank=self.rank,
                                                              lease=self._lease))
            except ShardguardError as exc:
                logger.warning("job=%s rank=%d unregister failed: %s", self.job, self.rank, exc)
            if self._map is not None:
                self._map.close()
                self._map = None
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(flush=exc_type is None)

    # --------------------------------------------------------------- snapshot

    def _local_verdict(self) -> tuple[str, BaseException | None]:
        """What this rank can do now: ready, busy (copy or protection in flight), failed, error."""
        h = self._last
        if h is not None and not h.done():
            return "busy", None
        if self._lost_daemon:
            try:
                self._register(self._map.slot_bytes if self._map else fmt.PAGE)
            except (DaemonUnavailableError, LeaseError):
                return "busy", None  # the daemon is restarting: skip, try again next step
            except ShardguardError as exc:
                return "error", exc
        if h is not None and (h.error is not None or h._given_up):
            return "ready", None
        if h is not None and not self._is_restorable(h.step):
            if time.monotonic() - h._sealed_at > self.protect_timeout_s:
                h._given_up = True
                logger.warning("job=%s rank=%d: step %d sealed but not restorable after %.0fs "
                               "(%s); taking new snapshots", self.job, self.rank, h.step,
                               self.protect_timeout_s, self._stall() or "a daemon lost it?")
                return "ready", None
            return "pending", None
        return "ready", None

    def _agree(self, verdict: str) -> str:
        """One collective: take if nobody is busy and the previous step is settled everywhere."""
        flags = [verdict == "busy", verdict == "pending",
                 self._last is not None and (self._last.error is not None
                                             or self._last._given_up), verdict == "error"]
        busy, pending, failed, error = self._reduce_max([int(f) for f in flags])
        if error:
            return "error"
        if busy or (pending and not failed):
            return "skip"
        return "take"

    def _ensure_plan(self, leaves: list[Leaf], step: int, tree: dict[str, Any]) -> bytes:
        """Place the leaves (re-planning if their sizes changed); returns the manifest."""
        if self._plan is None or not self._plan.matches(leaves):
            self._plan = Plan(tuple(lf.nbytes for lf in leaves))
            logger.info("job=%s rank=%d planned %d leaves, %d data bytes", self.job, self.rank,
                        len(leaves), self._plan.data_bytes)
        self._plan.place(leaves)
        manifest = mf.dumps(tree, step, self._plan.data_bytes)
        manifest_len = len(manifest)
        need = self._plan.manifest_offset + manifest_len
        assert self._map is not None
        if need > self._map.slot_bytes:
            room = max(2 * manifest_len, MIN_MANIFEST_ROOM)
            self._register(fmt.align_up(self._plan.manifest_offset + room))
        return manifest

    def _start_copy(self, h: SnapshotHandle, slot: int, manifest: bytes,
                    leaves: list[Leaf]) -> None:
        assert self._map is not None
        m = self._map
        base = fmt.slot_offset(slot, m.slot_bytes)
        cuda = [lf for lf in leaves if lf.kind == "tensor" and lf.value.is_cuda]
        if cuda:
            h._cuda_event = self._copy_cuda(cuda, base)
        host = [lf for lf in leaves if not (lf.kind == "tensor" and lf.value.is_cuda)]
        deferred = [lf for lf in host if lf.nbytes > SYNC_COPY_BYTES and lf.kind != "pickle"]
        inline = [lf for lf in host if lf.nbytes <= SYNC_COPY_BYTES or lf.kind == "pickle"]
        for i, lf in enumerate(inline):
            if not deferred and i == len(inline) // 2:
                _faults.fault_point("mid-copy", h.step, self.rank)
            copy_leaf(lf, m.u8, m.arr, base)
        job = self._seal_job(h, slot, base, deferred, manifest)
        self._queue.put(job)

    def _seal_job(self, h: SnapshotHandle, slot: int, base: int, deferred: list[Leaf],
                  manifest: bytes) -> Callable[[], None]:
        m, plan, lease = self._map, self._plan, self._lease
        assert m is not None and plan is not None

        def run() -> None:
            try:
                _faults.fault_point("before-copy", h.step, self.rank)
                half = len(deferred) // 2
                for i, lf in enumerate(deferred):
                    if i == half:
                        _faults.fault_point("mid-copy", h.step, self.rank)
                    copy_leaf(lf, m.u8, m.arr, base)
                # Host copies done: the optimizer may go on (CUDA copies it waits for on
                # the GPU, through the event, not here).
                h._copied.set()
                if h._cuda_event is not None:
                    h._cuda_event.synchronize()
                mo = base + plan.manifest_offset
                m.arr[mo:mo + len(manifest)] = np.frombuffer(manifest, dtype=np.uint8)
                _faults.fault_point("before-seal", h.step, self.rank)
                reply = self._call("Seal", pb.SealRequest(
                    job=self.job, rank=self.rank, lease=lease, step=h.step, slot=slot,
                    data_bytes=plan.data_bytes, manifest_offset=plan.manifest_offset,
                    manifest_bytes=len(manifest)))
                if reply.HasField("restorable_step"):
                    h.restorable_step = reply.restorable_step
                _faults.fault_point("after-seal", h.step, self.rank)
                h._sealed_at = time.monotonic()
                h._sealed.set()
            except BaseException as exc:  # noqa: BLE001 - handed to the trainer via the handle
                logger.warning("job=%s rank=%d step=%d snapshot failed: %s", self.job,
                               self.rank, h.step, exc)
                h._fail(exc)

        return run

    def _copy_cuda(self, leaves: list[Leaf], base: int) -> Any:
        """Queue device-to-host copies on a side stream; returns the event that marks them done."""
        assert self._map is not None
        m = self._map
        if not m.cuda_registered:
            rc = torch.cuda.cudart().cudaHostRegister(m.u8.data_ptr(), m.size, 0)
            if int(rc) != 0:
                raise ShardguardError(f"cudaHostRegister of arena {m.path} failed ({rc})")
            m.cuda_registered = True
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        stream = self._side_stream
        # The copy must start after the kernels that produced the tensors.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for lf in leaves:
                copy_leaf(lf, m.u8, m.arr, base, non_blocking=True)
                lf.value.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def _wait_copy(self) -> None:
        h = self._last
        if h is None:
            return
        if h._cuda_event is not None:
            # The optimizer's kernels wait on the GPU; the host does not block.
            torch.cuda.current_stream().wait_event(h._cuda_event)
        h.wait_copied()

    def _drain(self) -> None:
        h = self._last
        if h is not None:
            h._sealed.wait()

    def _is_restorable(self, step: int) -> bool:
        assert self._map is not None
        return any(s.state == fmt.SlotState.RESTORABLE and s.step == step
                   for s in self._map.header().slots)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job()

    # ---------------------------------------------------------------- restore

    def _restore_local(self, step: int, into: Any, map_location: Any, allow_pickle: bool) -> Any:
        reply = self._call("OpenForRestore", pb.OpenRequest(job=self.job, rank=self.rank,
                                                            lease=self._lease, step=step))
        try:
            assert self._map is not None
            m = self._map
            base = fmt.slot_offset(reply.slot, m.slot_bytes)
            mo = base + reply.manifest_offset
            doc = mf.parse(m.arr[mo:mo + reply.manifest_bytes], reply.data_bytes)
            _faults.fault_point("mid-restore", step, self.rank)
            return rebuild(doc, m.u8, m.arr, base, into, allow_pickle,
                           _device_resolver(map_location))
        finally:
            self._call("Release", pb.ReleaseRequest(job=self.job, rank=self.rank,
                                                    lease=self._lease, step=step))

    def _restore_tier(self, step: int, into: Any, map_location: Any, allow_pickle: bool) -> Any:
        logger.info("job=%s rank=%d: restoring step %d from the persistent tier in %s",
                    self.job, self.rank, step, self.tier_dir)
        return tier.restore(self.tier_dir, self.job, step, self.rank, self.world_size, into,
                            allow_pickle, _device_resolver(map_location))

    # ------------------------------------------------------------- plumbing

    def _register(self, slot_bytes: int) -> None:
        reply = self._call("Register", pb.RegisterRequest(
            job=self.job, rank=self.rank, world_size=self.world_size, slot_bytes=slot_bytes,
            pid=os.getpid(), local_ranks=self._local_ranks, force=self._force,
            nodes=[pb.NodeAddress(control=c, data=d) for c, d in self.nodes],
            node_index=self.node_index, group_size=self._code[0], parity=self._code[1]))
        self._lease = reply.lease
        self._lost_daemon = False
        if self._map is not None:
            self._map.close()
        self._map = _map_arena(reply.arena_path, reply.arena_bytes, reply.slot_bytes)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
            # A restarted daemon has adopted our arena but not our lease: register again.
            if isinstance(err, (DaemonUnavailableError, LeaseError)):
                self._lost_daemon = True
            raise err from None

    def _reduce_max(self, values: list[int]) -> list[int]:
        if self._group is None:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return [int(v) for v in t.tolist()]

    def _check_open(self) -> None:
        if self._closed:
            raise ShardguardError("client is closed")


def _map_arena(path: str, size: int, slot_bytes: int) -> _Mapped:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise ArenaFormatError(f"arena {path} is not {size} bytes")
        # MAP_POPULATE maps every page now, so the first snapshot does not fault.
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    u8 = torch.frombuffer(mm, dtype=torch.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    return _Mapped(path, size, slot_bytes, mm, u8, arr)


def _device_resolver(map_location: Any) -> Callable[[str], torch.device]:
    if map_location is not None:
        fixed = torch.device(map_location)
        return lambda _: fixed

    def resolve(dev: str) -> torch.device:
        d = torch.device(dev)
        if d.type == "cuda" and (not torch.cuda.is_available()
                                 or (d.index or 0) >= torch.cuda.device_count()):
            return torch.device("cpu")
        return d

    return resolve


def _control_group() -> Any:
    """A gloo group for the take/skip and restore agreements (the default one if it is gloo)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


@dataclass(frozen=True)
class _Daemon:
    """What a rank learns of its node's daemon at connect (gathered from every rank)."""

    host: str
    socket: str
    control: str
    data: str
    group_size: int  # the daemon's default code
    parity: int
    fingerprint: str  # of its peer secret, "" without one
    tls: bool
    clock: float  # its time.time() when asked
    window_s: float  # how far peer tokens may be from a receiver's clock

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.host, self.socket, self.control, self.data


#: Clocks further apart than this share of the token window get a warning at connect.
CLOCK_WARN_SHARE = 0.25


def _membership(group: Any, socket_path: str, rank: int, timeout_s: float,
                code: tuple[int, int] = (0, 0)
                ) -> tuple[list[int], list[tuple[str, str]], int, tuple[int, int]]:
    """This rank's node: its local ranks, the job's node list, its node index, and the
    job's (group_size, parity).

    Nodes are the distinct daemons (same host and socket), in the order of their
    first rank; each daemon's peer addresses come from its own Status. What must
    match across the nodes is checked here, on every rank alike (the same gathered
    facts): the erasure code (``code``, 0 for the daemons' defaults, which must then
    agree), the peer secret, peer TLS and the clocks (ConfigMismatchError,
    ClockSkewError). The code is then passed explicitly at register, so every
    daemon protects the job the same way whatever its own defaults.
    """
    if group is None:
        return [rank], [], 0, code
    with grpc.insecure_channel(grpc_target(socket_path)) as ch:
        try:
            st = pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
    me = _Daemon(socket.gethostname(), os.path.realpath(socket_path), st.address.control,
                 st.address.data, st.default_group_size, st.default_parity,
                 st.secret_fingerprint, st.peer_tls, st.time_unix, st.token_window_s)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    daemons: dict[tuple[str, ...], _Daemon] = {}
    for who in everyone:
        daemons.setdefault(who.key, who)
    local = [r for r, who in enumerate(everyone) if who.key == me.key]
    order = list(daemons)
    if len(daemons) == 1:
        return local, [], 0, code
    nodes = list(daemons.values())
    code = _check_nodes(nodes, code)
    return local, [(d.control, d.data) for d in nodes], order.index(me.key), code


def _check_nodes(nodes: list["_Daemon"], code: tuple[int, int]) -> tuple[int, int]:
    """Refuse a job whose nodes disagree on what must match; returns the job's code."""
    def differ(what: str, values: list[Any]) -> None:
        by: dict[Any, list[int]] = {}
        for i, v in enumerate(values):
            by.setdefault(v, []).append(i)
        if len(by) > 1:
            raise ConfigMismatchError(
                f"the job's nodes disagree on {what}: " + "; ".join(
                    f"nodes {idx} have {v!r}" for v, idx in by.items())
                + " (it must be the same on every node of a job)")

    group_size, parity = code
    if not group_size:
        differ("the default group_size (pass group_size= to connect(), or align "
               "the daemons' config)", [d.group_size for d in nodes])
        group_size = nodes[0].group_size
    if not parity:
        differ("the default parity (pass parity= to connect(), or align the daemons' config)",
               [d.parity for d in nodes])
        parity = nodes[0].parity
    differ("the peer secret (secret_file; fingerprints shown)", [d.fingerprint for d in nodes])
    differ("peer TLS (tls_cert_file/tls_key_file/tls_ca_file)", [d.tls for d in nodes])
    window = min((d.window_s for d in nodes if d.window_s), default=0.0)
    if window:
        early = min(nodes, key=lambda d: d.clock)
        late = max(nodes, key=lambda d: d.clock)
        skew = late.clock - early.clock
        if skew > window:
            raise ClockSkewError(
                f"the clocks of nodes {nodes.index(early)} ({early.control}) and "
                f"{nodes.index(late)} ({late.control}) differ by {skew:.0f}s, more than the "
                f"{window:.0f}s within which peers accept each other's tokens: protection "
                f"would stall; synchronise the clocks (NTP/chrony)")
        if skew > CLOCK_WARN_SHARE * window:
            logger.warning("clocks of the job's nodes differ by %.0fs (peer tokens are "
                           "accepted within %.0fs): check NTP", skew, window)
    return group_size, parity


def connect(socket: str | None = None, job: str | None = None, *, rank: int | None = None,
            world_size: int | None = None, allow_pickle: bool = False, force: bool = False,
            timeout_s: float = DEFAULT_TIMEOUT_S, group_size: int = 0, parity: int = 0,
            tier_dir: str | None = None) -> Client:
    """Connect this rank to its node daemon and claim (job, rank).

    The socket is ``$SHARDGUARD_SOCKET`` or the default path; the job is
    ``$SHARDGUARD_JOB``, else ``$SLURM_JOB_ID``, else ``$TORCHELASTIC_RUN_ID``;
    rank and world come from torch.distributed if initialized, else
    ``$RANK``/``$WORLD_SIZE``, else 0/1. With torch.distributed initialized,
    every rank must call this (it is collective). With ranks on several
    daemons (nodes), the node list goes to every daemon at register, and
    snapshots are protected by parity across nodes: ``group_size`` nodes per
    group tolerating ``parity`` lost nodes each (0: the daemons' defaults).
    ``tier_dir`` (default ``$SHARDGUARD_TIER_DIR``) is the daemons' persistent tier:
    ``latest()`` and ``restore()`` read it when memory holds nothing.
    """
    socket_path = socket or default_socket_path()
    job = job or _detect_job()
    det_rank, det_world = _detect_rank_world()
    rank = det_rank if rank is None else rank
    world_size = det_world if world_size is None else world_size
    group = _control_group()
    local, nodes, node_index, (group_size, parity) = _membership(
        group, socket_path, rank, timeout_s, (group_size, parity))
    return Client(socket_path, job, rank, world_size, group=group, local_ranks=local,
                  allow_pickle=allow_pickle, force=force, timeout_s=timeout_s, nodes=nodes,
                  node_index=node_index, group_size=group_size, parity=parity,
                  tier_dir=tier_dir)
