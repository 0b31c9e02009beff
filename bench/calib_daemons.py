"""Many real daemons on this machine: the control plane's cost per step, to calibrate the simulator.

For each job size (16, 32 and 64 nodes; ``--quick``: 16) a local cluster
(``shardguard.daemon.service.cluster``: real daemons, each with its own socket, ports and
shared-memory prefix, peers authenticated) runs one rank per node, with a tiny state
(``--state-kib``, 4 KiB by default), so that what is measured is the control plane and
not the bytes. The ranks are threads of this process, each a real
:class:`~shardguard.client.client.Client` built with the node list and its node index
(as ``tests/integration/_ranks.py`` does; no collective is needed because this process
is the barrier). Every step each rank snapshots, waits for its seal, then for the step
to be restorable on its node.

Measured per step, medians over ``--steps`` timed steps after ``--warmup`` untimed ones
(the first sizes the arenas):

- ``restorable_latency_s``: from the last rank's seal to the last node marking the step
  restorable (as the ranks see it: the client polls its arena's header every 5 ms);
  ``step_s``: from the first ``snapshot()`` call to that moment;
- ``daemon_cpu_s_per_step``: CPU seconds (user + system) of all daemons together over
  the step, and of the busiest daemon; ``harness_cpu_s_per_step``: this process's (the
  ranks' clients), which shares the cores with the daemons;
- ``rpc_per_step_per_node``: gRPC calls between daemons (the Peer service) handled per
  node and step, from the daemons' own Prometheus counters
  (``shardguard_rpc_requests_total``; each daemon runs with ``SHARDGUARD_METRICS_PORT=0``),
  and at the busiest node; by method too; the trainer-facing calls (Agent service)
  apart;
- ``control_bytes_per_step_per_node``: TCP payload bytes on the daemons' peer gRPC
  connections per node and step, sent plus received (``control_sent_*`` and
  ``control_received_*`` apart), the mean over nodes and at the busiest node, from
  the kernel's per-socket counters (``ss -tinp``, connections on the daemons' control
  ports): HTTP/2 framing, tokens and all; ``data_sent_bytes_*``: the data plane's, from
  the daemons' counters;
- ``meta_bytes_stored_per_node``: the step-metadata files each node keeps in its
  shared-memory directory after the last step (``<prefix>.<job>.x<step>``);
- before the steps, ``--idle-s`` seconds with nothing to do give each figure's idle rate
  (the peer probe every 5 s, the metrics threads); ``*_net`` figures subtract it.

The daemons share this machine's cores with the ranks and with whatever else runs: the
load average is stored before and after each size. Daemons start with their
default memory budget as ``cluster.up`` sets it (a cap, not an allocation: the arenas
are sized to the tiny states). Everything is torn down (``cluster.down``, scratch
directory removed) after each size, on an error, on Ctrl-C and on SIGTERM.

Usage: ``python bench/calib_daemons.py [--quick] [--sizes 16,32,64] [--group-size 4]
[--parity 1] [--steps N] [--warmup N] [--state-kib K] [--idle-s S]``
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from typing import Any

import grpc
import psutil
import torch
from _common import base_parser, load_average, print_rows, raise_interrupt, write_results
from prometheus_client.parser import text_string_to_metric_families

from shardguard.client.client import Client
from shardguard.daemon.service import cluster
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target

SIZES = (16, 32, 64)
QUICK_SIZES = (16,)
JOB = "calib"
# Generous: 64 daemons on 2 shared cores are slow, and a step that is not restorable by
# then never will be (see the daemons' logs, kept on failure).
TIMEOUT_S = 600.0
SCRAPE_TIMEOUT_S = 30.0
# Where a node keeps a step's metadata (storage/stepmeta.py): <prefix>.<job>.x<step>.
META_GLOB = "{prefix}.{job}.x*"
_SS_SOCKET = re.compile(r"(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\(.*?pid=(\d+)")
_SS_COUNTER = re.compile(r"\b(bytes_sent|bytes_received):(\d+)")


# ------------------------------------------------------------------ the daemons


class Node:
    """One daemon of the cluster, as its Status describes it."""

    def __init__(self, index: int, sock: str) -> None:
        self.index, self.sock = index, sock
        with grpc.insecure_channel(grpc_target(sock)) as ch:
            st = pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=30)
        self.pid = st.pid
        self.control, self.data = st.address.control, st.address.data
        self.metrics = st.metrics_address
        self.proc = psutil.Process(st.pid)

    @property
    def control_port(self) -> int:
        return int(self.control.rsplit(":", 1)[1])

    @property
    def data_port(self) -> int:
        return int(self.data.rsplit(":", 1)[1])

    def cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def scrape(self) -> dict[str, float]:
        """The daemon's counters: ``rpc/<service>/<method>``, ``data_sent``,
        ``to_restorable_sum`` and ``_count`` (this job's)."""
        if not self.metrics:
            raise RuntimeError(f"node {self.index} serves no metrics (SHARDGUARD_METRICS_PORT)")
        with urllib.request.urlopen(f"http://{self.metrics}/metrics",
                                    timeout=SCRAPE_TIMEOUT_S) as r:
            text = r.read().decode()
        out: dict[str, float] = defaultdict(float)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "shardguard_rpc_requests_total":
                    out[f"rpc/{s.labels['service']}/{s.labels['method']}"] += s.value
                elif s.name == "shardguard_data_sent_bytes_total" and s.labels.get("job") == JOB:
                    out["data_sent"] += s.value
                elif s.name == "shardguard_snapshot_to_restorable_seconds_sum" \
                        and s.labels.get("job") == JOB:
                    out["to_restorable_sum"] += s.value
                elif s.name == "shardguard_snapshot_to_restorable_seconds_count" \
                        and s.labels.get("job") == JOB:
                    out["to_restorable_count"] += s.value
        return dict(out)


def tcp_counters(nodes: list[Node]) -> dict[int, dict[str, float]]:
    """Per node: TCP payload bytes sent and received so far on its peer gRPC connections
    (``control_*``) and its ZeroMQ ones (``data_*``), by socket, from ``ss``.

    Keyed ``{node: {"<kind>_<sent|received>@<socket>": bytes}}``, so that two samples
    subtract per socket (a connection opened between them counts from 0)."""
    by_pid = {n.pid: n for n in nodes}
    control = {n.control_port for n in nodes}
    data = {n.data_port for n in nodes}
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    counters: dict[int, dict[str, float]] = {n.index: {} for n in nodes}
    pairs: list[list[str]] = []
    for line in out.splitlines():  # a socket's line, then its tcp_info indented below it
        if line[:1].isspace() and pairs:
            pairs[-1][1] += line
        elif line.strip():
            pairs.append([line, ""])
    for head, info in pairs:
        m = _SS_SOCKET.search(head)
        if not m or int(m.group(5)) not in by_pid:
            continue
        local, peer = int(m.group(2)), int(m.group(4))
        kind = ("control" if local in control or peer in control else
                "data" if local in data or peer in data else None)
        if kind is None:
            continue  # the metrics endpoint, scraped by this process
        node = by_pid[int(m.group(5))]
        key = f"{m.group(1)}:{local}>{m.group(3)}:{peer}"
        for name, value in _SS_COUNTER.findall(info):
            direction = "sent" if name == "bytes_sent" else "received"
            counters[node.index][f"{kind}_{direction}@{key}"] = float(value)
    return counters


def tcp_delta(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]
              ) -> dict[int, dict[str, float]]:
    """Per node, bytes moved between two samples, as ``control_sent`` etc."""
    out: dict[int, dict[str, float]] = {}
    for node, now in after.items():
        sums: dict[str, float] = defaultdict(float)
        for key, value in now.items():
            sums[key.split("@", 1)[0]] += value - before.get(node, {}).get(key, 0.0)
        out[node] = dict(sums)
    return out


