"""Who a rank is at connect: its job's name, its rank and world, the gloo group the ranks
agree on, and its node among the job's nodes, gathered from every rank's daemon, with
what must match across the nodes checked on every rank alike."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.distributed as dist

from shardguard.client.agreement import all_gather
from shardguard.client.session import ask
from shardguard.proto import agent_pb2 as pb
from shardguard.proto.errors import ClockSkewError, ConfigMismatchError, JobNameError

logger = logging.getLogger(__name__)

JOB_ENV = "SHARDGUARD_JOB"

#: The run id torchrun uses when ``--rdzv-id`` is not given (c10d, etcd rendezvous): every
#: such launch shares it, so two unrelated runs would share one job and the second would
#: resume the first. It never names a job.
TORCHRUN_DEFAULT_RUN_ID = "none"

#: Clocks further apart than this share of the token window get a warning at connect.
CLOCK_WARN_SHARE = 0.25


def detect_job() -> str:
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


def detect_rank_world() -> tuple[int, int]:
    """torch.distributed's rank and world size, else ``$RANK``/``$WORLD_SIZE``, else 0/1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


_shared_group: Any = None


def control_group(*, shared: bool = False) -> Any:
    """A gloo group of every rank for the agreements: the default group if it is gloo, else
    a new gloo group (with ``shared``, one made once per process); None for a rank alone."""
    global _shared_group
    if not _several_ranks():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if not shared:
        return dist.new_group(backend="gloo")
    if _shared_group is None:
        _shared_group = dist.new_group(backend="gloo")
    return _shared_group


def new_gloo_group() -> Any:
    """A new gloo group of every rank, whatever the default group is (None: a rank alone)."""
    return dist.new_group(backend="gloo") if _several_ranks() else None


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class DaemonFacts:
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
    epoch: int = 0  # the job's launch on this daemon (0: it holds no such job)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.host, self.socket, self.control, self.data


class Membership(NamedTuple):
    """A rank's node in its job, and the job's erasure code."""

    local_ranks: list[int]
    nodes: list[tuple[str, str]]  # the job's nodes (control, data); [] for one node
    node_index: int
    code: tuple[int, int]  # (group_size, parity)
    #: The launch (multi-node jobs): one more than any of the job's daemons held.
    epoch: int = 0


def membership(group: Any, socket_path: str, rank: int, timeout_s: float,
               code: tuple[int, int] = (0, 0), job: str = "") -> Membership:
    """This rank's node: its local ranks, the job's node list, its node index, and the
    job's (group_size, parity).

    Nodes are the distinct daemons (same host and socket), in the order of their
    first rank; each daemon's peer addresses come from its own Status. What must
    match across the nodes is checked here, on every rank alike (the same gathered
    facts): the erasure code (``code``, 0 for the daemons' defaults, which must then
    agree), the peer secret, peer TLS and the clocks (ConfigMismatchError,
    ClockSkewError). The code is then passed explicitly at register, so every
    daemon protects the job the same way whatever its own defaults.

    The launch number (``epoch``) is one more than the highest any daemon holds for
    ``job``: every rank computes the same from the same gathered facts, and a daemon's
    pieces of this launch are then never taken together with an older launch's still
    in flight (daemon/roles/encoder.py).
    """
    if group is None:
        return Membership([rank], [], 0, code)
    st = ask(socket_path, "Status", pb.StatusRequest(), timeout_s)
    me = DaemonFacts(socket.gethostname(), os.path.realpath(socket_path), st.address.control,
                     st.address.data, st.default_group_size, st.default_parity,
                     st.secret_fingerprint, st.peer_tls, st.time_unix, st.token_window_s,
                     max((j.epoch for j in st.jobs if j.job == job), default=0))
    everyone = all_gather(me, group)
    daemons: dict[tuple[str, ...], DaemonFacts] = {}
    for who in everyone:
        daemons.setdefault(who.key, who)
    local = [r for r, who in enumerate(everyone) if who.key == me.key]
    if len(daemons) == 1:
        return Membership(local, [], 0, code)
    nodes = list(daemons.values())
    code = check_nodes(nodes, code)
    return Membership(local, [(d.control, d.data) for d in nodes], list(daemons).index(me.key),
                      code, max(d.epoch for d in nodes) + 1)


def check_nodes(nodes: list[DaemonFacts], code: tuple[int, int]) -> tuple[int, int]:
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
    _check_clocks(nodes)
    return group_size, parity


def _check_clocks(nodes: list[DaemonFacts]) -> None:
    window = min((d.window_s for d in nodes if d.window_s), default=0.0)
    if not window:
        return
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
