"""The roles of a node, built and wired together once: the composition root of the daemon.

Nothing here decides anything: it makes each role with what it needs (the store,
the per-job protection state, step metadata and piece files, the peer clients and the
data plane), points the store's hooks at the roles, gives the data plane its table of
handlers, and hooks the persistent tier onto the root and the follower from
above (the protection roles know nothing of the tier).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

import zmq

from shardguard.daemon.base.config import Config
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding.codec import Codecs
from shardguard.daemon.errors import ConfigError, InvalidRequestError
from shardguard.daemon.roles.catchup import CatchUp
from shardguard.daemon.roles.leader import GroupLeader, Reporter
from shardguard.daemon.roles.doctor import Reach
from shardguard.daemon.roles.drop import Dropper
from shardguard.daemon.roles.encoder import Encoder
from shardguard.daemon.roles.exit_flush import ExitFlush
from shardguard.daemon.roles.follower import Follower
from shardguard.daemon.roles.holder import Holder
from shardguard.daemon.roles.rebuild import Rebuilder
from shardguard.daemon.roles.root import Root
from shardguard.daemon.roles.serve import PieceReader
from shardguard.daemon.roles.source import Source
from shardguard.daemon.roles.state import ProtectionState
from shardguard.daemon.roles.tier import Tier
from shardguard.daemon.roles.verify import Verifier
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.auth import Authenticator, read_secret, tls_files
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.daemon.transport.delivery import Delivery
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto.meta import (
    FlushedReport,
    GroupReport,
    ParityReport,
    Report,
    StepMeta,
    StripeReport,
    Topology,
)


@dataclass
class Roles:
    """Every role of a node that protects multi-node jobs, and what they share."""

    config: Config
    store: Store
    stalls: Stalls
    state: ProtectionState
    metas: StepMetas
    pieces: PieceFiles
    auth: Authenticator
    tls: tuple[bytes, bytes, bytes] | None
    peers: PeerClients
    plane: DataPlane
    codecs: Codecs
    pool: concurrent.futures.ThreadPoolExecutor
    source: Source
    encoder: Encoder
    holder: Holder
    leader: GroupLeader
    root: Root
    reporter: Reporter
    follower: Follower
    reader: PieceReader
    catchup: CatchUp
    dropper: Dropper
    verifier: Verifier
    reach: Reach
    #: The newest step saved on the way down (None: no tier, or tier_on_exit is off).
    exit_flush: ExitFlush | None = None

    def close(self) -> None:
        if self.exit_flush is not None:
            self.exit_flush.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.plane.close()
        self.peers.close()
        self.codecs.close()


class _Dispatch:
    """The data plane's table of handlers, by message kind (filled once the roles exist)."""

    def __init__(self) -> None:
        self.table: dict[bytes, Any] = {}

    def __call__(self, kind: bytes, header: dict[str, Any], payload: memoryview | None) -> Any:
        fn = self.table.get(kind)
        if fn is None:
            raise InvalidRequestError(f"unknown message kind {kind!r}")
        return fn(header, payload)


def build(config: Config, store: Store, stalls: Stalls, tier: Tier | None) -> Roles:
    """Make and wire a node's roles; the data plane listens from here on."""
    timeout = config.peer_timeout_s
    auth = Authenticator(read_secret(config.secret_file) if config.secret_file else None)
    tls = tls_files(config)
    dispatch = _Dispatch()
    try:
        plane = DataPlane(config.host, config.data_port, dispatch, timeout, auth)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.data_port} "
                          f"(host, data_port): {exc}") from None
    pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="sg-protect")
    state, metas = ProtectionState(), StepMetas(config.shm_dir, config.shm_prefix)
    metas.load_all()
    pieces, peers, codecs = PieceFiles(config.shm_dir, config.shm_prefix), \
        PeerClients(auth, tls), Codecs()
    delivery = Delivery(peers, timeout, stalls)
    reporter = Reporter(peers, timeout)
    leader = GroupLeader(store, state, peers, reporter, pool, timeout)
    root = Root(store, state, peers, pool, timeout)
    follower = Follower(store, state, metas, pieces, stalls)
    leader.announce_here = follower.announce
    root.commit_here = leader.commit
    reporter.local = _local_reports(leader, root)
    reader = PieceReader(store, pieces, metas, store.metrics)

    def rebuilder(topo: Topology) -> Rebuilder:
        return Rebuilder(store, metas, pieces, reader, peers, plane, codecs, pool, timeout, topo)

    encoder = Encoder(store, state, pieces, codecs, plane, delivery, reporter, pool, stalls,
                      timeout)
    holder = Holder(store, state, pieces, reporter, pool, stalls)
    roles = Roles(
        config, store, stalls, state, metas, pieces, auth, tls, peers, plane, codecs, pool,
        Source(store, peers, plane, delivery, pool, stalls, timeout), encoder, holder,
        leader, root, reporter, follower, reader,
        CatchUp(store, state, metas, stalls, rebuilder),
        Dropper(store, state, metas, pieces, stalls, peers, pool, timeout),
        Verifier(store, metas, reader, pieces, peers, stalls, timeout),
        Reach(peers, plane.ping, auth.fingerprint(), tls is not None,
              (config.group_size, config.parity), timeout))
    dispatch.table.update({
        b"data": encoder.on_data, b"parity": holder.on_parity,
        b"fetch": lambda header, _: reader.serve_fetch(header),
        b"ping": lambda header, _: [[b"pong", b"{}"]]})
    store.on_node_sealed = roles.source.on_node_sealed
    store.on_roll_back = metas.roll_back
    if tier is not None:
        _hook_tier(roles, tier)
        if config.tier_on_exit:
            roles.exit_flush = ExitFlush(store, tier, peers, reporter, timeout)
            roles.exit_flush.start()
    return roles


def _local_reports(leader: GroupLeader, root: Root) -> Any:
    """Where a report to this node goes: a stripe or parity report to its group's leader
    role, a group or flush report to its root role."""
    def take(job: str, step: int, node: int, report: Report) -> None:
        if isinstance(report, (StripeReport, ParityReport)):
            leader.report(job, step, report)
        elif isinstance(report, GroupReport):
            root.group_stored(job, step, report.group, report.epoch)
        elif isinstance(report, FlushedReport):
            root.flushed(job, step, node, report)

    return take


def _hook_tier(roles: Roles, tier: Tier) -> None:
    """The persistent tier, from above: it claims completed steps at the root, flushes
    restorable ones on every node, and takes the nodes' flush reports."""
    roles.root.claim = tier.claim
    roles.root.on_flushed = tier.flushed
    roles.dropper.on_drop = tier.forget

    def on_restorable(job: str, step: int, meta: StepMeta) -> None:
        tier.prepare(job)  # its staging buffer, ahead of the first flush
        topo = roles.store.job(job).topology
        if meta.tier and topo is not None:
            tier.flush(job, step, meta.tier, topo.node_index,
                       lambda r: roles.reporter.send(job, step, topo, r))

    roles.follower.on_restorable = on_restorable

