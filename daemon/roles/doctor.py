"""``shardguard doctor``: what would stall protection on this node and across a job, in words.

Run by the node's daemon (the Agent's ``Doctor`` call): it sees its own
directories, budget and cgroup, and reaches the job's peers the way protection
does (the peer gRPC service for their facts, the data plane for their data
port). Every check gives ``ok``, ``warn`` or ``fail`` with a sentence an
operator can act on; nothing is changed.

Checks: the socket and shm directories (owner, mode); the memory budget
against the host and the cgroup; for each multi-node job the peers it works
with (its group and the coordinator): both ports answer, the clocks agree
within the token window, the default code, peer secret and TLS match, and the
job's node list and code match; the stall cause each job has now.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from shardguard.daemon.base import cgroup
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding.placement import peers_of
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.auth import WINDOW_S
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto import safefile
from shardguard.proto.errors import ShardguardError
from shardguard.proto.meta import Topology

OK, WARN, FAIL = "ok", "warn", "fail"
#: Clocks further apart than this share of the token window are a warning.
CLOCK_WARN_SHARE = 0.25


@dataclass(frozen=True)
class Finding:
    check: str
    level: str
    detail: str
    where: str = ""


@dataclass(frozen=True)
class Reach:
    """How this daemon reaches its peers, and what it says of itself to them."""

    peers: PeerClients
    ping: Callable[[str, float], bool]  # the data plane's ping
    fingerprint: str
    tls: bool
    defaults: tuple[int, int]
    timeout_s: float


def examine(store: Store, stalls: Stalls, reach: Reach | None, socket_path: str,
            budget_why: str, job: str = "") -> list[Finding]:
    """Every finding for this node and (``job``, or every job here) its peers."""
    out = _directories(socket_path, store.shm_dir)
    out += _budget(store.budget_bytes, budget_why)
    jobs = [store.job(job)] if job else store.jobs()
    for rec in jobs:
        if rec.topology is not None and reach is not None:
            out += _peers(reach, rec.job, rec.topology)
        stall = stalls.get(rec.job)
        if stall is not None:
            level = WARN if stall.cause.value == "too_slow" else FAIL
            out.append(Finding("stall", level, f"job {rec.job}: protection stalled "
                                               f"({stall.cause.value}) since "
                                               f"{time.time() - stall.since:.0f}s: "
                                               f"{stall.detail}"))
        else:
            out.append(Finding("stall", OK, f"job {rec.job}: no stall"))
    return out


def _directories(socket_path: str, shm_dir: str) -> list[Finding]:
    out = []
    for what, path in (("socket directory", os.path.dirname(os.path.abspath(socket_path))),
                       ("shm directory", shm_dir)):
        try:
            safefile.check_dir(path)
            st = os.stat(path)
            out.append(Finding("directories", OK, f"{what} {path}: owner "
                                                  f"{safefile.owner(st.st_uid)}, mode "
                                                  f"{stat.S_IMODE(st.st_mode):o}"))
        except (ShardguardError, OSError) as exc:
            out.append(Finding("directories", FAIL, f"{what} {path}: {exc}"))
    return out


def _budget(budget: int, why: str) -> list[Finding]:
    room = cgroup.memory_room()
    host = psutil.virtual_memory().available
    limit = min(host, room.room_bytes) if room is not None else host
    text = f"budget {budget / 2**30:.2f} GiB ({why})"
    if budget > limit:
        where = f"cgroup {room.where}" if room is not None and room.room_bytes < host else "host"
        return [Finding("budget", FAIL, f"{text} is more than the {where} leaves "
                                        f"({limit / 2**30:.2f} GiB): the OOM killer would take "
                                        f"the daemon first; lower memory_budget_bytes")]
    return [Finding("budget", OK, text)]


def _peers(reach: Reach, job: str, topo: Topology) -> list[Finding]:
    mine = topo.describe()
    addresses = peers_of(topo)
    if not addresses:
        return []

    def ask(control: str, data: str) -> tuple[Any, float, float, bool, str]:
        t0 = time.time()
        facts, err = None, ""
        try:
            facts = reach.peers.stub(control).Facts(ppb.FactsRequest(job=job),
                                                    timeout=reach.timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported as a finding
            err = f"{type(exc).__name__}: {exc}"
        t1 = time.time()
        return facts, t0, t1, reach.ping(data, min(3.0, reach.timeout_s)), err

    out: list[Finding] = []
    with concurrent.futures.ThreadPoolExecutor(min(16, len(addresses))) as pool:
        answers = {a: pool.submit(ask, *a) for a in addresses}
    here = (reach.defaults, reach.fingerprint, reach.tls)
    for (control, data), fut in answers.items():
        facts, t0, t1, data_up, err = fut.result()
        where = control
        if facts is None:
            cause = "clock" if "clocks disagree" in err else "ports"
            out.append(Finding(cause, FAIL, f"job {job}: control port {control} does not answer "
                                            f"({err})", where))
        else:
            out.append(Finding("ports", OK, f"job {job}: control port {control} answers",
                               where))
            skew = facts.time_unix - (t0 + t1) / 2
            level = FAIL if abs(skew) > WINDOW_S else (
                WARN if abs(skew) > CLOCK_WARN_SHARE * WINDOW_S else OK)
            out.append(Finding("clock", level, f"clock {skew:+.1f}s from this node's "
                                               f"(peer tokens accepted within {WINDOW_S:.0f}s)"
                                               + ("" if level == OK else ": fix NTP/chrony"),
                               where))
            theirs = ((facts.default_group_size, facts.default_parity),
                      facts.secret_fingerprint, facts.peer_tls)
            diffs = [name for name, a, b in zip(("default code (group_size, parity)",
                                                 "peer secret", "peer TLS"), here, theirs)
                     if a != b]
            out.append(Finding("config", FAIL if diffs else OK,
                               ("differs from this node in " + ", ".join(diffs)) if diffs
                               else "default code, peer secret and TLS match", where))
            if facts.topology and facts.topology != mine:
                out.append(Finding("config", FAIL, f"job {job}: protected there as "
                                                   f"{facts.topology}, here as {mine}", where))
        out.append(Finding("ports", OK if data_up else FAIL,
                           f"job {job}: data port {data} "
                           + ("answers" if data_up else "does not answer (firewall? ZeroMQ "
                                                        "port blocked?)"), data))
    return out


def facts(store: Store, reach: Reach, job: str, version: str) -> ppb.FactsReply:
    """What this node says of itself to a peer's doctor."""
    reply = ppb.FactsReply(time_unix=time.time(), default_group_size=reach.defaults[0],
                           default_parity=reach.defaults[1], secret_fingerprint=reach.fingerprint,
                           peer_tls=reach.tls, version=version)
    try:
        topo = store.job(job).topology if job else None
    except ShardguardError:
        topo = None
    if topo is not None:
        reply.topology = topo.describe()
    return reply
