"""``shardguard`` command line: ``daemon`` (serve a node), ``status``, ``ls``, ``drop``,
``verify``, ``doctor``, ``cluster``, ``plan``."""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from typing import Sequence

import grpc

from shardguard.daemon.base import config as cfg
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ShardguardError, error_from_rpc
from shardguard.proto.paths import default_socket_path, grpc_target

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
#: ``verify``: every stripe still decodes but some pieces or slots are bad or missing;
#: some stripe has fewer than k sound pieces (a lost node could not be rebuilt).
EXIT_DEGRADED, EXIT_LOST = 4, 5
#: ``verify`` checks again when training replaced the step while it was being checked.
VERIFY_ATTEMPTS = 5


def _cmd_daemon(args: argparse.Namespace) -> int:
    from shardguard.daemon.base import logs
    from shardguard.daemon.service.server import Daemon

    conf = cfg.load(args.config, overrides=cfg.flag_overrides(args))
    faulthandler.enable()  # a native crash still leaves a traceback in the log
    logs.configure(conf.log_level, conf.log_format, sys.stderr)
    Daemon(conf).serve()
    return EXIT_OK


def _stub(socket: str | None) -> pb_grpc.AgentStub:
    channel = grpc.insecure_channel(grpc_target(socket or default_socket_path()))
    return pb_grpc.AgentStub(channel)


def _status(args: argparse.Namespace) -> pb.StatusReply:
    return _stub(args.socket).Status(pb.StatusRequest(job=getattr(args, "job", "") or ""),
                                     timeout=args.timeout_s)


def _cmd_status(args: argparse.Namespace) -> int:
    st = _status(args)
    if args.json:
        from google.protobuf import json_format

        print(json.dumps(json_format.MessageToDict(st, always_print_fields_with_no_presence=True),
                         indent=2))
        return EXIT_OK
    print(f"daemon pid {st.pid}  version {st.version}  up {st.uptime_s:.0f}s  socket {st.socket}")
    if st.address.control:
        print(f"peers: control {st.address.control}  data {st.address.data}")
    if st.metrics_address:
        print(f"metrics: http://{st.metrics_address}/metrics")
    print(f"memory {_gib(st.memory_used_bytes)} used of {_gib(st.memory_budget_bytes)} budget")
    if not st.jobs:
        print("no jobs")
    for j in st.jobs:
        step = str(j.restorable_step) if j.HasField("restorable_step") else "-"
        flight = str(j.in_flight_step) if j.HasField("in_flight_step") else "-"
        local = ",".join(map(str, j.local_ranks))
        held = sum(r.arena_bytes for r in j.ranks)
        print(f"\njob {j.job}: world {j.world_size}, local ranks [{local}], restorable step "
              f"{step}, in flight {flight}, arenas {_gib(held)}")
        if j.nodes:
            k = len(j.group_nodes) - j.parity
            print(f"  node {j.node_index} of {j.nodes}; group {j.group} = nodes "
                  f"{list(j.group_nodes)} (k={k}, m={j.parity}); parity pieces of step {step} "
                  f"here: {j.parity_pieces}; peers up {j.peers_up}/{j.peers}")
        for r in j.ranks:
            slots = "  ".join(f"slot {s.index}: {s.state}@{s.step}" for s in r.slots)
            who = f"pid {r.pid}" if r.claimed else "unclaimed"
            print(f"  rank {r.rank:<5} {who:<12} {slots}")
    return EXIT_OK


def _cmd_ls(args: argparse.Namespace) -> int:
    for j in _status(args).jobs:
        step = str(j.restorable_step) if j.HasField("restorable_step") else "-"
        print(f"{j.job}\t{step}\t{sum(r.arena_bytes for r in j.ranks)}")
    return EXIT_OK


