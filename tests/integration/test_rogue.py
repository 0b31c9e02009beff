"""A rogue process on the same machine, without the job's secret, can read, write, drop or spoof nothing.

The rogue runs as another user (``nobody``; the test needs root to switch, and
skips saying so otherwise) against a live 4-node cluster that holds a job. The
directories on the way are opened up (0755) so that only the protections of
shardguard itself stand in the way: 0600 arenas, parity and metadata in
/dev/shm (sticky), a 0600 agent socket, a 0600 secret, and an HMAC on every
peer call and every ZeroMQ message. Afterwards the job is untouched: same
restorable step, every checksum and stripe sound, and it restores bit-exactly.
(A process of the daemon's own user is inside its trust domain: it may open
the files, but still cannot talk to the peers without the secret,
tests/integration/test_peer_auth.py.)
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardguard.daemon.service import cluster
from _support import finish, run_trainer, status_of_socket, trainer_log, unreachable_for_others

FAULT_CATEGORY = "rogue process of another user without the secret: read, write, drop, spoof"
FAULT_OUTCOME = "every attempt refused; the job untouched, restorable, bit-exact"
NOBODY = 65534

def rogue(conn, a: dict) -> None:  # type: ignore[no-untyped-def]
    """The rogue: every module it needs is imported while still root, then it drops to nobody."""
    import grpc
    import zmq

    from shardguard.proto import agent_pb2 as pb
    from shardguard.proto import agent_pb2_grpc as pb_grpc
    from shardguard.proto import peer_pb2 as ppb
    from shardguard.proto import peer_pb2_grpc as ppb_grpc

    drop_to_nobody()
    out: dict[str, str] = {}

    def attempt(name, fn):  # type: ignore[no-untyped-def]
        try:
            fn()
            out[name] = "ALLOWED"
        except grpc.RpcError as exc:
            out[name] = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - what refused it is the result
            out[name] = type(exc).__name__ + ": " + (str(exc).splitlines() or [""])[0][:160]

    def read(path: str) -> None:
        with open(path, "rb") as fh:
            fh.read(16)

    def write(path: str) -> None:
        with open(path, "r+b") as fh:
            fh.write(b"x")

    for kind, path in a["files"]:
        what = f"{kind} {os.path.basename(path)}"
        attempt("read " + what, lambda p=path: read(p))
        attempt("write " + what, lambda p=path: write(p))
        attempt("unlink " + what, lambda p=path: os.unlink(p))
    attempt("read secret", lambda: read(a["secret"]))

    def agent(method, req):  # type: ignore[no-untyped-def]
        with grpc.insecure_channel("unix:" + a["socket"]) as ch:
            getattr(pb_grpc.AgentStub(ch), method)(req, timeout=5)

    attempt("agent Status", lambda: agent("Status", pb.StatusRequest()))
    attempt("agent Drop", lambda: agent("Drop", pb.DropRequest(job="job", everywhere=True)))
    attempt("agent OpenForRestore", lambda: agent(
        "OpenForRestore", pb.OpenRequest(job="job", rank=1, lease="x", step=-1)))

    def peer(method, req):  # type: ignore[no-untyped-def]
        with grpc.insecure_channel(a["control"]) as ch:
            getattr(ppb_grpc.PeerStub(ch), method)(req, timeout=5)

    attempt("peer StepInfo (read metadata)",
            lambda: peer("StepInfo", ppb.StepInfoRequest(job="job")))
    attempt("peer DropJob", lambda: peer("DropJob", ppb.DropJobRequest(job="job")))
    attempt("peer Announce (spoof a step)", lambda: peer(
        "Announce", ppb.AnnounceRequest(job="job", step=10**6, meta=b"{}")))
    attempt("peer Report (spoof a report)", lambda: peer(
        "Report", ppb.ReportRequest(job="job", step=10**6, node=0, report=b"{}")))
    attempt("peer VerifyLocal", lambda: peer(
        "VerifyLocal", ppb.VerifyLocalRequest(job="job", step=1)))

    def zmq_msg(frames):  # type: ignore[no-untyped-def]
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect("tcp://" + a["data"])
            sock.send_multipart(frames)
            if not sock.poll(5000):
                raise TimeoutError("no answer")
            reply = sock.recv_multipart()
        finally:
            ctx.destroy(linger=0)
        if reply[0] != b"chunk":
            raise PermissionError(reply[1].decode()[:160])

    hdr = json.dumps({"job": "job", "step": a["step"], "group": 0, "stripe": 1, "index": 3,
                      "req": 1}).encode()
    attempt("zmq fetch a piece", lambda: zmq_msg([b"fetch", hdr, b""]))
    attempt("zmq fetch with a forged token", lambda: zmq_msg([b"fetch", hdr, b"v1.1.ab.00"]))
    ph = json.dumps({"job": "job", "step": a["step"] + 1, "group": 0, "stripe": 1,
                     "index": 3, "plen": 4096, "crc": 0, "off": 0, "n": 4096}).encode()
    attempt("zmq push parity", lambda: zmq_msg([b"parity", ph, b"", b"\0" * 4096]))
    conn.send(out)


def drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_rogue_user_without_the_secret_gets_nothing(tmp_path: Path) -> None:
    if unreachable_for_others():
        pytest.skip(f"the code lies under directories other users cannot enter: "
                    f"{unreachable_for_others()}")
    root = tmp_path / "c"
    cluster.up(str(root), 4, 4, 1)
    try:
        out = tmp_path / "run"
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 5)
        assert finish(proc) == 0, trainer_log(out)
        # Only shardguard's own protections in the way: open the directories on the path.
        for d in [tmp_path, root, *root.glob("node-*"), *Path(tmp_path).parents]:
            if str(d).startswith("/tmp"):
                os.chmod(d, os.stat(d).st_mode | 0o755)
        spec = cluster.load_spec(str(root))
        st = status_of_socket(cluster.sockets(str(root))[1])
        step = next(j for j in st.jobs if j.job == "job").restorable_step
        files = []
        for path in sorted(glob.glob(f"/dev/shm/{spec.node_prefix(1)}.job.*")):
            tail = os.path.basename(path).split(".job.")[1]
            kind = ("job meta" if tail == "meta" else "arena" if tail[0] == "r" else
                    "step metadata" if tail[0] == "x" else "parity piece")
            files.append((kind, path))
        assert {k for k, _ in files} >= {"arena", "job meta", "step metadata", "parity piece"}
        args = {"files": files, "secret": str(root / "secret"),
                "socket": cluster.sockets(str(root))[1], "control": st.address.control,
                "data": st.address.data, "step": step}
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no gRPC state forked
        parent, child = ctx.Pipe()
        p = ctx.Process(target=rogue, args=(child, args))
        p.start()
        assert parent.poll(120), "the rogue did not report"
        results = parent.recv()
        p.join(30)
        allowed = {k: v for k, v in results.items() if v == "ALLOWED"}
        assert not allowed, allowed
        refused = ("Permission", "UNAUTHENTICATED", "Authentication", "not permitted")
        odd = {k: v for k, v in results.items() if not any(r in v for r in refused)}
        assert not odd, odd
        assert len(results) == 3 * len(files) + 12, results
        # The job is untouched and restores bit-exactly.
        st2 = status_of_socket(cluster.sockets(str(root))[1])
        assert next(j for j in st2.jobs if j.job == "job").restorable_step == step
        v = subprocess.run([sys.executable, "-m", "shardguard.daemon.service.cli", "verify", "--job",
                            "job", "--socket", cluster.sockets(str(root))[0]],
                           capture_output=True, text=True, timeout=120)
        assert v.returncode == 0, v.stdout + v.stderr
        again = tmp_path / "again"
        proc = run_trainer(again, "job", ",".join(cluster.sockets(str(root))), 4, 7)
        assert finish(proc) == 0, trainer_log(again)
        restored = {(again / f"restored.{r}").read_text().split()[-1] for r in range(4)}
        assert restored == {str(step)}, restored
    finally:
        cluster.down(str(root))
