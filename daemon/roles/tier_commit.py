"""The coordinator's part of the persistent tier (the tier: roles/tier.py; a node's part:
roles/tier_flush.py).

**Which steps.** The job's coordinator (node 0; the only node of a one-node job) *claims*
a restorable step: the first restorable step of each window of ``tier_every`` steps
after the last flushed one, and only while no flush of the job is running (one not
complete on every node after ``tier_timeout_s`` is given up; a failed one is retried
at the next restorable step). The last flushed step comes from the job's ``latest``
pointer, so a restarted coordinator goes on where the directory says. In a multi-node
job the claim (a token) rides on the step's announcement, so every node flushes the
same steps.

**Commit.** When every node reported, the coordinator checks every marker (same token,
every rank of the world present), writes ``step.json``, renames the directory to
``step-<N>``, fsyncs the job directory, and only then replaces ``latest`` (write, fsync,
rename, fsync). Then it deletes flushed steps beyond ``tier_keep``, the directories of
failed or crashed attempts, and complete steps ``latest`` never named (a commit that
crashed before its pointer: a history the job left behind). A crash anywhere leaves
``latest`` naming the previous complete step.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shardguard.daemon.errors import ShardguardError
from shardguard.daemon.roles.tier_flush import FAULTS, FlushError, Workers
from shardguard.proto import safefile
from shardguard.proto import tier as layout
from shardguard.proto.meta import FlushedReport

logger = logging.getLogger(__name__)


@dataclass
class _Claim:
    """The coordinator's record of the flush of one step."""

    step: int
    token: str
    nodes: int
    world: int
    started: float
    done: set[int] = field(default_factory=set)