def _cmd_drop(args: argparse.Namespace) -> int:
    where = "on this node" if args.local else "on every node of the job"
    if not args.yes:
        if not sys.stdin.isatty():
            print("refusing to drop without --yes (no terminal to confirm on)", file=sys.stderr)
            return EXIT_USAGE
        if input(f"drop every snapshot of job {args.job} {where}? [y/N] ").strip().lower() != "y":
            return EXIT_ERROR
    r = _stub(args.socket).Drop(pb.DropRequest(job=args.job, everywhere=not args.local),
                                timeout=args.timeout_s)
    print(f"dropped job {args.job} on {r.nodes} node(s): {r.arenas_freed} arenas, "
          f"{_gib(r.bytes_freed)} freed")
    if r.unreachable:
        print(f"not reached (free it there with `shardguard drop --local` or the epilog): "
              f"{', '.join(r.unreachable)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    stub = _stub(args.socket)
    req = pb.VerifyRequest(job=args.job)
    if args.step is not None:
        req.step = args.step
    for _ in range(VERIFY_ATTEMPTS):
        r = stub.Verify(req, timeout=args.timeout_s)
        if not r.superseded:
            break
        if args.step is not None:
            print(f"shardguard verify: step {args.step} was replaced by a newer one while it "
                  "was checked; check the restorable step instead", file=sys.stderr)
            return EXIT_ERROR
    else:
        print(f"shardguard verify: training replaced the step {VERIFY_ATTEMPTS} times while "
              "it was checked; try again", file=sys.stderr)
        return EXIT_ERROR
    report = json.loads(r.report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_verify(r, report)
    if not r.stripes:  # a one-node job: no parity to repair a bad slot from
        return EXIT_LOST if r.bad_ranks else EXIT_OK
    if r.stripes_lost:
        return EXIT_LOST
    if r.stripes_degraded or r.bad_pieces or r.bad_ranks or r.unreachable_nodes:
        return EXIT_DEGRADED
    return EXIT_OK


def _print_verify(r: pb.VerifyReply, report: dict) -> None:
    print(f"job {report['job']} step {r.step}: {_gib(r.bytes_checked)} checked")
    for node in report["nodes"]:
        for rank in node["ranks"]:
            verdict = "ok" if rank["ok"] else f"BAD: {rank['error']}"
            print(f"  node {node['node']} rank {rank['rank']:<5} slot    {verdict}")
        for c in node["pieces"]:
            if not c["ok"]:
                kind = "parity" if c["parity"] else "data"
                print(f"  node {node['node']} group {c['group']} stripe {c['stripe']} "
                      f"{kind} piece {c['index']}: BAD: {c['error']}")
    for u in report["unreachable"]:
        print(f"  node {u['node']} did not answer: {u['error']}")
    if r.stripes:
        print(f"stripes: {r.stripes} total, {r.stripes - r.stripes_degraded - r.stripes_lost} "
              f"whole, {r.stripes_degraded} degraded (still decodable), {r.stripes_lost} lost")
    healthy = not (r.stripes_degraded or r.stripes_lost or r.bad_pieces or r.bad_ranks
                   or r.unreachable_nodes)
    print("verdict: " + ("healthy" if healthy else
                         "LOST: a stripe cannot be decoded" if r.stripes_lost else
                         "degraded: every stripe still decodes" if r.stripes else "BAD"))


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Print what the daemon finds on this node and across its jobs' peers; 1 if any fails."""
    try:
        r = _stub(args.socket).Doctor(pb.DoctorRequest(job=args.job), timeout=args.timeout_s)
    except grpc.RpcError as exc:
        err = error_from_rpc(exc)
        print(f"FAIL  daemon      the daemon at {args.socket or default_socket_path()} does not "
              f"answer ({type(err).__name__}: {err}): is it running (systemctl status "
              f"shardguard, or the Slurm prolog)?")
        return EXIT_UNAVAILABLE if isinstance(err, ConnectionError) else EXIT_ERROR
    if args.json:
        print(json.dumps([{"check": f.check, "level": f.level, "detail": f.detail,
                           "where": f.where} for f in r.findings], indent=2))
    else:
        for f in r.findings:
            if f.level == "ok" and not args.verbose:
                continue
            where = f" [{f.where}]" if f.where else ""
            print(f"{f.level.upper():<5} {f.check:<11} {f.detail}{where}")
        bad = sum(f.level == "fail" for f in r.findings)
        warn = sum(f.level == "warn" for f in r.findings)
        print(f"{len(r.findings)} checks: {bad} failed, {warn} warnings"
              + ("" if bad or warn else ": nothing stands in the way of protection"))
    return EXIT_ERROR if any(f.level == "fail" for f in r.findings) else EXIT_OK


def _cmd_cluster(args: argparse.Namespace) -> int:
    from shardguard.daemon.service import cluster

    if args.action == "up":
        spec = cluster.up(args.dir, args.nodes, args.group_size, args.parity, args.base_port,
                          isolate=args.isolate)
        for i, sock in enumerate(cluster.sockets(args.dir)):
            where = (f"  (address {spec.address(i)}, network namespace {spec.netns(i)})"
                     if spec.isolate else "")
            print(f"node {i}: SHARDGUARD_SOCKET={sock}{where}")
        print(f"{spec.nodes} nodes up (group size {spec.group_size}, parity {spec.parity})")
    elif args.action == "kill":
        cluster.kill(args.dir, _node(args), keep_memory=args.keep_memory)
        print(f"node {args.node} lost (daemon killed" +
              (", shared memory kept)" if args.keep_memory else ", shared memory wiped)"))
    elif args.action == "start":
        pid = cluster.start(args.dir, _node(args))
        print(f"node {args.node} started (pid {pid})")
    else:
        cluster.down(args.dir)
        print("cluster down")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    """What each (group_size, parity) costs a job and how likely it loses a step."""
    from shardguard.daemon.coding import plan

    job = plan.Job(args.nodes, cfg.parse_bytes(args.state_per_node), args.mtbf_hours,
                   args.nic_gbps, args.interval_s, args.rebuild_hours_floor, args.job_days,
                   args.placement)
    rows = plan.table(job, args.group_sizes, args.parities)
    print(json.dumps(plan.as_json(job, rows), indent=2) if args.json
          else plan.format_table(job, rows))
    return EXIT_OK if any(isinstance(r, plan.Option) for r in rows) else EXIT_ERROR


def _node(args: argparse.Namespace) -> int:
    if args.node is None:
        raise ShardguardError(f"cluster {args.action} needs --node")
    return args.node


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardguard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("daemon", help="run the node daemon")
    d.add_argument("--config", default=None, help="TOML file (default $SHARDGUARD_CONFIG or "
                   "/etc/shardguard/shardguard.toml)")
    cfg.add_flags(d)
    d.set_defaults(fn=_cmd_daemon)
    for name, fn, helptext in (("status", _cmd_status, "daemon health, jobs, slots, memory"),
                               ("ls", _cmd_ls, "jobs and their restorable steps"),
                               ("drop", _cmd_drop, "free a job's memory on every node"),
                               ("verify", _cmd_verify, "re-check every checksum of a step and "
                                "that every stripe decodes"),
                               ("doctor", _cmd_doctor, "what would stall protection here and "
                                "across the job's peers (clocks, config, ports, budget, "
                                "directories), in plain words")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--socket", default=None, help="daemon socket (default as the client)")
        c.add_argument("--timeout-s", type=float, default=10.0 if name != "verify" else 300.0)
        c.set_defaults(fn=fn)
        if name == "status":
            c.add_argument("--json", action="store_true")
            c.add_argument("--job", default="")
        if name == "drop":
            c.add_argument("--job", required=True)
            c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
            c.add_argument("--local", action="store_true",
                           help="free it on this node only (default: every node of the job)")
        if name == "verify":
            c.add_argument("--job", required=True)
            c.add_argument("--step", type=int, default=None,
                           help="the step to check (default: the restorable step)")
            c.add_argument("--json", action="store_true", help="every check, as JSON")
        if name == "doctor":
            c.add_argument("--job", default="", help="one job (default: every job here)")
            c.add_argument("--json", action="store_true", help="every check, as JSON")
            c.add_argument("--verbose", "-v", action="store_true",
                           help="also the checks that passed")
    c = sub.add_parser("cluster", help="a local stand-in for N nodes (tests, demos)")
    c.add_argument("action", choices=["up", "kill", "start", "down"])
    c.add_argument("--dir", required=True, help="the cluster's directory")
    c.add_argument("--nodes", type=int, default=4)
    c.add_argument("--group-size", type=int, default=4)
    c.add_argument("--parity", type=int, default=1)
    c.add_argument("--node", type=int, default=None)
    c.add_argument("--base-port", type=int, default=0,
                   help="up: node i listens on BASE+2i (control) and BASE+2i+1 (data); "
                   "default: free ports")
    c.add_argument("--isolate", action="store_true",
                   help="up: each node in network and mount namespaces of its own, at its "
                   "own address, with its own tmpfs (root only)")
    c.add_argument("--keep-memory", action="store_true",
                   help="kill: only the daemon dies, its shared memory stays (a daemon crash)")
    c.set_defaults(fn=_cmd_cluster)
    from shardguard.daemon.coding import plan
    c = sub.add_parser("plan", help="per (group size, parity): network, memory, rebuild time "
                       "and the chance of losing a step, for a job (docs/operators.md)")
    c.add_argument("--nodes", type=int, required=True)
    c.add_argument("--state-per-node", required=True, help="e.g. 80GiB")
    c.add_argument("--mtbf-hours", type=float, required=True, help="one node's MTBF")
    c.add_argument("--nic-gbps", type=float, required=True, help="NIC line rate, Gb/s")
    c.add_argument("--interval-s", type=float, required=True, help="between snapshots")
    c.add_argument("--group-sizes", type=plan.int_list, default=plan.DEFAULT_GROUP_SIZES)
    c.add_argument("--parities", type=plan.int_list, default=plan.DEFAULT_PARITIES)
    c.add_argument("--rebuild-hours-floor", type=float, default=plan.DEFAULT_REBUILD_HOURS_FLOOR,
                   help="the least a group stays exposed after a loss (detect, relaunch, "
                   "replace): the window is this or the rebuild time if longer")
    c.add_argument("--job-days", type=float, default=plan.DEFAULT_JOB_DAYS)
    c.add_argument("--placement", choices=["contiguous", "stride"], default="contiguous")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_cmd_plan)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except grpc.RpcError as exc:
        err = error_from_rpc(exc)
        print(f"shardguard {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(err, ConnectionError) else EXIT_ERROR
    except ShardguardError as exc:
        print(f"shardguard {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
