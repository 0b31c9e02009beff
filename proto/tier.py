"""The persistent tier's layout on disk, shared by the daemon (which commits a flushed step)
and the client (whose flusher writes the ranks, and whose restore reads them).

::

    <tier_dir>/<job>/latest                     the newest complete step: "N\\n"
    <tier_dir>/<job>/step-<N>/step.json         what the step holds (job, step, world, nodes)
    <tier_dir>/<job>/step-<N>/rank-<r>/         rank r's state as one DCP checkpoint
                                                (.metadata, __0_0.distcp), plus
                                                shardguard.json: the rank's manifest
    <tier_dir>/<job>/step-<N>.<token>.tmp/      a flush in progress: rank-<r>/ and one
                                                node-<i>.json per node that wrote its ranks

A flush writes and fsyncs everything under its ``.tmp`` directory; once every node's
marker is there, the job's coordinator writes ``step.json``, renames the directory to
``step-<N>``, fsyncs the job directory, and only then replaces ``latest`` (write, fsync,
rename, fsync). ``latest`` therefore never names a partial step: what a crash leaves
behind is a ``.tmp`` directory, or a complete ``step-<N>`` that ``latest`` never named;
the commits that follow delete both (daemon/roles/tier.py). Every name is made here, so the
two sides agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from shardguard.proto import safefile

#: ``format`` of step.json and of every rank's shardguard.json.
FORMAT = "shardguard-tier/1"
POINTER = "latest"
STEP_DOC = "step.json"
RANK_DOC = "shardguard.json"
#: Where a trainer's client looks for the tier (the daemon reads the same variable as
#: its ``tier_dir`` option, so one ``export`` in a job script configures both sides).
TIER_DIR_ENV = "SHARDGUARD_TIER_DIR"

_STEP_RE = re.compile(r"^step-(\d+)(?:\.([0-9a-f]+)\.tmp)?$")


def job_dir(root: str, job: str) -> str:
    return os.path.join(root, job)


def step_dir(root: str, job: str, step: int) -> str:
    return os.path.join(root, job, f"step-{step}")


def tmp_dir(root: str, job: str, step: int, token: str) -> str:
    """A flush attempt's own directory: attempts never share one, even for the same step."""
    return os.path.join(root, job, f"step-{step}.{token}.tmp")


def rank_dir(step_path: str, rank: int) -> str:
    return os.path.join(step_path, f"rank-{rank}")


def marker(step_path: str, node: int) -> str:
    return os.path.join(step_path, f"node-{node}.json")


def pointer_path(root: str, job: str) -> str:
    return os.path.join(root, job, POINTER)


def parse_step_name(name: str) -> tuple[int, str | None] | None:
    """``(step, token)`` for ``step-N.<token>.tmp``, ``(step, None)`` for ``step-N``, else None."""
    m = _STEP_RE.match(name)
    return None if m is None else (int(m.group(1)), m.group(2))


def read_pointer(root: str, job: str) -> int | None:
    """The step ``latest`` names; None when there is none (or it is not a step number)."""
    try:
        with open(pointer_path(root, job), encoding="utf-8") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def read_doc(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} document")
    return doc


# ------------------------------------------------------------------ durability


fsync_dir = safefile.fsync_dir


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (children before their directory)."""
    for top, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(top, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(top)


def write_durably(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` all or nothing: a new temporary file (never one planted
    at its name), fsynced, renamed over ``path``, then the directory fsynced."""
    safefile.write_atomic(path, data, durable=True)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
