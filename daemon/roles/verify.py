"""``shardguard verify``: re-check every checksum of a restorable step, and that every stripe decodes.

Each node checks its own part of the step (:func:`check_node`): the CRC32C of
its ranks' slots (data and manifest), of every data piece it contributed and
of every parity piece it holds, against the step's metadata. The node asked
(:func:`verify_job`) gathers the nodes' answers and decides per stripe
whether at least ``k`` of its ``k + m`` pieces are sound, i.e. whether a lost
node could still be rebuilt.

Nothing is pinned, marked or repaired: training goes on while this runs. A
slot or parity file that training rewrote while it was read is reported as
*superseded* (the step was replaced by a newer one), not as corruption; the
command line then checks the new restorable step.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import mmap
import os
import time
from typing import TYPE_CHECKING, Any

from shardguard.daemon.codec import crc32c
from shardguard.daemon.errors import NotRestorableError, ShardguardError
from shardguard.daemon.store import SUPERSEDED
from shardguard.proto import peer_pb2 as ppb

if TYPE_CHECKING:
    from shardguard.daemon.protect import Protector

logger = logging.getLogger(__name__)


def check_node(p: "Protector", job: str, step: int) -> dict[str, Any]:
    """This node's part of ``step``: ``{"node", "step", "superseded", "ranks", "pieces", "bytes"}``."""
    from shardguard.daemon.protect import Topology, crc_of

    topo = p.topology(job)
    me = topo.node_index if topo is not None else 0
    rec = p.store.job(job)
    gens = {r: p.store.slot_generation(job, r, step) for r in rec.local_ranks}
    out = _check_ranks(p.store, job, step, me)
    if out["superseded"] or topo is None:
        return out
    meta = _meta_of(p, job, step)
    if meta is None:
        out["superseded"] = True
        return out
    old = Topology.from_doc(meta["topology"])
    # The pieces of the node of the step's topology that this daemon holds: after a
    # relaunch that moved ranks, not necessarily the one with its current number.
    held = p.holder(job)
    for where, stripe in sorted(meta["stripes"].items()):
        group, s = (int(x) for x in where.split("/"))
        k = old.placement.groups[group].k
        for idx, piece in sorted(stripe["pieces"].items(), key=lambda kv: int(kv[0])):
            if held is None or int(piece["node"]) != held:
                continue
            index = int(idx)
            check = {"group": group, "stripe": s, "index": index, "node": held,
                     "parity": index >= k, "ok": False, "error": ""}
            try:
                if index >= k:
                    crc, moved = _parity_crc(p._piece_path(job, step, group, s, index))
                    if moved:
                        out["superseded"] = True
                        return out
                else:
                    crc = crc_of(p.local_piece(job, step, group, s, index))
                check["ok"] = crc == int(piece["crc"])
                check["error"] = "" if check["ok"] else "checksum fails"
                out["bytes"] += int(piece["len"])
            except FileNotFoundError:
                if _moved_on(p, job, step):  # released: a newer step became restorable
                    out["superseded"] = True
                    return out
                check["error"] = "parity piece missing"
            except ShardguardError as exc:
                check["error"] = str(exc)
            out["pieces"].append(check)
    if any(p.store.slot_generation(job, r, step) != g for r, g in gens.items()):
        out["superseded"] = True
    elif any(not c["ok"] for c in out["pieces"]) and _moved_on(p, job, step):
        out["superseded"] = True  # what failed may have been replaced while it was read
    return out


def _meta_of(p: "Protector", job: str, step: int) -> dict[str, Any] | None:
    """This node's metadata of ``step``; None when a newer step replaced it.

    The announcement that ``step`` is restorable reaches the nodes one by one,
    so a node whose ranks sealed ``step`` may not have it yet: it is waited for
    (up to ``peer_timeout_s``), then the node is reported as not knowing the step.
    """
    deadline = time.monotonic() + p.config.peer_timeout_s
    while True:
        meta = p.meta(job)
        have = None if meta is None else int(meta["step"])
        if have == step:
            return meta
        if have is not None and have > step:
            return None
        try:
            p.store.check_sealed(job, step)  # else no announcement of it can be on its way
            waiting = True
        except ShardguardError:
            waiting = False
        if not waiting or time.monotonic() >= deadline:
            raise NotRestorableError(f"job {job}: node {p.topology(job).node_index} has no "
                                     f"metadata of step {step} (its restorable step is {have})")
        time.sleep(0.05)


def _moved_on(p: "Protector", job: str, step: int) -> bool:
    meta = p.meta(job)
    return meta is not None and int(meta["step"]) > step