def meta_bytes(spec: cluster.ClusterSpec, root: str) -> list[int]:
    """Bytes of step metadata each node keeps in its shared-memory directory."""
    sizes = []
    for i in range(spec.nodes):
        pattern = os.path.join(glob.escape(spec.node_shm_dir(root, i)),
                               META_GLOB.format(prefix=glob.escape(spec.node_prefix(i)), job=JOB))
        sizes.append(sum(os.path.getsize(p) for p in glob.glob(pattern) if os.path.isfile(p)))
    return sizes


# ------------------------------------------------------------------ the ranks


def rank_state(rank: int, kib: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank)
    return {"w": torch.randint(0, 256, (kib * 1024,), dtype=torch.uint8, generator=g),
            "step": -1, "rank": rank}


def connect(nodes: list[Node], group_size: int, parity: int,
            pool: concurrent.futures.ThreadPoolExecutor) -> list[Client]:
    """One client per node, all registering at once (as a launched job's ranks do)."""
    world = len(nodes)
    addrs = [(n.control, n.data) for n in nodes]

    def one(i: int) -> Client:
        return Client(nodes[i].sock, JOB, i, world, group=None, local_ranks=[i], nodes=addrs,
                      node_index=i, group_size=group_size, parity=parity, timeout_s=TIMEOUT_S)

    return list(pool.map(one, range(world)))


