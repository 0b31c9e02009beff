"""The trainer's side: register with the node daemon, snapshot asynchronously, restore.

A snapshot is decided on every rank together (one small collective on a gloo
control group), then copied into the rank's arena slot off the critical path:
CPU tensors on a background thread, CUDA tensors on a side stream into the
arena registered as pinned memory. The next ``optimizer.step()`` waits for the
copy (the tensors are immutable during forward and backward, which is the
window the copy hides in); the slot is sealed with the daemon when the copy is
done.

:class:`Client` is the façade over one module per concept: ``session`` (the gRPC
session, the lease, the one error translation), ``arena_map`` (the mapped arena),
``copier`` (the copy engine), ``agreement`` (take/skip and restore agreements),
``progress`` (where the newest snapshot stands), ``restorer`` (restore, the tier
fallback) and ``membership`` (job name, rank, nodes and checks at connect).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

from shardguard.client._unwrap import unwrap_optimizer
from shardguard.client._faults import fault_point
from shardguard.client.agreement import Agreement, Decision, Verdict
from shardguard.client.arena_map import ArenaMap
from shardguard.client.copier import Copier, copy_nice
from shardguard.client.handle import SnapshotHandle
from shardguard.client.membership import (
    control_group,
    detect_job,
    detect_rank_world,
    membership,
)
from shardguard.client.progress import PROTECT_TIMEOUT_S, Progress
from shardguard.client.restorer import Restorer
from shardguard.client.session import DEFAULT_TIMEOUT_S, Registration, Session
from shardguard.proto import arena as fmt
from shardguard.proto import manifest as mf
from shardguard.proto.safefile import check_socket
from shardguard.proto.errors import (
    DaemonUnavailableError,
    LeaseError,
    NoSpaceError,
    ShardguardError,
)
from shardguard.proto.paths import default_socket_path
from shardguard.proto.state_layout import Leaf, Plan, flatten
from shardguard.proto.tier import TIER_DIR_ENV

__all__ = ["DEFAULT_TIMEOUT_S", "Client", "SnapshotHandle", "connect", "connect_with"]

logger = logging.getLogger(__name__)

# Room for the manifest: twice what the first plan needs, at least this much.
MIN_MANIFEST_ROOM = 64 << 10


class Client:
    """A trainer rank's connection to its node daemon. Use :func:`connect`."""

    def __init__(self, socket_path: str, job: str, rank: int, world_size: int, *,
                 group: Any = None, local_ranks: list[int] | None = None,
                 allow_pickle: bool = False, force: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 nodes: list[tuple[str, str]] | None = None, node_index: int = 0,
                 group_size: int = 0, parity: int = 0, tier_dir: str | None = None,
                 epoch: int = 0) -> None:
        self.socket_path = socket_path
        # The persistent tier's directory ("": none), read when memory holds nothing.
        self.tier_dir = os.environ.get(TIER_DIR_ENV, "") if tier_dir is None else tier_dir
        self.nodes = nodes or []
        self.node_index = node_index
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.allow_pickle = allow_pickle
        self.timeout_s = timeout_s
        #: The gloo group the ranks agree on (None: this rank alone).
        self.group = group
        nice = copy_nice()  # a bad setting is refused before the daemon hears of this rank
        self._session = Session(socket_path, Registration(
            job, rank, world_size, local_ranks or [rank], self.nodes, node_index, group_size,
            parity, force, epoch), timeout_s)
        self._agreement = Agreement(group, rank)
        self._progress = Progress(self._session, float(os.environ.get(
            "SHARDGUARD_PROTECT_TIMEOUT_S", PROTECT_TIMEOUT_S)))
        self._restorer = Restorer(self._session, self._agreement, self.tier_dir)
        self._copier = Copier(job, rank, nice)
        self._plan: Plan | None = None
        self._hooks: list[Any] = []
        self._closed = False
        self._session.register(fmt.PAGE)

    @property
    def protect_timeout_s(self) -> float:
        """How long a sealed step may stay not restorable before it is given up."""
        return self._progress.protect_timeout_s

    @protect_timeout_s.setter
    def protect_timeout_s(self, value: float) -> None:
        self._progress.protect_timeout_s = value

    @property
    def _map(self) -> ArenaMap | None:
        """The rank's mapped arena (tests look at its CUDA registration)."""
        return self._session.arena

    # ------------------------------------------------------------ public API

    def protect(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` wait until an in-flight snapshot copy is done.

        A framework's wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
        ``LightningOptimizer``) is looked through to the torch optimizer that steps.
        """
        self._hooks.append(unwrap_optimizer(optimizer).register_step_pre_hook(
            lambda *_: self._before_optimizer_step()))

    def _before_optimizer_step(self) -> None:
        self._progress.pending = None  # the state a skipped snapshot named is about to change
        if self._progress.last is not None:
            self._progress.last.fence()

    def snapshot(self, step: int, state: Any, *, allow_pickle: bool | None = None
                 ) -> SnapshotHandle:
        """Start a snapshot of ``state`` as ``step``; returns at once.

        Every rank takes the step or every rank skips it (``handle.skipped``): a
        step is skipped while the previous one is still being copied or is not
        yet restorable.
        """
        self._check_open()
        self._progress.pending = None
        self._restorer.settle()  # a restore without copies lets its slot go first
        fault_point("before-snapshot", step, self.rank)
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        verdict, error = self._progress.verdict()
        leaves: list[Leaf] = []
        manifest = b""
        # PENDING plans too: a failed or given-up step elsewhere makes every rank take.
        if verdict in (Verdict.READY, Verdict.PENDING):
            try:
                tree, leaves = flatten(state, pickle_ok)
                manifest = self._ensure_plan(leaves, step, tree)
            except (ShardguardError, TypeError, ValueError) as exc:
                verdict, error = Verdict.ERROR, exc
        decision = self._agreement.decide(verdict, self._progress.previous_settled())
        if decision is Decision.REFUSE:
            raise error or ShardguardError(
                f"job {self.job} step {step}: snapshot refused on another rank")
        if decision is Decision.SKIP:
            self._progress.skipped()
            self._progress.pending = (step, state, pickle_ok)
            return SnapshotHandle(step, skipped=True)
        return self._take(step, leaves, manifest, (step, state, pickle_ok))

    def _take(self, step: int, leaves: list[Leaf], manifest: bytes,
              pending: tuple[int, Any, bool]) -> SnapshotHandle:
        """Claim a slot and start the copy of the step every rank agreed to take."""
        skipped = self._progress.taken()
        try:
            slot = self._session.begin(step, skipped)
        except (DaemonUnavailableError, LeaseError, NoSpaceError) as exc:
            # The daemon died or restarted since the agreement, or its shm directory is
            # full: this step is not protected (it can't become restorable without this
            # rank), training goes on, the restorable step stays; the next one is taken.
            logger.warning("job=%s rank=%d: step %d not snapshotted: %s", self.job, self.rank,
                           step, exc)
            self._progress.last = SnapshotHandle(step, skipped=True, error=exc)
            self._progress.pending = pending
            return self._progress.last
        handle = SnapshotHandle(step)
        self._progress.last = handle
        arena, plan, lease = self._session.arena, self._plan, self._session.lease
        assert arena is not None and plan is not None
        try:
            self._copier.start(handle, arena, slot, leaves, plan.data_bytes,
                               manifest, plan.manifest_offset, lambda blocks: self._session.seal(
                                   lease, step, slot, plan.data_bytes, plan.manifest_offset,
                                   len(manifest), blocks))
        except BaseException as exc:
            handle.fail(exc)  # never sealed: the next snapshot and close() must not wait
            raise
        return handle

    def wait(self, restorable: bool = False, timeout: float | None = None) -> None:
        """Wait for every in-flight snapshot to be sealed (and, optionally, restorable).

        If the last ``snapshot()`` was skipped (the one before it was still in flight)
        and the optimizer has not stepped since, it is taken now: after ``wait()`` the
        newest snapshot is the last step snapshotted. That makes ``wait()`` collective
        then: call it on every rank, as at the end of training.
        """
        if self._progress.pending is not None:
            self._progress.take_pending(self._agreement, self.snapshot, timeout)
        h = self._progress.last
        if h is None or h.skipped:
            return
        h.wait(timeout)
        if restorable:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._progress.is_restorable(h.step):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"step {h.step} not restorable within {timeout}s")
                time.sleep(0.005)

    def latest(self) -> int | None:
        """The newest restorable step, the same on every rank (rank 0 asks, all agree)."""
        self._check_open()
        step = self._restorer.agreed_step(None)
        return None if step < 0 else step

    def restore(self, step: int | None = None, into: Any = None, *,
                map_location: str | torch.device | None = None,
                allow_pickle: bool | None = None, copy: bool = True) -> tuple[int, Any]:
        """The newest restorable step (or ``step``) and its state, the same on every rank.

        Every byte read from memory is checked against the CRC32C the snapshot was
        sealed with (made as it was copied into memory), as it is copied (chunk by chunk, each checksummed
        while it is in cache: the snapshot is read once). Bytes that fail are never
        returned: the daemon re-checks its copy, repairs it from parity where the job
        has parity, and the restore reads it again; else every rank raises.

        Args:
            step: a specific step; it must be the restorable one.
            into: a state of the same structure whose tensors are overwritten in place
                where dtype and shape match (others are allocated).
            map_location: device for restored tensors; default: where they were,
                if that device exists here, else CPU.
            copy: False: host tensors and numpy arrays are not copied but mapped
                copy-on-write from the snapshot in the node's memory (a private mapping:
                what the trainer writes copies the page it lands on and stays in this
                process; nothing is copied until then). The snapshot's checksums are
                checked over the mapped bytes before ``restore`` returns (one read, no
                copy); they are not checked again afterwards. The snapshot stays pinned
                (the daemon does not reuse its slot) until this rank's next
                ``snapshot()``, ``restore()`` or ``close()``, which first copies the pages
                not yet written into the process. Not with ``into``; tensors for another
                device, and a restore from the persistent tier, are copied as usual.

        Raises:
            NotRestorableError: nothing (or not ``step``) is restorable, on every rank.
            RestoreError: restore failed on some rank (bytes that failed their checksum
                and could not be repaired too); raised on every rank.
        """
        self._check_open()
        if not copy and into is not None:
            raise ValueError("restore(copy=False) maps new tensors: it cannot fill into")
        self._drain()
        pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
        agreed, state = self._restorer.restore(step, into, map_location, pickle_ok, copy)
        self._progress.last = None
        self._progress.pending = None
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
            if flush and self._progress.pending is not None:
                self._progress.take_pending(self._agreement, self.snapshot, None)
            self._drain()
            self._restorer.settle()
        finally:
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._copier.close(self.timeout_s)
            self._session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(flush=exc_type is None)

    # ------------------------------------------------------------- plumbing

    def _ensure_plan(self, leaves: list[Leaf], step: int, tree: dict[str, Any]) -> bytes:
        """Place the leaves (re-planning if their sizes changed); returns the manifest."""
        if self._plan is None or not self._plan.matches(leaves):
            self._plan = Plan(tuple(lf.nbytes for lf in leaves))
            logger.info("job=%s rank=%d planned %d leaves, %d data bytes", self.job, self.rank,
                        len(leaves), self._plan.data_bytes)
        self._plan.place(leaves)
        manifest = mf.dumps(tree, step, self._plan.data_bytes)
        need = self._plan.manifest_offset + len(manifest)
        assert self._session.arena is not None
        if need > self._session.arena.slot_bytes:
            room = max(2 * len(manifest), MIN_MANIFEST_ROOM)
            self._session.register(fmt.align_up(self._plan.manifest_offset + room))
        return manifest

    def _drain(self) -> None:
        if self._progress.last is not None:
            self._progress.last.wait_done()

    def _check_open(self) -> None:
        if self._closed:
            raise ShardguardError("client is closed")


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
    return connect_with(control_group, socket, job, rank=rank, world_size=world_size,
                        allow_pickle=allow_pickle, force=force, timeout_s=timeout_s,
                        group_size=group_size, parity=parity, tier_dir=tier_dir)


def connect_with(make_group: Callable[[], Any], socket: str | None = None,
                 job: str | None = None, *, rank: int | None = None,
                 world_size: int | None = None, allow_pickle: bool = False,
                 force: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 group_size: int = 0, parity: int = 0, tier_dir: str | None = None) -> Client:
    """:func:`connect`, with the client agreeing on the gloo group ``make_group()`` returns
    (None: this rank alone), made once the job and rank are known; collective over it."""
    socket_path = socket or default_socket_path()
    check_socket(socket_path)  # an explicit path too: never another (non-root) user's daemon
    job = job or detect_job()
    det_rank, det_world = detect_rank_world()
    rank = det_rank if rank is None else rank
    world_size = det_world if world_size is None else world_size
    group = make_group()
    m = membership(group, socket_path, rank, timeout_s, (group_size, parity), job)
    return Client(socket_path, job, rank, world_size, group=group, local_ranks=m.local_ranks,
                  allow_pickle=allow_pickle, force=force, timeout_s=timeout_s, nodes=m.nodes,
                  node_index=m.node_index, group_size=m.code[0], parity=m.code[1],
                  tier_dir=tier_dir, epoch=m.epoch)