def _parity_crc(path: str) -> tuple[int, bool]:
    """The CRC32C of a parity file, and whether it was released (renamed) while read."""
    with open(path, "rb") as fh:
        ino = os.fstat(fh.fileno()).st_ino
        size = os.fstat(fh.fileno()).st_size
        if not size:
            return 0, False
        with mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
            crc = crc32c(memoryview(mm))
    try:
        return crc, os.stat(path).st_ino != ino
    except FileNotFoundError:
        return crc, True


def verify_job(p: "Protector | None", store: Any, job: str, step: int | None) -> dict[str, Any]:
    """Check every node's part of ``step`` (default: the restorable step) and every stripe."""
    from shardguard.daemon.protect import Topology

    rec = store.job(job)
    if rec.restorable_step is None:
        stall = p.stalls.get(job) if p is not None else None
        raise NotRestorableError(f"job {job} has no restorable step" + (
            f"; protection is stalled here ({stall.cause.value}): {stall.detail}"
            if stall is not None else ""))
    if step is None:
        step = rec.restorable_step
    if step != rec.restorable_step:
        raise NotRestorableError(f"job {job}: step {step} is not restorable here (the "
                                 f"restorable step is {rec.restorable_step}); only it has parity")
    topo = p.topology(job) if p is not None else None
    if topo is None:
        if p is not None:
            node = check_node(p, job, step)
        else:
            node = _check_ranks(store, job, step)
        return {"job": job, "step": step, "superseded": node["superseded"], "nodes": [node],
                "unreachable": [], "stripes": [], "bytes": node["bytes"]}
    meta = _meta_of(p, job, step)
    if meta is None:  # replaced while this began: the caller checks the new step
        return {"job": job, "step": step, "superseded": True, "nodes": [], "unreachable": [],
                "stripes": [], "bytes": 0}
    old = Topology.from_doc(meta["topology"])
    addresses = topo.nodes if len(topo.nodes) == len(old.nodes) else old.nodes
    futs: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
    with concurrent.futures.ThreadPoolExecutor(min(32, len(addresses))) as pool:
        for i, (control, _) in enumerate(addresses):
            if i == topo.node_index:
                futs[i] = pool.submit(check_node, p, job, step)
            else:
                futs[i] = pool.submit(_remote, p, control, job, step)
        nodes, unreachable = [], []
        for i, fut in futs.items():
            try:
                nodes.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - a node that cannot answer is reported
                logger.warning("job=%s step=%d: node %d did not answer verify: %s", job, step,
                               i, exc)
                unreachable.append({"node": i, "error": f"{type(exc).__name__}: {exc}"})
    sound = {(c["group"], c["stripe"], c["index"]) for n in nodes for c in n["pieces"] if c["ok"]}
    stripes = []
    for where, stripe in sorted(meta["stripes"].items()):
        group, s = (int(x) for x in where.split("/"))
        k = old.placement.groups[group].k
        total = len(stripe["pieces"])
        good = sum((group, s, int(i)) in sound for i in stripe["pieces"])
        stripes.append({"group": group, "stripe": s, "k": k, "total": total, "good": good})
    return {"job": job, "step": step, "superseded": any(n["superseded"] for n in nodes),
            "nodes": sorted(nodes, key=lambda n: n["node"]), "unreachable": unreachable,
            "stripes": stripes, "bytes": sum(n["bytes"] for n in nodes)}


def _check_ranks(store: Any, job: str, step: int, node: int = 0) -> dict[str, Any]:
    """The slot checks of this node's ranks (a node report without pieces yet)."""
    out: dict[str, Any] = {"node": node, "step": step, "superseded": False, "ranks": [],
                           "pieces": [], "bytes": 0}
    for rank in sorted(store.job(job).local_ranks):
        problem, nbytes = store.check_slot(job, rank, step)
        if problem == SUPERSEDED:
            out["superseded"] = True
            break
        out["ranks"].append({"rank": rank, "ok": problem is None, "error": problem or ""})
        out["bytes"] += nbytes
    return out


def _remote(p: "Protector", control: str, job: str, step: int) -> dict[str, Any]:
    reply = p._peer(control).VerifyLocal(ppb.VerifyLocalRequest(job=job, step=step),
                                         timeout=max(60.0, p.config.peer_timeout_s))
    return json.loads(reply.report)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The VerifyReply counters of a :func:`verify_job` report."""
    stripes = report["stripes"]
    return {
        "step": report["step"],
        "superseded": report["superseded"],
        "stripes": len(stripes),
        "stripes_degraded": sum(1 for s in stripes if s["k"] <= s["good"] < s["total"]),
        "stripes_lost": sum(1 for s in stripes if s["good"] < s["k"]),
        "bad_pieces": sum(1 for n in report["nodes"] for c in n["pieces"] if not c["ok"]),
        "bad_ranks": sum(1 for n in report["nodes"] for r in n["ranks"] if not r["ok"]),
        "unreachable_nodes": [u["node"] for u in report["unreachable"]],
        "bytes_checked": report["bytes"],
    }
