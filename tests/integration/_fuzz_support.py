"""Helpers for the hostile-input fuzzing (test_fuzz.py): calls that report what came back,
the invariants checked after every example, and the fault report (``conftest.record``).

A call never raises: it returns an :class:`Outcome` (OK, or the gRPC code, the ``sg-error``
class and the details). ``check_typed`` is the invariant every answer must meet: OK, or a
typed error (a class of proto/errors.py in ``sg-error``), never INTERNAL/UNKNOWN. Nothing
is tolerated: every daemon bug the fuzzing found is fixed (test_fuzz.py's ``test_bug_*``
tests keep each fixed).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import psutil
import zmq
from hypothesis import strategies as st

from shardguard.daemon.service import cluster
from shardguard.daemon.transport.auth import METADATA_KEY, Authenticator, grpc_context, zmq_context
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto import errors as E
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.paths import grpc_target
from conftest import record

SHM = "/dev/shm"
CALL_TIMEOUT_S = 30.0
TYPED = frozenset(E._BY_NAME)  # every class the client can turn back into itself

# ------------------------------------------------- tallies and the fault report
# One line per test to $SHARDGUARD_FAULT_REPORT (make faults), by conftest.record.


@dataclass
class Tally:
    """What one fuzz test saw: examples run, and the answers."""

    trials: int = 0
    # Answers seen ("OK" or the error class): printed, to see how deep the fuzzing reached.
    seen: collections.Counter = field(default_factory=collections.Counter)


class recording:
    """``with recording("category") as t:`` records the trials and the outcome at exit.

    ``bug`` names the fixed daemon bug a regression test keeps fixed (in the outcome).
    """

    def __init__(self, category: str, bug: str = "") -> None:
        self.category, self.bug, self.tally = category, bug, Tally()

    def __enter__(self) -> Tally:
        return self.tally

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        trials = max(self.tally.trials, 1)
        if self.tally.seen:
            print(f"{self.category}: {dict(self.tally.seen.most_common())}")
        if exc is None:
            # No counts in the outcome: the table joins the distinct outcomes of a category.
            record(self.category, trials,
                   "survived" + (f" (bug {self.bug} stays fixed)" if self.bug else ""))
        else:
            record(self.category, trials, f"FAILED: {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}")


# ------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    error: str = ""    # the sg-error class name, "" when absent
    details: str = ""
    reply: Any = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    def __str__(self) -> str:
        return f"{self.code.name} sg-error={self.error!r} {self.details[:300]!r}"


def outcome_of(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(grpc.StatusCode.OK, reply=fn())
    except grpc.RpcError as exc:
        name = next((v for k, v in exc.trailing_metadata() or () if k == E.ERROR_METADATA_KEY),
                     "")
        return Outcome(exc.code(), name, exc.details() or "")


def check_typed(method: str, o: Outcome, tally: Tally,
                extra_ok: Callable[[Outcome], bool] | None = None) -> None:
    """The invariant on every answer: OK or a typed error."""
    tally.seen[f"{method}:{'OK' if o.ok else o.error or o.code.name}"] += 1
    if o.ok:
        return
    if o.error in TYPED and o.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return
    if o.error == "CodecError" and o.code == grpc.StatusCode.INTERNAL:
        return  # typed, and INTERNAL by the one mapping (proto/errors.py)
    if extra_ok is not None and extra_ok(o):
        return
    raise AssertionError(f"{method}: untyped answer {o}")


# ------------------------------------------------------------------ the agent


def agent_channel(socket: str) -> grpc.Channel:
    return grpc.insecure_channel(grpc_target(socket),
                                 options=[("grpc.max_send_message_length", 16 << 20)])


def agent_call(ch: grpc.Channel, method: str, request: Any) -> Outcome:
    stub = pb_grpc.AgentStub(ch)
    return outcome_of(lambda: getattr(stub, method)(request, timeout=CALL_TIMEOUT_S))


def raw_call(ch: grpc.Channel, full_method: str, data: bytes,
             metadata: list[tuple[str, str]] | None = None,
             parse: Callable[[bytes], Any] | None = None) -> Outcome:
    """Send ``data`` as the serialized request, unparsed (identity serializer)."""
    fn = ch.unary_unary(full_method, request_serializer=None, response_deserializer=parse)
    return outcome_of(lambda: fn(data, timeout=CALL_TIMEOUT_S, metadata=metadata))


def restorable(socket: str, job: str) -> int | None:
    with agent_channel(socket) as ch:
        st = pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=CALL_TIMEOUT_S)
    for j in st.jobs:
        if j.job == job:
            return j.restorable_step if j.HasField("restorable_step") else None
    return None


def jobs_of(socket: str) -> list[str]:
    with agent_channel(socket) as ch:
        st = pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=CALL_TIMEOUT_S)
    return [j.job for j in st.jobs]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardguard.daemon.service.cli", *args],
                          capture_output=True, text=True, timeout=240)


def assert_verify_healthy(socket: str, job: str) -> None:
    r = cli("verify", "--job", job, "--socket", socket)
    assert r.returncode == 0 and "verdict: healthy" in r.stdout, r.stdout + r.stderr


def shm_files(prefix: str) -> set[str]:
    return {os.path.basename(p) for p in glob.glob(os.path.join(SHM, glob.escape(prefix) + ".*"))}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -------------------------------------------------------------------- peers


class Peer:
    """An authenticated rogue peer of one cluster node (it holds the cluster's secret)."""

    def __init__(self, control: str, data: str, secret: bytes) -> None:
        self.control, self.data = control, data
        self.auth = Authenticator(secret)
        self.channel = grpc.insecure_channel(control)
        self._zmq = zmq.Context()

    def close(self) -> None:
        self.channel.close()
        self._zmq.destroy(linger=0)

    def call(self, method: str, request: Any, token: str | None = None) -> Outcome:
        """A peer call signed with the secret (or carrying ``token`` as given)."""
        full = f"/shardguard.v1.Peer/{method}"
        reply = getattr(ppb, f"{method}Reply")
        return self.raw(full, request.SerializeToString(), token, reply.FromString)

    def raw(self, full_method: str, data: bytes, token: str | None = None,
            parse: Callable[[bytes], Any] | None = None) -> Outcome:
        if token is None:
            token = self.auth.sign(grpc_context(self.control, full_method, data))
        return raw_call(self.channel, full_method, data, [(METADATA_KEY, token)], parse)

    def sign_zmq(self, kind: bytes, header: bytes) -> bytes:
        return self.auth.sign(zmq_context(self.data, kind, header)).encode()

    def exchange(self, frames: list[bytes], wait_ms: int = 3000) -> list[bytes] | None:
        """Send one ZeroMQ message to the node's data plane; its first answer, or None."""
        sock = self._zmq.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{self.data}")
            sock.send_multipart(frames)
            if not sock.poll(wait_ms):
                return None
            return sock.recv_multipart()
        finally:
            sock.close(linger=0)

    def drain(self, frames: list[bytes], wait_ms: int = 3000) -> list[list[bytes]]:
        """Send one message and collect every answer until the plane goes quiet."""
        sock = self._zmq.socket(zmq.DEALER)
        out = []
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{self.data}")
            sock.send_multipart(frames)
            while sock.poll(wait_ms if not out else 100):
                out.append(sock.recv_multipart())
        finally:
            sock.close(linger=0)
        return out


def node_pid(root: Path, i: int) -> int:
    return int((root / f"node-{i}" / "daemon.pid").read_text())


@dataclass
class Cluster:
    """A running local cluster and what the tests need of it."""

    root: Path
    sockets: list[str]
    controls: list[str]
    datas: list[str]
    prefixes: list[str]
    secret: bytes

    @classmethod
    def up(cls, root: Path, nodes: int, group_size: int, parity: int) -> "Cluster":
        spec = cluster.up(str(root), nodes, group_size, parity)
        socks = cluster.sockets(str(root))
        controls, datas = [], []
        for s in socks:
            with agent_channel(s) as ch:
                st = pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=CALL_TIMEOUT_S)
            controls.append(st.address.control)
            datas.append(st.address.data)
        return cls(root, socks, controls, datas, [spec.node_prefix(i) for i in range(nodes)],
                   (root / "secret").read_bytes())

    def peer(self, i: int) -> Peer:
        return Peer(self.controls[i], self.datas[i], self.secret)

    def alive(self) -> list[bool]:
        return [alive(node_pid(self.root, i)) for i in range(len(self.sockets))]

    def log(self, i: int) -> str:
        return (self.root / f"node-{i}" / "daemon.log").read_text(errors="replace")


