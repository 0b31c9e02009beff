"""Peer authentication on a real cluster: a rogue peer without the job's secret gets nothing.

The local cluster gives its daemons one shared secret, as the Slurm prolog does
per job. A rogue process on the same host talks to a node's peer service
(gRPC) and data plane (ZeroMQ) directly: without the secret, with a wrong
one, and replaying a captured token. It must be refused every time, change
nothing, and the daemon must go on serving.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import grpc
import pytest
import zmq

from shardguard.daemon.service import cluster
from shardguard.daemon.transport.auth import (METADATA_KEY, Authenticator, ClientInterceptor, grpc_context,
                                   zmq_context)
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto import peer_pb2_grpc as ppb_grpc
from _support import finish, run_trainer, status_of_socket, trainer_log

SHM = "/dev/shm"

FAULT_CATEGORY = "rogue peer without the job's secret: gRPC calls, ZeroMQ frames, replayed tokens"
FAULT_OUTCOME = 'refused (UNAUTHENTICATED / error frame); nothing changed'


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A 4-node cluster after 4 steps; yields (root, node 1's status)."""
    root = tmp_path_factory.mktemp("auth") / "cluster"
    cluster.up(str(root), 4, 4, 1)
    try:
        out = root.parent / "run"
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 4)
        assert finish(proc) == 0, trainer_log(out)
        yield root, status_of_socket(cluster.sockets(str(root))[1])
    finally:
        cluster.down(str(root))


def restorable(root: Path, i: int) -> int:
    st = status_of_socket(cluster.sockets(str(root))[i])
    return next(j for j in st.jobs if j.job == "job").restorable_step


def rogue(address: str, secret: bytes | None = None) -> ppb_grpc.PeerStub:
    ch = grpc.insecure_channel(address)
    if secret is not None:
        ch = grpc.intercept_channel(ch, ClientInterceptor(Authenticator(secret), address))
    return ppb_grpc.PeerStub(ch)


def calls():
    yield "StepInfo", ppb.StepInfoRequest(job="job")
    yield "DropJob", ppb.DropJobRequest(job="job")
    yield "Announce", ppb.AnnounceRequest(job="job", step=10**6, meta=b'{"step": 1000000}')
    yield "Report", ppb.ReportRequest(job="job", step=10**6, node=2, report=b"{}")
    yield "VerifyLocal", ppb.VerifyLocalRequest(job="job", step=1)


@pytest.mark.parametrize("secret", [None, b"not-the-job-secret-at-all"],
                         ids=["no-secret", "wrong-secret"])
def test_peer_calls_without_the_secret_are_refused_and_change_nothing(node, secret) -> None:
    root, st = node
    before = restorable(root, 1)
    files = sorted(glob.glob(os.path.join(SHM, cluster.load_spec(str(root)).node_prefix(1)
                                          + ".*")))
    stub = rogue(st.address.control, secret)
    for name, req in calls():
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, name)(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    assert restorable(root, 1) == before
    assert sorted(glob.glob(os.path.join(SHM, cluster.load_spec(str(root)).node_prefix(1)
                                         + ".*"))) == files
    log = (root / "node-1" / "daemon.log").read_text()
    assert "refused /shardguard.v1.Peer/DropJob" in log


def test_the_job_secret_works_once_and_a_replayed_token_is_refused(node) -> None:
    root, st = node
    secret = (root / "secret").read_bytes()
    req = ppb.StepInfoRequest(job="job")
    method = "/shardguard.v1.Peer/StepInfo"
    to = st.address.control
    token = Authenticator(secret).sign(grpc_context(to, method, req.SerializeToString()))
    other = rogue(status_of_socket(cluster.sockets(str(root))[2]).address.control)

    def refused_by_another_node() -> None:
        with pytest.raises(grpc.RpcError) as info:
            other.StepInfo(req, metadata=[(METADATA_KEY, token)], timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "wrong secret or altered message" in info.value.details()

    refused_by_another_node()  # the token names node 1: no other node of the job takes it
    stub = rogue(to)
    reply = stub.StepInfo(req, metadata=[(METADATA_KEY, token)], timeout=10)
    assert reply.step == restorable(root, 1)
    refused_by_another_node()  # nor after node 1 took it
    with pytest.raises(grpc.RpcError) as info:
        stub.StepInfo(req, metadata=[(METADATA_KEY, token)], timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in info.value.details()
    # The same token for another request: the MAC covers the request.
    token = Authenticator(secret).sign(grpc_context(to, method, req.SerializeToString()))
    with pytest.raises(grpc.RpcError):
        stub.StepInfo(ppb.StepInfoRequest(job="other"), metadata=[(METADATA_KEY, token)],
                      timeout=10)


def zmq_exchange(address: str, frames: list[bytes]) -> list[bytes]:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{address}")
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no answer from the data plane"
        return sock.recv_multipart()
    finally:
        ctx.destroy(linger=0)


def test_data_plane_messages_without_the_secret_get_nothing(node) -> None:
    root, st = node
    step = restorable(root, 1)
    header = json.dumps({"job": "job", "step": step, "group": 0, "stripe": 1, "index": 3,
                         "req": 1}).encode()
    wrong = Authenticator(b"not-the-job-secret-at-all").sign(
        zmq_context(st.address.data, b"fetch", header)).encode()
    secret = (root / "secret").read_bytes()
    # Signed with the secret, but for another node of the job.
    elsewhere = Authenticator(secret).sign(zmq_context(
        status_of_socket(cluster.sockets(str(root))[2]).address.data, b"fetch", header)).encode()
    for token in (b"", wrong, b"v1.1.2.3", elsewhere):
        reply = zmq_exchange(st.address.data, [b"fetch", header, token])
        assert reply[0] == b"error" and b"AuthenticationError" in reply[1], reply[:2]
        assert len(reply) == 3  # kind, header, token: no piece bytes
    # Unsigned pieces pushed at the node do not land anywhere.
    files = sorted(glob.glob(os.path.join(SHM, cluster.load_spec(str(root)).node_prefix(1)
                                          + ".*")))
    hdr = json.dumps({"job": "job", "step": step + 1, "group": 0, "stripe": 0, "index": 4,
                      "plen": 4096, "crc": 0, "off": 0, "n": 4096}).encode()
    reply = zmq_exchange(st.address.data, [b"parity", hdr, b"", b"\0" * 4096])
    assert reply[0] == b"error" and b"AuthenticationError" in reply[1]
    assert sorted(glob.glob(os.path.join(SHM, cluster.load_spec(str(root)).node_prefix(1)
                                         + ".*"))) == files
    # With the secret, the same fetch is served: the refusals above were the secret's doing.
    good = Authenticator(secret).sign(zmq_context(st.address.data, b"fetch", header)).encode()
    reply = zmq_exchange(st.address.data, [b"fetch", header, good])
    assert reply[0] == b"chunk", reply[:2]


def test_a_daemon_refuses_to_start_with_a_secret_others_can_read(daemon_factory,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("x" * 40)
    os.chmod(path, 0o644)
    d = daemon_factory(extra=["--secret-file", str(path)], start=False)
    with pytest.raises(RuntimeError, match="readable by others"):
        d.start()
