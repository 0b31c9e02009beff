"""The control plane at 64 to 10,000 nodes, simulated: the real roles, fake peers, no bulk bytes.

    python bench/sim_scale.py [--quick] [--nodes 64,256,1024,4096,10000] [--groups 4,8,16]
                              [--parities 1,2] [--latency-us 50] [--gbps 100] [--baseline REV]

One process holds every node. Each node has the daemon's real protection roles
(daemon/roles/: encoder, holder, group leader, root, follower, and the reporter that
routes reports), its real per-job ProtectionState and the real typed documents
(proto/meta.py); what is fake is what carries no control logic: the store (a job
record, no arenas), parity files and codecs (no bytes: every piece is announced with
its real size but carries no payload), step-metadata files (kept in memory, their
size counted), and the transport: a peer call is a direct call into the destination
node's role, its request and reply serialized with protobuf to count their bytes;
a data-plane push is a direct call of the destination's frame handler.

One step: every node's ``k`` data pieces are offered to their encoders (each stripe's
``k`` offers on ``k`` threads, since an offer waits for the stripe's other sources,
as in the daemon), then each source pushes its (empty) pieces; everything after that
-- stripes finished, parity forwarded, reports, group stored, commit, announcements,
followers keeping the metadata -- runs inline, the roles calling each other through
the fake transport.

Measured per step: control bytes sent+received per node (mean and the busiest node),
messages at the busiest node, CPU of the busiest node and of the root (exclusive time
in their roles' handlers), step-metadata bytes each node keeps, and the simulated time
from the last seal to "restorable everywhere": every message takes ``latency`` plus
its bytes over ``bandwidth``, following the causal chain (the simulated clock of a
handler is its message's arrival; an offer's reply leaves when the stripe's last
offer arrived).

``--baseline REV`` also runs the design at git revision REV (default: the last one
before group leaders: every report to node 0, the whole job's metadata announced to
every node) through the same harness, in a subprocess over that revision's code, so
the improvement is measured, not asserted. JSON: bench/results/sim_scale.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

JOB = "sim"
RANKS_PER_NODE = 8
#: Bytes per rank's slot in the layouts the sources send (a realistic order of size: it
#: shapes the pieces' sizes, which travel in the metadata; no payload is sent).
RANK_BYTES = 10 << 30
BASELINE_REV = "29258f7"

_now = threading.local()


def configure(ranks_per_node: int, rank_bytes: int) -> None:
    """The shape of every node's payload: ranks per node and each rank's slot size."""
    global RANKS_PER_NODE, RANK_BYTES
    RANKS_PER_NODE, RANK_BYTES = ranks_per_node, rank_bytes


def now() -> float:
    return getattr(_now, "t", 0.0)


def set_now(t: float) -> None:
    _now.t = t


@dataclass
class Tally:
    """Per-node counts for one step."""

    sent: int = 0
    received: int = 0
    messages: int = 0
    cpu_s: float = 0.0
    meta_bytes: int = 0
    restorable_at: float = 0.0


@dataclass
class Net:
    latency_s: float
    bytes_per_s: float
    tallies: dict[int, Tally] = field(default_factory=lambda: defaultdict(Tally))
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Each node handles its messages one after another: its clock never goes back.
    clocks: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def arrive(self, dst: int, t: float) -> float:
        with self.lock:
            t = self.clocks[dst] = max(t, self.clocks[dst])
        return t

    def account(self, src: int, dst: int, req: int, rep: int) -> None:
        with self.lock:
            self.tallies[src].sent += req
            self.tallies[src].received += rep
            self.tallies[src].messages += 1
            self.tallies[dst].received += req
            self.tallies[dst].sent += rep
            self.tallies[dst].messages += 1

    def transit(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class _Cpu:
    """Exclusive wall time of handler code, per node (a thread's stack of nodes)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.local = threading.local()

    @contextlib.contextmanager
    def on(self, node: int) -> Any:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        t = time.thread_time()
        if stack:
            parent, since = stack[-1]
            with self.net.lock:
                self.net.tallies[parent].cpu_s += t - since
        stack.append((node, t))
        try:
            yield
        finally:
            node_, since = stack.pop()
            t2 = time.thread_time()
            with self.net.lock:
                self.net.tallies[node_].cpu_s += t2 - since
            if stack:
                stack[-1] = (stack[-1][0], t2)


class InlineExecutor(concurrent.futures.Executor):
    """Runs work at once on the caller's thread, as an asynchronous task would run later: the
    caller's simulated clock is not advanced by it."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        t = now()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            fut.set_exception(exc)
        finally:
            set_now(t)
        return fut


class _NoMetrics:
    @contextlib.contextmanager
    def encoding(self, job: str, nbytes: int) -> Any:
        yield

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


@dataclass
class _Record:
    job: str
    world_size: int
    local_ranks: tuple[int, ...]
    topology: Any
    restorable_step: int | None = None
    previous_step: int | None = None


class FakeStore:
    """The store's answers the protection roles ask for; no arenas."""

    budget_bytes = 1 << 60

    def __init__(self, rec: _Record) -> None:
        self.rec = rec
        self.metrics = _NoMetrics()

    def job(self, job: str) -> _Record:
        return self.rec

    def latest(self, job: str) -> int | None:
        return self.rec.restorable_step

    def check_sealed(self, job: str, step: int) -> None:
        return None

    def mark_restorable(self, job: str, step: int) -> None:
        self.rec.previous_step, self.rec.restorable_step = self.rec.restorable_step, step


class FakePieces:
    def create(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return np.zeros(0, dtype=np.uint8)

    def scratch(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return np.zeros(0, dtype=np.uint8)

    def release_before(self, *args: Any) -> None:
        return None


class FakeCodecs:
    class _C:
        def encode_update(self, *args: Any, **kwargs: Any) -> None:
            return None

    def get(self, k: int, m: int) -> Any:
        return self._C()


class MemMetas:
    """Step metadata kept in memory; the size of what a node would write is counted."""

    def __init__(self, net: "Net", node: int) -> None:
        self.net, self.node = net, node
        self.meta: Any = None

    def save(self, meta: Any, holder: Any) -> None:
        self.net.tallies[self.node].meta_bytes = len(meta.encode())
        self.meta = meta

    def release_before(self, *args: Any) -> None:
        return None


class _NoStalls:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


# ------------------------------------------------------------------------- a world


class World:
    """N simulated nodes of one job, wired as the daemon wires them."""

    def __init__(self, n: int, group_size: int, parity: int, net: Net, ns: Any) -> None:
        self.ns, self.net = ns, net
        self.cpu = _Cpu(net)
        self.n = n
        addresses = tuple((f"10.0.{i // 250}.{i % 250}:1", f"10.0.{i // 250}.{i % 250}:2")
                          for i in range(n))
        self.by_control = {a[0]: i for i, a in enumerate(addresses)}
        self.by_data = {a[1]: i for i, a in enumerate(addresses)}
        self.nodes = [self._node(i, addresses, group_size, parity) for i in range(n)]
        self.placement = ns.placement_of(self.nodes[0].topo)

    def _node(self, i: int, addresses: Any, group_size: int, parity: int) -> Any:
        ns = self.ns
        topo = ns.Topology(addresses, i, group_size, parity)
        store = FakeStore(_Record(JOB, self.n * RANKS_PER_NODE,
                                  tuple(range(i * RANKS_PER_NODE, (i + 1) * RANKS_PER_NODE)),
                                  topo))
        state = ns.ProtectionState()
        pool = InlineExecutor()
        peers = FakePeers(self, i)
        plane = FakePlane(self, i)
        node = ns.build_roles(store, state, FakePieces(), FakeCodecs(), plane, peers, pool,
                              MemMetas(self.net, i), _NoStalls())
        node.topo, node.index = topo, i
        return node


class FakePeers:
    """``stub(control)``: the destination node's roles, each call serialized and counted."""

    def __init__(self, world: World, me: int) -> None:
        self.world, self.me = world, me

    def stub(self, control: str) -> Any:
        return _Stub(self.world, self.me, self.world.by_control[control])


class _Stub:
    def __init__(self, world: World, src: int, dst: int) -> None:
        self.world, self.src, self.dst = world, src, dst

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(request: Any, timeout: float | None = None) -> Any:
            w = self.world
            req = len(request.SerializeToString())
            t0 = now()
            set_now(w.net.arrive(self.dst, t0 + w.net.transit(req)))
            with w.cpu.on(self.dst):
                reply = w.ns.handle(w.nodes[self.dst], method, request)
            rep = len(reply.SerializeToString())
            w.net.account(self.src, self.dst, req, rep)
            set_now(now() + w.net.transit(rep))
            return reply

        return call


class FakePlane:
    """Pushes a piece's (empty) frame straight into the destination's handler."""

    address = "sim"

    def __init__(self, world: World, me: int) -> None:
        self.world, self.me = world, me

    def push(self, address: str, kind: bytes, header: dict[str, Any], buffers: Any,
             on_frame: Any = None, delivered: Any = None) -> None:
        w = self.world
        dst = w.by_data[address]
        t0 = now()
        set_now(w.net.arrive(dst, t0 + w.net.transit(0)))
        with w.cpu.on(dst):
            handler = w.nodes[dst].encoder.on_data if kind == b"data" else \
                w.nodes[dst].holder.on_parity
            try:
                handler({**header, "off": 0, "n": 0}, memoryview(b""))
            except w.ns.InvalidRequestError:
                pass  # the data plane refuses (and logs) it; the sender does not hear back
        set_now(t0)
        if delivered is not None:
            delivered()


# --------------------------------------------------------------------- one step


def one_step(world: World, step: int) -> None:
    """Every node's pieces offered and pushed; the rest runs inline through the roles."""
    ns, pl = world.ns, world.placement
    layouts = {i: ns.layout(i, step) for i in range(world.n)}
    ready: dict[tuple[int, int], float] = {}
    seals: dict[tuple[int, int, int], int] = {}  # what each offer's data frames carry
    for grp in pl.groups:
        for stripe in range(grp.g):
            sources = grp.data_sources(stripe)
            encoder = grp.nodes[grp.encoder(stripe)]
            arrivals: list[float] = []

            def offer(q: int, pos: int) -> None:
                src = grp.nodes[pos]
                lay = layouts[src]
                req = ns.offer_request(JOB, step, grp, stripe, q, world.nodes[src], lay)
                seals[(grp.group, stripe, q)] = ns.seal_token(req.layout)
                set_now(0.0)
                size = len(req.SerializeToString())
                arrivals.append(world.net.transit(size))
                with world.cpu.on(encoder):
                    reply = world.nodes[encoder].encoder.offer(req)
                world.net.account(src, encoder, size, len(reply.to_bytes(8, "little")))

            threads = [threading.Thread(target=offer, args=(q, pos))
                       for q, pos in enumerate(sources)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ready[(grp.group, stripe)] = max(arrivals) + world.net.transit(8)
    for grp in pl.groups:
        for stripe in range(grp.g):
            for q, pos in enumerate(grp.data_sources(stripe)):
                src = grp.nodes[pos]
                set_now(ready[(grp.group, stripe)])
                node = world.nodes[src]
                encoder = world.nodes[grp.nodes[grp.encoder(stripe)]]
                with world.cpu.on(src):
                    node.plane.push(encoder.topo.me[1], b"data",
                                    {"job": JOB, "step": step, "group": grp.group,
                                     "stripe": stripe, "index": q,
                                     "seal": seals[(grp.group, stripe, q)]},
                                    [memoryview(b"")])


def run(ns: Any, n: int, g: int, m: int, latency_us: float, gbps: float, steps: int
        ) -> dict[str, Any]:
    net = Net(latency_us * 1e-6, gbps * 1e9 / 8)
    world = World(n, g, m, net, ns)
    one_step(world, 0)  # warm up (first parity buffers, caches)
    rows = []
    for step in range(1, steps + 1):
        net.tallies.clear()
        net.clocks.clear()
        for i in range(n):  # the metas saved by the warm-up step are not this step's
            net.tallies[i]
        ns.mark_time(world, lambda i, t: None)
        # One heap holds every node here: a collection of it would be charged to whichever
        # handler it interrupts, a cost no daemon (with its own small heap) pays.
        gc.collect()
        gc.disable()
        try:
            one_step(world, step)
        finally:
            gc.enable()
        t = {i: net.tallies[i] for i in range(n)}
        done = ns.restorable_everywhere(world, step)
        per_node = [x.sent + x.received for x in t.values()]
        busiest = max(t.values(), key=lambda x: x.messages)
        rows.append({
            "control_bytes_per_node_mean": statistics.mean(per_node),
            "control_bytes_per_node_max": max(per_node),
            "messages_busiest": busiest.messages,
            "cpu_busiest_ms": max(x.cpu_s for x in t.values()) * 1e3,
            "cpu_root_ms": t[0].cpu_s * 1e3,
            "meta_bytes_per_node_max": max(x.meta_bytes for x in t.values()),
            "restorable": done,
            "sim_time_to_restorable_ms": ns.last_restorable_time(world) * 1e3,
        })
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "restorable"}
    out["restorable"] = all(r["restorable"] for r in rows)
    out.update(nodes=n, group_size=g, parity=m, latency_us=latency_us, gbps=gbps)
    return out


# ------------------------------------------------------------- the design here


def current_design() -> Any:
    """The roles of this tree, wired as daemon/service/wiring.py wires them."""
    from types import SimpleNamespace

    from shardguard.daemon.coding.placement import placement_of
    from shardguard.daemon.errors import InvalidRequestError
    from shardguard.daemon.roles.encoder import Encoder
    from shardguard.daemon.roles.follower import Follower
    from shardguard.daemon.roles.holder import Holder
    from shardguard.daemon.roles.leader import GroupLeader, Reporter
    from shardguard.daemon.roles.root import Root
    from shardguard.daemon.roles.state import ProtectionState
    from shardguard.daemon.service.wiring import _local_reports
    from shardguard.daemon.transport.delivery import Delivery
    from shardguard.proto import peer_pb2 as ppb
    from shardguard.proto.arena import SlotDesc, SlotState
    from shardguard.proto.meta import (NodeLayout, RankEntry, StepMeta, Topology,
                                       decode_report, seal_token)

    restored_at: dict[int, float] = {}

    def build_roles(store, state, pieces, codecs, plane, peers, pool, metas, stalls):
        reporter = Reporter(peers, 10.0)
        leader = GroupLeader(store, state, peers, reporter, pool, 10.0)
        root = Root(store, state, peers, pool, 10.0)
        follower = Follower(store, state, metas, pieces, stalls)
        me = store.rec.topology.node_index

        def announce(job, step, meta, _f=follower.announce):
            _f(job, step, meta)
            restored_at[me] = now()

        leader.announce_here = announce
        root.commit_here = leader.commit
        reporter.local = _local_reports(leader, root)
        delivery = Delivery(peers, 10.0, stalls)
        encoder = Encoder(store, state, pieces, codecs, plane, delivery, reporter, pool,
                          stalls, 10.0)
        holder = Holder(store, state, pieces, reporter, pool, stalls)
        return SimpleNamespace(encoder=encoder, holder=holder, leader=leader, root=root,
                               follower=follower, reporter=reporter, plane=plane,
                               announce=announce)

    def handle(node, method, req):
        if method == "Report":
            node.reporter.local(req.job, req.step, req.node, decode_report(req.report))
            return ppb.ReportReply()
        if method == "Commit":
            node.leader.commit(req.job, req.step, req.tier)
            return ppb.CommitReply()
        if method == "Announce":
            node.announce(req.job, req.step, StepMeta.decode(req.meta, req.job, req.step))
            return ppb.AnnounceReply()
        if method == "Received":
            return ppb.ReceivedReply(got=req.want)
        raise NotImplementedError(method)

    def layout(i, step):
        ranks = tuple(RankEntry(r, (r % RANKS_PER_NODE) * RANK_BYTES, RANK_BYTES, RANK_BYTES,
                                SlotDesc(SlotState.SEALED, step, RANK_BYTES - 4096,
                                         RANK_BYTES - 4096, 4096, 0xDEADBEEF, 0xFEEDF00D,
                                         step + 1))
                      for r in range(i * RANKS_PER_NODE, (i + 1) * RANKS_PER_NODE))
        return NodeLayout(RANKS_PER_NODE * RANK_BYTES, 0, ranks)

    def offer_request(job, step, grp, stripe, q, node, lay):
        plen = -(-lay.bytes // grp.k) // 4096 * 4096 + 4096
        lay = NodeLayout(lay.bytes, plen, lay.ranks)
        return ppb.OfferRequest(job=job, step=step, stripe=stripe, group=grp.group, index=q,
                                node=node.topo.node_index, piece_bytes=0, real_bytes=0,
                                crc=0, layout=lay.encode(), topology=node.topo.describe())

    def mark_time(world, fn):
        restored_at.clear()

    def restorable_everywhere(world, step):
        return all(nd.follower.store.rec.restorable_step == step for nd in world.nodes)

    def last_restorable_time(world):
        return max(restored_at.values()) if restored_at else float("nan")

    return SimpleNamespace(Topology=Topology, ProtectionState=ProtectionState,
                           InvalidRequestError=InvalidRequestError,
                           placement_of=placement_of, build_roles=build_roles, handle=handle,
                           layout=layout, offer_request=offer_request, mark_time=mark_time,
                           restorable_everywhere=restorable_everywhere,
                           last_restorable_time=last_restorable_time, seal_token=seal_token)


# ---------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    from _common import load_average, print_rows, write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--nodes", default=None)
    p.add_argument("--groups", default="4,8,16")
    p.add_argument("--parities", default="1,2")
    p.add_argument("--latency-us", type=float, default=50.0)
    p.add_argument("--gbps", type=float, default=100.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ranks-per-node", type=int, default=RANKS_PER_NODE)
    p.add_argument("--rank-bytes", type=int, default=RANK_BYTES,
                   help="the size of each rank's slot the layouts describe (no bytes are sent)")
    p.add_argument("--configs", default=None,
                   help="group_size:parity pairs, e.g. 4:1,8:1,16:1,8:2 (instead of the grid)")
    p.add_argument("--baseline", default=BASELINE_REV,
                   help="git revision of the design to compare with ('' to skip)")
    p.add_argument("--baseline-max-nodes", type=int, default=1024,
                   help="the baseline's whole-job metadata to every node is O(N^2) to "
                        "simulate: larger sizes are left out of its rows")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="sim_scale", help="bench/results/<out>.json")
    args = p.parse_args(argv)
    configure(args.ranks_per_node, args.rank_bytes)
    nodes = [int(x) for x in (args.nodes or ("64,256" if args.quick else
                                            "64,256,1024,4096,10000")).split(",")]
    groups = [int(x) for x in ("8" if args.quick else args.groups).split(",")]
    parities = [int(x) for x in ("1" if args.quick else args.parities).split(",")]
    steps = args.steps or (1 if args.quick else 2)
    pairs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")] \
        if args.configs else [(g, m) for g in groups for m in parities]
    ns = current_design()
    rows = []
    load0 = load_average()
    for n in nodes:
        for g, m in pairs:
            if True:
                if m >= g or g > n:
                    continue
                r = run(ns, n, g, m, args.latency_us, args.gbps, steps)
                r["design"] = "group leaders"
                rows.append(r)
                if not args.json_only:
                    print(f"  {n} nodes g={g} m={m}: {r['control_bytes_per_node_mean']:.0f} B/node, "
                          f"busiest {r['messages_busiest']:.0f} msgs, root CPU "
                          f"{r['cpu_root_ms']:.1f} ms", flush=True)
    if args.json_only:
        print(json.dumps(rows))
        return 0
    small = [n for n in nodes if n <= args.baseline_max_nodes]
    base = baseline(args, small, pairs, steps) if args.baseline and small else []
    all_rows = base + rows
    print_rows(all_rows, [
        ("design", "design", "{}"), ("nodes", "nodes", "{}"), ("group_size", "g", "{}"),
        ("parity", "m", "{}"),
        ("control_bytes_per_node_mean", "ctl B/node", "{:.0f}"),
        ("control_bytes_per_node_max", "max B/node", "{:.0f}"),
        ("messages_busiest", "msgs busiest", "{:.0f}"),
        ("cpu_root_ms", "root CPU ms", "{:.1f}"),
        ("cpu_busiest_ms", "busiest CPU ms", "{:.1f}"),
        ("meta_bytes_per_node_max", "meta B/node", "{:.0f}"),
        ("sim_time_to_restorable_ms", "seal->restorable ms", "{:.2f}")],
        title=f"control plane per step ({steps} step(s) measured; latency "
              f"{args.latency_us:.0f} µs, {args.gbps:.0f} Gb/s per node; CPU in ms: "
              f"thread CPU time of the roles' handlers, exclusive of the calls they make)")
    print(f"load average start {load0} end {load_average()}")
    write_results(args.out, {"rows": all_rows, "steps": steps,
                             "ranks_per_node": RANKS_PER_NODE, "rank_bytes": RANK_BYTES,
                                "latency_us": args.latency_us, "gbps": args.gbps,
                                "baseline_rev": args.baseline,
                                "load_average": {"start": load0, "end": load_average()}})
    return 0


def baseline(args: Any, nodes: list[int], pairs: list[tuple[int, int]],
             steps: int) -> list[dict[str, Any]]:
    """The same measurements of the design at ``args.baseline``, in a subprocess over a
    checkout of that revision (bench/_sim_baseline.py adapts the harness to its roles)."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", tmp,
                        args.baseline], check=True, capture_output=True)
        try:
            pkg = Path(tmp) / "_pkg" / "shardguard"
            pkg.mkdir(parents=True)
            for d in ("proto", "daemon"):
                (pkg / d).symlink_to(Path(tmp) / d)
            for f in (repo / "proto").glob("*_pb2*.py"):  # generated: this tree's contracts
                (Path(tmp) / "proto" / f.name).write_bytes(f.read_bytes())
            env = {**os.environ, "PYTHONPATH": f"{pkg.parent}", "SIM_BASELINE": "1"}
            out = subprocess.run(
                [sys.executable, "-S", "-c",
                 "import sys, site; sys.path.insert(0, sys.argv[1]); "
                 "[site.addsitedir(p) for p in sys.argv[2:3]]; "
                 "import runpy; sys.argv = sys.argv[3:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')",
                 str(pkg.parent), _site_packages(), str(Path(__file__).with_name(
                     "_sim_baseline.py")),
                 "--nodes", ",".join(map(str, nodes)),
                 "--ranks-per-node", str(RANKS_PER_NODE), "--rank-bytes", str(RANK_BYTES),
                 "--configs", ",".join(f"{g}:{m}" for g, m in pairs), "--steps", str(steps),
                 "--latency-us", str(args.latency_us), "--gbps", str(args.gbps)],
                env=env, check=True, capture_output=True, text=True)
            rows = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", tmp],
                           capture_output=True)
    for r in rows:
        r["design"] = f"baseline {args.baseline}"
    return rows


def _site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


if __name__ == "__main__":
    sys.exit(main())