def run_step(clients: list[Client], states: list[dict[str, Any]], step: int,
             pool: concurrent.futures.ThreadPoolExecutor) -> tuple[float, float, float]:
    """Every rank snapshots ``step``; (first call, last seal, last restorable), monotonic."""

    def one(i: int) -> tuple[float, float]:
        states[i]["step"] = step
        states[i]["w"][0] = step % 256
        h = clients[i].snapshot(step, states[i])
        if h.skipped:
            raise RuntimeError(f"rank {i} skipped step {step}: the step before it is not "
                               "restorable on its node")
        h.wait(TIMEOUT_S)
        sealed = time.monotonic()
        clients[i].wait(restorable=True, timeout=TIMEOUT_S)
        return sealed, time.monotonic()

    t0 = time.monotonic()
    stamps = list(pool.map(one, range(len(clients))))
    return t0, max(s for s, _ in stamps), max(r for _, r in stamps)


def close(clients: list[Client], pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Close every client, giving up after a while (the cluster comes down anyway)."""
    futures = [pool.submit(c.close) for c in clients]
    done, pending = concurrent.futures.wait(futures, timeout=60)
    for f in done:
        if f.exception() is not None:
            print(f"  warning: close: {f.exception()!r}", file=sys.stderr)
    if pending:
        print(f"  warning: {len(pending)} clients did not close in 60 s", file=sys.stderr)


# ------------------------------------------------------------------ one size


def measure(n: int, group_size: int, parity: int, args: Any) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"sg-calib-{n}-")
    load_before = load_average()
    print(f"\n{n} daemons, group size {group_size}, parity {parity} (loadavg {load_before})",
          flush=True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="rank")
    clients: list[Client] = []
    ok = interrupted = False
    try:
        t = time.monotonic()
        spec = cluster.up(root, n, group_size, parity)
        up_s = time.monotonic() - t
        nodes = [Node(i, s) for i, s in enumerate(cluster.sockets(root))]
        print(f"  up in {up_s:.1f} s", flush=True)
        t = time.monotonic()
        clients = connect(nodes, group_size, parity, pool)
        register_s = time.monotonic() - t
        states = [rank_state(i, args.state_kib) for i in range(n)]
        for step in range(args.warmup):
            run_step(clients, states, step, pool)
        print(f"  registered in {register_s:.1f} s, {args.warmup} warm-up steps done", flush=True)

        # Idle: what the daemons cost with nothing to protect.
        cpu0 = [node.cpu_s() for node in nodes]
        m0 = [node.scrape() for node in nodes]
        tcp0 = tcp_counters(nodes)
        t_idle = time.monotonic()
        time.sleep(args.idle_s)
        idle_wall = time.monotonic() - t_idle
        tcp1 = tcp_counters(nodes)
        m1 = [node.scrape() for node in nodes]
        idle_cpu = [node.cpu_s() - c for node, c in zip(nodes, cpu0)]
        idle_tcp = tcp_delta(tcp0, tcp1)
        idle_peer_rpcs = [_sum_prefix(b, "rpc/Peer/") - _sum_prefix(a, "rpc/Peer/")
                          for a, b in zip(m0, m1)]

        # The timed steps.
        me = psutil.Process()
        rows = []
        cpu_first = [node.cpu_s() for node in nodes]
        t_steps = time.monotonic()
        for step in range(args.warmup, args.warmup + args.steps):
            c0, h0 = [node.cpu_s() for node in nodes], me.cpu_times()
            t0, sealed, restorable = run_step(clients, states, step, pool)
            c1, h1 = [node.cpu_s() for node in nodes], me.cpu_times()
            per = [b - a for a, b in zip(c0, c1)]
            rows.append({"step": step, "step_s": restorable - t0,
                         "restorable_latency_s": restorable - sealed,
                         "daemon_cpu_s": sum(per), "busiest_cpu_s": max(per),
                         "busiest_node": per.index(max(per)),
                         "harness_cpu_s": (h1.user + h1.system) - (h0.user + h0.system)})
        steps_wall = time.monotonic() - t_steps
        # Over all the steps: per daemon, finer than one step's 10 ms clock ticks.
        cpu_steps = [node.cpu_s() - c for node, c in zip(nodes, cpu_first)]
        tcp2 = tcp_counters(nodes)
        m2 = [node.scrape() for node in nodes]
        stored = meta_bytes(spec, root)
        rss = [node.proc.memory_info().rss for node in nodes]
        load_after = load_average()
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        try:
            if clients:
                close(clients, pool)
            pool.shutdown(wait=False, cancel_futures=True)
        finally:
            if os.path.exists(os.path.join(root, "cluster.json")):
                cluster.down(root)
            if ok or interrupted:
                shutil.rmtree(root, ignore_errors=True)
            else:
                print(f"  daemon logs kept in {root}/node-*/daemon.log", file=sys.stderr)
    return summarize(n, group_size, parity, args, rows, cpu_steps, m1, m2, tcp_delta(tcp1, tcp2),
                     idle_cpu, idle_tcp, idle_peer_rpcs, idle_wall, steps_wall, stored, rss,
                     up_s, register_s, load_before, load_after)


def _sum_prefix(d: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in d.items() if k.startswith(prefix))


def summarize(n: int, g: int, m: int, args: Any, rows: list[dict[str, Any]], cpu_steps: list[float],
              m1: list[dict[str, float]], m2: list[dict[str, float]],
              tcp: dict[int, dict[str, float]], idle_cpu: list[float],
              idle_tcp: dict[int, dict[str, float]], idle_peer_rpcs: list[float],
              idle_wall: float, steps_wall: float, stored: list[int], rss: list[int],
              up_s: float, register_s: float, load_before: Any, load_after: Any
              ) -> dict[str, Any]:
    steps = len(rows)
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("step_s", "restorable_latency_s", "daemon_cpu_s", "harness_cpu_s")}
    # Counters over all timed steps, per node, per step.
    peer = [(_sum_prefix(b, "rpc/Peer/") - _sum_prefix(a, "rpc/Peer/")) / steps
            for a, b in zip(m1, m2)]
    agent = [(_sum_prefix(b, "rpc/Agent/") - _sum_prefix(a, "rpc/Agent/")) / steps
             for a, b in zip(m1, m2)]
    methods: Counter[str] = Counter()
    for a, b in zip(m1, m2):
        for k, v in b.items():
            if k.startswith("rpc/Peer/"):
                methods[k.rsplit("/", 1)[1]] += v - a.get(k, 0.0)
    by_method = {k: round(v / steps / n, 3) for k, v in sorted(methods.items()) if v}
    to_rest = [(b.get("to_restorable_sum", 0) - a.get("to_restorable_sum", 0))
               / max(1.0, b.get("to_restorable_count", 0) - a.get("to_restorable_count", 0))
               for a, b in zip(m1, m2)]
    data_sent = [(b.get("data_sent", 0) - a.get("data_sent", 0)) / steps for a, b in zip(m1, m2)]

    def per_step(kind: str) -> list[float]:
        return [tcp[i].get(kind, 0.0) / steps for i in range(n)]

    ctl_sent, ctl_recv = per_step("control_sent"), per_step("control_received")
    ctl_both = [s + r for s, r in zip(ctl_sent, ctl_recv)]
    busiest = max(range(n), key=lambda i: ctl_both[i])
    step_wall = steps_wall / steps
    idle_rate_cpu = sum(idle_cpu) / idle_wall
    idle_rate_ctl = [(idle_tcp[i].get("control_sent", 0) + idle_tcp[i].get("control_received", 0))
                     / idle_wall for i in range(n)]
    idle_rate_rpc = [r / idle_wall for r in idle_peer_rpcs]
    return {
        "nodes": n, "group_size": g, "parity": m, "ranks_per_node": 1,
        "state_bytes_per_rank": args.state_kib * 1024, "steps": steps,
        "restorable_latency_s": med["restorable_latency_s"],
        "step_s": med["step_s"],
        "daemon_cpu_s_per_step": med["daemon_cpu_s"],
        "daemon_cpu_s_per_step_per_node": med["daemon_cpu_s"] / n,
        "daemon_cpu_s_per_step_mean": sum(cpu_steps) / steps,
        "busiest_daemon_cpu_s_per_step": max(cpu_steps) / steps,
        "busiest_daemon": cpu_steps.index(max(cpu_steps)),
        "median_daemon_cpu_s_per_step": statistics.median(cpu_steps) / steps,
        "daemon_cpu_s_per_step_net": med["daemon_cpu_s"] - idle_rate_cpu * med["step_s"],
        "harness_cpu_s_per_step": med["harness_cpu_s"],
        "rpc_per_step_per_node": statistics.mean(peer),
        "rpc_per_step_busiest_node": max(peer),
        "rpc_busiest_node": peer.index(max(peer)),
        "rpc_per_step_per_node_net": statistics.mean(peer) - statistics.mean(idle_rate_rpc)
        * step_wall,
        "peer_rpcs_per_step_per_node_by_method": by_method,
        "agent_rpc_per_step_per_node": statistics.mean(agent),
        "control_bytes_per_step_per_node": statistics.mean(ctl_both),
        "control_sent_bytes_per_step_per_node": statistics.mean(ctl_sent),
        "control_received_bytes_per_step_per_node": statistics.mean(ctl_recv),
        "control_bytes_per_step_busiest_node": ctl_both[busiest],
        "control_busiest_node": busiest,
        "control_bytes_per_step_per_node_net": statistics.mean(ctl_both)
        - statistics.mean(idle_rate_ctl) * step_wall,
        "data_sent_bytes_per_step_per_node": statistics.mean(data_sent),
        "daemon_to_restorable_s_mean": statistics.median(to_rest),
        "meta_bytes_stored_per_node": statistics.median(stored),
        "meta_bytes_stored_max": max(stored),
        "idle": {"seconds": idle_wall, "daemon_cpu_s_per_s": idle_rate_cpu,
                 "peer_rpc_per_s_per_node": statistics.mean(idle_rate_rpc),
                 "control_bytes_per_s_per_node": statistics.mean(idle_rate_ctl)},
        "daemon_rss_bytes_median": statistics.median(rss),
        "up_s": up_s, "register_s": register_s, "step_wall_s_mean": step_wall,
        "load_average_before": load_before, "load_average_after": load_after,
        "per_step": rows,
    }


# ------------------------------------------------------------------ main


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated node counts "
                        f"(default {','.join(map(str, SIZES))}; quick {QUICK_SIZES[0]})")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--parity", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8, quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--state-kib", type=int, default=4)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--label", default="working tree",
                        help="what control plane this measures (stored in the JSON)")
    parser.add_argument("--out", default=None, help="results name (default calib_daemons, "
                        "quick calib_daemons_quick): bench/results/NAME.json")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else \
        QUICK_SIZES if args.quick else SIZES
    args.steps = args.steps or args.repeat or (5 if args.quick else 8)
    if shutil.which("ss") is None:
        sys.exit("calib_daemons: needs ss (iproute2) for the per-connection byte counters")
    # The daemons inherit the environment: metrics on a free port each; and no client
    # gives a slow step up while 64 daemons share two cores.
    os.environ["SHARDGUARD_METRICS_PORT"] = "0"
    os.environ.setdefault("SHARDGUARD_PROTECT_TIMEOUT_S", str(TIMEOUT_S))
    signal.signal(signal.SIGTERM, raise_interrupt)
    torch.set_num_threads(1)
    results = []
    t_start = time.monotonic()
    for n in sizes:
        try:
            r = measure(n, args.group_size, args.parity, args)
        except Exception as exc:  # noqa: BLE001 - the other sizes still count; KeyboardInterrupt stops
            print(f"  {n} daemons failed: {exc!r}", file=sys.stderr)
            results.append({"nodes": n, "group_size": args.group_size, "parity": args.parity,
                            "error": repr(exc), "per_step": []})
            continue
        results.append(r)
        print(f"  latency {r['restorable_latency_s'] * 1e3:.0f} ms, daemon CPU "
              f"{r['daemon_cpu_s_per_step']:.3f} s/step, {r['rpc_per_step_per_node']:.1f} peer "
              f"RPCs/node/step (loadavg {r['load_average_after']})", flush=True)
    print_rows(results, [
        ("nodes", "nodes", "{}"), ("group_size", "g", "{}"), ("parity", "m", "{}"),
        ("restorable_latency_s", "seal->restorable s", "{:.3f}"),
        ("step_s", "step s", "{:.3f}"),
        ("daemon_cpu_s_per_step", "daemon CPU s/step", "{:.3f}"),
        ("busiest_daemon_cpu_s_per_step", "busiest CPU s", "{:.3f}"),
        ("rpc_per_step_per_node", "peer RPC/node", "{:.1f}"),
        ("rpc_per_step_busiest_node", "busiest RPC", "{:.0f}"),
        ("control_bytes_per_step_per_node", "ctl B/node", "{:.0f}"),
        ("control_bytes_per_step_busiest_node", "busiest ctl B", "{:.0f}"),
        ("meta_bytes_stored_per_node", "meta B/node", "{:.0f}"),
    ], title="per step, medians (the machine's load average is in the JSON)")
    write_results(args.out or ("calib_daemons_quick" if args.quick else "calib_daemons"), {
        "label": args.label,
        # Which tree ran (a checkout put first on PYTHONPATH measures another commit).
        "code": os.path.dirname(os.path.dirname(os.path.abspath(cluster.__file__))),
        "params": {"sizes": list(sizes), "group_size": args.group_size, "parity": args.parity,
                   "steps": args.steps, "warmup": args.warmup, "state_kib": args.state_kib,
                   "idle_s": args.idle_s},
        "wall_s": time.monotonic() - t_start,
        "sizes": [{k: v for k, v in r.items() if k != "per_step"} for r in results],
        "per_step": {str(r["nodes"]): r["per_step"] for r in results},
    })


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
