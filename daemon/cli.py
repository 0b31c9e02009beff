"""``shardguard`` command line: ``daemon`` (serve a node), ``status``, ``ls``, ``drop``."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import sys
from typing import Sequence

import grpc

from shardguard.daemon import config as cfg
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ShardguardError, error_from_rpc
from shardguard.proto.paths import default_socket_path, grpc_target

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _cmd_daemon(args: argparse.Namespace) -> int:
    from shardguard.daemon.server import Daemon

    conf = cfg.load(args.config, overrides=cfg.flag_overrides(args))
    faulthandler.enable()  # a native crash still leaves a traceback in the log
    logging.basicConfig(
        level=conf.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s")
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
    print(f"daemon pid {st.pid}  version {st.version}  socket {st.socket}  "
          f"up {st.uptime_s:.0f}s")
    print(f"memory {_gib(st.memory_used_bytes)} used of {_gib(st.memory_budget_bytes)} budget")
    print(f"{'job':<24} {'world':>5} {'local ranks':<16} {'restorable':>10}  slots (rank: state@step)")
    for j in st.jobs:
        step = str(j.restorable_step) if j.HasField("restorable_step") else "-"
        slots = "  ".join(f"{r.rank}:" + ",".join(f"{s.state}@{s.step}" for s in r.slots)
                          for r in j.ranks)
        local = ",".join(map(str, j.local_ranks))
        print(f"{j.job:<24} {j.world_size:>5} {local:<16} {step:>10}  {slots}")
    return EXIT_OK


def _cmd_ls(args: argparse.Namespace) -> int:
    for j in _status(args).jobs:
        step = str(j.restorable_step) if j.HasField("restorable_step") else "-"
        print(f"{j.job}\t{step}\t{sum(r.arena_bytes for r in j.ranks)}")
    return EXIT_OK


def _cmd_drop(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("refusing to drop without --yes (no terminal to confirm on)", file=sys.stderr)
            return EXIT_USAGE
        if input(f"drop every snapshot of job {args.job}? [y/N] ").strip().lower() != "y":
            return EXIT_ERROR
    r = _stub(args.socket).Drop(pb.DropRequest(job=args.job), timeout=args.timeout_s)
    print(f"dropped job {args.job}: {r.arenas_freed} arenas, {_gib(r.bytes_freed)} freed")
    return EXIT_OK


def _cmd_cluster(args: argparse.Namespace) -> int:
    from shardguard.daemon import cluster

    if args.action == "up":
        spec = cluster.up(args.dir, args.nodes, args.group_size, args.parity)
        for i, sock in enumerate(cluster.sockets(args.dir)):
            print(f"node {i}: SHARDGUARD_SOCKET={sock}")
        print(f"{spec.nodes} nodes up (group size {spec.group_size}, parity {spec.parity})")
    elif args.action == "kill":
        cluster.kill(args.dir, _node(args))
        print(f"node {args.node} lost (daemon killed, shared memory wiped)")
    elif args.action == "start":
        pid = cluster.start(args.dir, _node(args))
        print(f"node {args.node} started (pid {pid})")
    else:
        cluster.down(args.dir)
        print("cluster down")
    return EXIT_OK


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
                               ("drop", _cmd_drop, "free a job's memory")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--socket", default=None, help="daemon socket (default as the client)")
        c.add_argument("--timeout-s", type=float, default=10.0)
        c.set_defaults(fn=fn)
        if name == "status":
            c.add_argument("--json", action="store_true")
            c.add_argument("--job", default="")
        if name == "drop":
            c.add_argument("--job", required=True)
            c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    c = sub.add_parser("cluster", help="a local stand-in for N nodes (tests, demos)")
    c.add_argument("action", choices=["up", "kill", "start", "down"])
    c.add_argument("--dir", required=True, help="the cluster's directory")
    c.add_argument("--nodes", type=int, default=4)
    c.add_argument("--group-size", type=int, default=4)
    c.add_argument("--parity", type=int, default=1)
    c.add_argument("--node", type=int, default=None)
    c.set_defaults(fn=_cmd_cluster)
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
