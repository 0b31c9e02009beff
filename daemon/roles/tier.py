"""The persistent tier: every ``tier_every``-th restorable step, written in the background to
``tier_dir`` in torch.distributed.checkpoint's format (on-disk layout: proto/tier.py).

Two parts, one per side of a flush: the job's coordinator claims the steps to flush and
commits them once every node wrote its ranks (roles/tier_commit.py); each node stages
its ranks' slots and has a flusher process write them (roles/tier_flush.py). A one-node
job's daemon is both: the store's ``on_restorable`` hook claims and flushes. In a
multi-node job the claim rides on the step's announcement (service/wiring.py) and the
nodes report to the coordinator over the peer service. Saving the newest step on the
way down: roles/exit_flush.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from shardguard.daemon.base.config import Config
from shardguard.daemon.errors import ConfigError
from shardguard.daemon.roles.tier_commit import Commits
from shardguard.daemon.roles.tier_flush import FLUSHER, FlushError, NodeFlush, Report, Workers
from shardguard.daemon.storage.store import Store
from shardguard.proto.meta import FlushedReport

logger = logging.getLogger(__name__)

__all__ = ["FLUSHER", "FlushError", "Report", "Tier"]


class Tier:
    """This node's persistent tier: its flushes, and the commits of the jobs it coordinates.

    Args:
        config: ``tier_dir`` (empty: the tier is off and every method does nothing),
            ``tier_every``, ``tier_keep``, ``tier_timeout_s``.
        store: the node's store, whose slots are flushed.

    Raises:
        ConfigError: ``tier_dir`` cannot be created or written, or torch cannot be
            imported by this Python (the flusher needs it).
    """

    def __init__(self, config: Config, store: Store) -> None:
        self.root = config.tier_dir
        self.store = store
        self._workers = Workers()
        self.commits = Commits(self.root, config.tier_every, config.tier_keep,
                               config.tier_timeout_s, self._workers)
        self.node = NodeFlush(self.root, config.tier_timeout_s, store, self._workers)
        if self.root:
            self._check_root()

    @property
    def enabled(self) -> bool:
        return bool(self.root)

    def _check_root(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tier_dir {self.root}: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"tier_dir {self.root} is not writable by this daemon")
        if importlib.util.find_spec("torch") is None:
            raise ConfigError(f"tier_dir needs torch importable by {sys.executable} (the "
                              "flusher writes torch.distributed.checkpoint's format)")

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the flushes in progress (what they wrote is left to the next commit's cleanup)."""
        self._workers.stop()
        self.node.close()
        self._workers.join(grace_s)
        self.node.free()

    def forget(self, job: str) -> None:
        """The job was dropped from this node: stop its flush, free its staging buffer."""
        self.commits.forget(job)
        self.node.forget(job)

    # ----------------------------------------------------------- coordinator

    def claim(self, job: str, step: int, nodes: int, world: int, force: bool = False
              ) -> str | None:
        """Whether the coordinator flushes restorable ``step``: its token if so, else None
        (``force``: the newest step, saved on the way down; see Commits.claim)."""
        if not self.enabled:
            return None
        return self.commits.claim(job, step, nodes, world, force)

    def busy(self, job: str) -> bool:
        """Whether a flush of ``job`` is claimed and not yet committed or given up."""
        return self.commits.busy(job)

    def flushed(self, job: str, step: int, node: int, report: FlushedReport) -> None:
        """A node's report on its part of the flush of ``step``; commits after the last one."""
        self.commits.flushed(job, step, node, report)

    # ------------------------------------------------------------ every node

    def prepare(self, job: str) -> bool:
        """Whether the job's staging buffer fits its ranks' slots here (else it grows in the
        background, no slot held)."""
        return self.enabled and self.node.prepare(job)

    def flushing(self, job: str) -> bool:
        """Whether this node is writing its part of a flush of ``job``."""
        return self.node.flushing(job)

    def flush(self, job: str, step: int, token: str, node: int, report: Report) -> None:
        """Flush this node's ranks of restorable ``step`` (NodeFlush.flush)."""
        self.node.flush(job, step, token, node, report)

    def on_restorable(self, job: str, step: int) -> None:
        """A job whose every rank is on this node has a new restorable step (the store's hook)."""
        if not self.enabled:
            return
        try:
            token = self.claim(job, step, 1, self.store.job(job).world_size)
            if token is not None:
                self.flush(job, step, token, 0, lambda doc: self.flushed(job, step, 0, doc))
        except Exception:  # noqa: BLE001 - a seal must not fail because of the tier
            logger.exception("cannot flush", extra={"job": job, "step": step})