# --------------------------------------------------------------- strategies

#: Job names that must be refused (InvalidRequestError) wherever a job is named.
HOSTILE_JOBS = st.one_of(
    st.sampled_from(["", "../etc/passwd", "a/b", ".hidden", "x" * 65, "sp ace", "nul\x00x",
                     "-lead", "a.b", "..", "/", "job/../job", "\u00e9t\u00e9", "job\n",
                     "*", "job?", "[pqx]", "x" * 5000]),
    st.text(min_size=1, max_size=80).filter(lambda s: not re.match(
        r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\Z", s)),
)
#: Well-formed names of jobs that no daemon holds.
UNKNOWN_JOBS = st.from_regex(r"\Azz[a-z0-9_-]{0,12}\Z", fullmatch=True)
UINT32 = st.one_of(st.integers(0, 8), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.integers(0, 1 << 22), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]),
                   st.integers(0, 2**64 - 1))
INT64 = st.one_of(st.integers(-3, 20), st.sampled_from([-(2**63), 2**63 - 1, -1]),
                  st.integers(-(2**63), 2**63 - 1))
FORGED_LEASES = st.one_of(st.sampled_from(["", "0" * 32, "forged", "\x00" * 16]),
                          st.text(max_size=64), st.text(alphabet="0123456789abcdef",
                                                        min_size=32, max_size=32))


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                       st.text(max_size=20))
    return st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
        max_leaves=max_leaves)


def json_bytes(objects: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[bytes]:
    """Garbage for a JSON field: raw bytes, JSON of any shape, or JSON mangled a little."""
    objects = objects if objects is not None else json_values()
    dumped = objects.map(lambda v: json.dumps(v).encode())
    return st.one_of(
        st.binary(max_size=200), dumped,
        st.tuples(dumped, st.integers(0, 50)).map(lambda t: t[0][:max(0, len(t[0]) - t[1])]),
        st.sampled_from([b"", b"null", b"[]", b"{}", b"1", b'"s"', b"NaN", b"{" * 50,
                         b"\xff\xfe", b'{"step": "x"}', b'{"job": 1, "step": []}']),
    )
