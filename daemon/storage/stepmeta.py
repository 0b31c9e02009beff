"""The step metadata this node keeps: what a rebuild and ``verify`` need, and whose pieces it has.

When a step becomes restorable every node keeps its :class:`~shardguard.proto.meta.StepMeta`
(the group it holds pieces of, announced by its leader, or brought by a catch-up) in memory and in a file
``<prefix>.<job>.x<step>`` beside the arenas, so that a restarted daemon has it. With it
goes the **holder**: which node of that step's topology this daemon holds the pieces of
(itself as numbered when the step was protected, or the lost node it rebuilt), since a
relaunch may number nodes differently. The previous step's file stays while its slots do
(ranks may still agree on it, see Store._roll_back). Files are written through
proto/safefile.py: a new file renamed into place, never through a planted link.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading

from shardguard.proto import safefile
from shardguard.proto.meta import StepMeta

logger = logging.getLogger(__name__)

#: Kept beside a step's metadata in this node's file only (never sent to peers).
HOLDER_KEY = "holder"


class StepMetas:
    """Every job's newest step metadata on this node, and the node whose pieces it holds."""

    def __init__(self, shm_dir: str, prefix: str) -> None:
        self.shm_dir, self.prefix = shm_dir, prefix
        self._lock = threading.Lock()
        self._metas: dict[str, StepMeta] = {}
        self._holders: dict[str, int | None] = {}

    # ------------------------------------------------------------------ reads

    def get(self, job: str) -> StepMeta | None:
        with self._lock:
            return self._metas.get(job)

    def holder(self, job: str) -> int | None:
        with self._lock:
            return self._holders.get(job)

    def current(self, job: str) -> tuple[StepMeta | None, int | None]:
        with self._lock:
            return self._metas.get(job), self._holders.get(job)

    def step(self, job: str) -> int | None:
        meta = self.get(job)
        return None if meta is None else meta.step

    # ----------------------------------------------------------------- writes

    def save(self, meta: StepMeta, holder: int | None) -> None:
        """Keep ``meta`` (file and memory) with the node whose pieces are held here."""
        doc = {**meta.to_doc(), HOLDER_KEY: holder}
        safefile.write_atomic(self.path(meta.job, meta.step), json.dumps(doc).encode())
        with self._lock:
            cur = self._metas.get(meta.job)
            if cur is None or cur.step <= meta.step:
                self._metas[meta.job] = meta
                self._holders[meta.job] = holder

    def load_all(self) -> None:
        """Read what a previous daemon kept (at start); a bad file is logged and skipped."""
        for path in sorted(glob.glob(os.path.join(self.shm_dir, glob.escape(self.prefix)
                                                  + ".*.x*"))):
            if safefile.is_temp(os.path.basename(path)):
                continue
            try:
                name = os.path.basename(path)[len(self.prefix) + 1:]
                job, _, tail = name.rpartition(".x")
                meta, holder = self._read(path, job, int(tail))
                cur = self._metas.get(job)
                if cur is None or cur.step < meta.step:
                    self._metas[job], self._holders[job] = meta, holder
            except Exception as exc:  # noqa: BLE001 - a bad file must not stop the daemon
                logger.error("cannot read step metadata %s: %s", path, exc)

    def roll_back(self, job: str, step: int) -> None:
        """The job went back to ``step`` on this node: its metadata is the current one again."""
        try:
            meta, holder = self._read(self.path(job, step), job, step)
        except (OSError, ValueError, LookupError):
            meta, holder = None, None
        with self._lock:
            if meta is None:
                self._metas.pop(job, None)
                self._holders.pop(job, None)
            else:
                self._metas[job], self._holders[job] = meta, holder
        for path, s in self._files(job):
            if s > step:
                _unlink(path)

    def release_before(self, job: str, step: int) -> None:
        """Delete the files of steps before ``step``."""
        for path, s in self._files(job):
            if s < step:
                _unlink(path)

    def forget(self, job: str) -> None:
        with self._lock:
            self._metas.pop(job, None)
            self._holders.pop(job, None)

    # ---------------------------------------------------------------- helpers

    def path(self, job: str, step: int) -> str:
        return os.path.join(self.shm_dir, f"{self.prefix}.{job}.x{step}")

    def _files(self, job: str) -> list[tuple[str, int]]:
        out = []
        for path in glob.glob(os.path.join(self.shm_dir, glob.escape(f"{self.prefix}.{job}.")
                                           + "x*")):
            tail = os.path.basename(path).rsplit(".x", 1)[1]
            if tail.isdigit():
                out.append((path, int(tail)))
        return out

    @staticmethod
    def _read(path: str, job: str, step: int) -> tuple[StepMeta, int | None]:
        doc = json.loads(safefile.read_owned(path))  # ours, never through a link
        holder = doc.pop(HOLDER_KEY, None) if isinstance(doc, dict) else None
        ok = isinstance(holder, int) and not isinstance(holder, bool) and holder >= 0
        return StepMeta.from_doc(doc, job, step), holder if ok else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