class Commits:
    """The claims and commits of the jobs this node coordinates.

    Args:
        root: ``tier_dir``.
        every: ``tier_every``.
        keep: ``tier_keep``.
        timeout_s: ``tier_timeout_s`` (a claim not complete on every node is given up).
        workers: the threads commits run in.
    """

    def __init__(self, root: str, every: int, keep: int, timeout_s: float,
                 workers: Workers) -> None:
        self.root = root
        self.every = every
        self.keep = keep
        self.timeout_s = timeout_s
        self.workers = workers
        self._lock = threading.Lock()
        self._claims: dict[str, _Claim] = {}
        self._last: dict[str, int | None] = {}

    def forget(self, job: str) -> None:
        """The job was dropped from this node: its claim and last flushed step go."""
        with self._lock:
            self._claims.pop(job, None)
            self._last.pop(job, None)

    def claim(self, job: str, step: int, nodes: int, world: int, force: bool = False
              ) -> str | None:
        """Whether the coordinator flushes restorable ``step``: its token if so, else None.

        ``force``: whatever ``tier_every`` says, as long as the step is newer than the last
        flushed one (the newest step, saved on the way down: roles/exit_flush.py)."""
        now = time.monotonic()
        with self._lock:
            c = self._claims.get(job)
            if c is not None:
                if now - c.started < self.timeout_s:
                    return None
                logger.warning("flush of step %d given up after %.0fs (nodes done: %s of %d)",
                               c.step, now - c.started, sorted(c.done), c.nodes,
                               extra={"job": job, "step": c.step})
                del self._claims[job]
            last = self._last_flushed(job)
            if last is not None and (step <= last if force
                                     else step // self.every <= last // self.every):
                return None
            c = _Claim(step, secrets.token_hex(8), nodes, world, now)
            self._claims[job] = c
        logger.info("flushing step %d to the persistent tier", step,
                    extra={"job": job, "step": step})
        return c.token

    def busy(self, job: str) -> bool:
        """Whether a flush of ``job`` is claimed and not yet committed or given up."""
        with self._lock:
            return job in self._claims

    def _last_flushed(self, job: str) -> int | None:
        if job not in self._last:
            try:
                self._last[job] = layout.read_pointer(self.root, job)
            except OSError as exc:
                logger.warning("cannot read the tier's pointer: %s", exc, extra={"job": job})
                return None
        return self._last[job]

    def flushed(self, job: str, step: int, node: int, report: FlushedReport) -> None:
        """A node's report on its part of the flush of ``step``; commits after the last one."""
        with self._lock:
            c = self._claims.get(job)
            if c is None or c.step != step or c.token != report.token:
                logger.info("late flush report from node %d ignored", node,
                            extra={"job": job, "step": step, "node": node})
                return
            if not report.ok:
                del self._claims[job]
                logger.warning("flush failed on node %d: %s; the next due step is flushed",
                               node, report.why, extra={"job": job, "step": step})
                return
            c.done.add(node)
            if len(c.done) < c.nodes:
                return
        self.workers.start(f"sg-tier-commit-{job}", self._commit, job, c)

    def _commit(self, job: str, c: _Claim) -> None:
        try:
            tmp = layout.tmp_dir(self.root, job, c.step, c.token)
            ranks: set[int] = set()
            for node in range(c.nodes):
                m = _read_marker(tmp, node)
                if m.get("token") != c.token:
                    raise FlushError(f"node {node}'s marker is of another flush")
                ranks.update(int(r) for r in m["ranks"])
            if ranks != set(range(c.world)):
                raise FlushError(f"ranks {sorted(set(range(c.world)) - ranks)} were not written "
                                 "(is tier_dir one directory every node sees?)")
            layout.write_durably(os.path.join(tmp, layout.STEP_DOC), json.dumps({
                "format": layout.FORMAT, "job": job, "step": c.step, "world": c.world,
                "nodes": c.nodes, "token": c.token, "time": time.time()}).encode())
            with self._lock:
                previous = self._last_flushed(job)
            final = layout.step_dir(self.root, job, c.step)
            if os.path.exists(final):
                layout.remove_tree(final)  # complete but never named by latest: abandoned
            os.rename(tmp, final)
            layout.fsync_dir(layout.job_dir(self.root, job))
            FAULTS.point("before-pointer", c.step)  # SIGKILL
            layout.write_durably(layout.pointer_path(self.root, job), f"{c.step}\n".encode())
            with self._lock:
                self._last[job] = c.step
            logger.info("step %d flushed to %s in %.2fs", c.step, final,
                        time.monotonic() - c.started, extra={"job": job, "step": c.step})
            self._prune(job, c.step, -1 if previous is None else previous)
        except (OSError, ValueError, KeyError, ShardguardError) as exc:
            logger.error("commit failed: %s", exc, extra={"job": job, "step": c.step})
        except Exception:  # noqa: BLE001 - the claim is released below all the same
            logger.exception("commit failed", extra={"job": job, "step": c.step})
        finally:
            with self._lock:
                if self._claims.get(job) is c:
                    del self._claims[job]

    def _prune(self, job: str, step: int, previous: int) -> None:
        """Keep the newest ``tier_keep`` complete steps up to ``step``; delete the rest.

        ``previous`` is the step ``latest`` named before ``step``: a complete step after it
        (other than ``step``) was never named, it is what a commit that crashed before
        its pointer left, of a history the job has since left behind. Every complete step
        up to ``previous`` was named in its time (this rule ran at each commit).
        """
        where = layout.job_dir(self.root, job)
        complete = []
        for name in os.listdir(where):
            parsed = layout.parse_step_name(name)
            path = os.path.join(where, name)
            if parsed is None:
                # A pointer update that crashed before its rename (".part": older versions).
                if name.startswith(layout.POINTER + ".") and (safefile.is_temp(name)
                                                              or name.endswith(".part")):
                    safefile.remove(path)
                continue
            s, token = parsed
            if token is not None and s <= step:
                layout.remove_tree(path)  # an attempt that failed or crashed
            elif token is None and (s > step or previous < s < step):
                layout.remove_tree(path)  # complete, never named by latest: abandoned
            elif token is None and s < step:
                complete.append(s)
        for s in sorted(complete, reverse=True)[self.keep - 1:]:
            layout.remove_tree(layout.step_dir(self.root, job, s))


def _read_marker(tmp: str, node: int, wait_s: float = 10.0) -> dict[str, Any]:
    """A node's marker; on a network file system another node's new file may take a few
    seconds to be seen (cached lookups), so a missing one is looked for again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return layout.read_doc(layout.marker(tmp, node))
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise FlushError(f"node {node} reported its ranks written, but its marker is "
                                 f"not in {tmp} (is tier_dir one directory every node "
                                 "sees?)") from None
            os.listdir(tmp)  # a fresh listing refreshes an NFS client's cached lookups
            time.sleep(0.2)
