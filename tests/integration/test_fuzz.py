"""Hostile input against real daemons (issue #5, item 4), driven by hypothesis.

1. Agent RPCs on the Unix socket: every method with hostile field values, and raw bytes
   as the serialized request.
2. Peer RPCs on TCP, validly signed with the cluster's secret so that they reach the
   handlers. An authenticated peer is trusted to change a job's state (Announce, DropJob,
   a complete set of stripe reports), so those are fuzzed only for other job names; the
   protected job ``job`` gets only what a trusted peer could not mean (steps it already
   passed, malformed documents).
3. ZeroMQ frames against a node's data plane: truncated, oversized, non-JSON, wrong
   fields, unsigned, replayed.
4. Garbage in /dev/shm when a daemon restarts.
5. A client that vanishes holding a claim; jobs whose names share a prefix.

After every example: the answer is OK or a typed error (``sg-error`` names a class of
proto/errors.py; never INTERNAL/UNKNOWN), every daemon is alive and answers, and the job
snapshotted before the fuzzing still has the same restorable step. At the end of a test:
that job restores bit-exact / ``shardguard verify`` says healthy, and no shm file is left
beyond the expected ones. Nothing is tolerated and no input is kept out: every daemon bug
this fuzzing found is fixed, and each has a ``test_bug_*`` regression test. Each test
appends (category, trials, outcome) to ``$SHARDGUARD_FAULT_REPORT`` when set;
SHARDGUARD_FUZZ_SCALE multiplies the examples.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import shardguard.client as sg
from shardguard.daemon.service import cluster
from shardguard.daemon.transport.auth import grpc_context
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import arena as fmt
from shardguard.proto import errors as E
from shardguard.proto import manifest as mf
from shardguard.proto import peer_pb2 as ppb
from _fuzz_support import (
    FORGED_LEASES,
    HOSTILE_JOBS,
    INT64,
    UINT32,
    UINT64,
    UNKNOWN_JOBS,
    Cluster,
    Peer,
    agent_call,
    agent_channel,
    assert_verify_healthy,
    check_typed,
    cli,
    jobs_of,
    json_bytes,
    json_values,
    raw_call,
    recording,
    restorable,
    shm_files,
)
from _support import assert_same_state, finish, run_trainer, trainer_log
from conftest import _STARTED, TEST_PREFIX, DaemonProc

STATE = {"w": torch.arange(50_000, dtype=torch.float32), "n": 7, "s": "kept"}
GOOD_STEP = 10
AGENT = "/shardguard.v1.Agent/"
AGENT_METHODS = ["Register", "Begin", "Seal", "Latest", "OpenForRestore", "Release",
                 "Unregister", "Drop", "Verify", "Status"]
PEER_METHODS = ["Offer", "Report", "Announce", "StepInfo", "DropJob", "VerifyLocal"]
# Examples per fuzz test: the fast run keeps the whole file near a minute and a half on
# 2 cores; the long run (-m slow) multiplies them.
LENGTHS = [pytest.param(1, id="fast"),
           pytest.param(20, id="long", marks=[pytest.mark.slow, pytest.mark.timeout(3600)])]


def fuzz(examples: int, strategy: st.SearchStrategy[Any], body: Any) -> None:
    """Run ``body`` on ``examples`` draws of ``strategy`` (real daemons: no deadline).

    ``SHARDGUARD_FUZZ_SCALE`` multiplies the number of examples."""
    examples = int(examples * float(os.environ.get("SHARDGUARD_FUZZ_SCALE", "1")))

    @settings(max_examples=max(1, examples), deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: Any) -> None:
        body(value)

    run()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# =====================================================================================
# 1. Agent RPCs over the Unix socket
# =====================================================================================


@dataclass
class Node:
    d: DaemonProc
    control: str
    good_files: set[str]
    channel: grpc.Channel


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    """One daemon (64 MiB budget, so that no fuzzed size allocates much) holding job
    ``good`` at step 10, snapshotted by a real client."""
    d = DaemonProc(tmp_path_factory.mktemp("fuzz-agent"), f"{TEST_PREFIX}{uuid.uuid4().hex[:10]}",
                   ["--memory-budget-bytes", "64MiB"])
    _STARTED.append(d)
    ch = None
    try:
        d.start()
        with sg.connect(d.socket, "good") as c:
            c.snapshot(GOOD_STEP, STATE).wait()
        ch = agent_channel(d.socket)
        yield Node(d, d.status().address.control, shm_files(d.prefix), ch)
    finally:
        if ch is not None:
            ch.close()
        d.stop()
        d.wipe()


@dataclass
class Claim:
    """The fuzzer's own claim on job ``fz`` (restorable step 5): a live lease to reach the
    checks behind the lease check."""

    node: Node
    lease: str = ""
    writing: tuple[int, int] | None = None  # (step, slot) begun and not sealed
    next_step: int = 100

    def ensure(self) -> None:
        if self.lease and "fz" in jobs_of(self.node.d.socket):
            return
        with sg.connect(self.node.d.socket, "fz") as c:
            if c.latest() is None:
                c.snapshot(5, {"x": torch.ones(1000)}).wait()
        o = agent_call(self.node.channel, "Register", pb.RegisterRequest(
            job="fz", rank=0, world_size=1, slot_bytes=256 << 10, pid=os.getpid(),
            local_ranks=[0]))
        assert o.ok, o
        self.lease, self.writing = o.reply.lease, None


@pytest.fixture
def claim(node: Node) -> Claim:
    c = Claim(node)
    c.ensure()
    return c


LIVE = "<the live lease>"  # replaced by the claim's lease when sent


SMALL = st.one_of(st.integers(0, 4), UINT32)
AGENT_JOBS = st.one_of(st.sampled_from(["good", "fz"]), UNKNOWN_JOBS, HOSTILE_JOBS)
SIZES = st.one_of(st.integers(0, 1 << 20).map(lambda n: n - n % 4096),
                  st.integers(0, 1 << 20), UINT64)
PAGES = st.integers(0, 64).map(lambda n: n * 4096)


@dataclass(frozen=True)
class Spec:
    """A request drawn as a sound one (``base``) with up to three fields made hostile:
    most examples then get past the first check and reach the deeper ones."""

    cls: Any
    base: dict[str, st.SearchStrategy[Any]]
    hostile: dict[str, st.SearchStrategy[Any]]

    def strategy(self) -> st.SearchStrategy[Any]:
        @st.composite
        def build(draw: Any) -> Any:
            fields = {k: draw(v) for k, v in self.base.items()}
            for k in draw(st.lists(st.sampled_from(sorted(self.hostile)), max_size=3,
                                   unique=True)):
                fields[k] = draw(self.hostile[k])
            return fields

        return build()


def agent_spec(method: str, node: Node) -> Spec:
    """The sound request is the fuzzer's own job ``fz`` with its live lease (or, for
    read-only calls, job ``good``); ``good`` appears otherwise only where it is refused."""
    own = {"job": st.just("fz"), "rank": st.just(0), "lease": st.just(LIVE)}
    bad = {"job": AGENT_JOBS, "rank": SMALL, "lease": FORGED_LEASES}
    if method == "Register":
        addr = st.one_of(st.just(node.control), st.sampled_from(
            ["127.0.0.1:1", "", "[::1]:1", "localhost:1", "unix:/nonexistent"]),
            st.text(max_size=20))
        me = st.builds(pb.NodeAddress, control=st.just(node.control), data=addr)
        other = st.builds(pb.NodeAddress, control=addr, data=addr)
        return Spec(pb.RegisterRequest, {
            "job": UNKNOWN_JOBS, "rank": st.just(0), "world_size": st.integers(1, 2),
            "slot_bytes": st.integers(1, 1 << 20), "pid": st.just(os.getpid()),
            "local_ranks": st.just([]), "force": st.booleans(),
            "nodes": st.one_of(st.just([]), st.tuples(me, st.lists(other, min_size=1,
                                                                   max_size=3))
                               .map(lambda t: [t[0], *t[1]])),
            "node_index": st.just(0), "group_size": st.integers(0, 4), "parity": st.integers(0, 2),
        }, {
            # "good" is re-registered only with a world size it does not have: refused.
            "job": st.one_of(HOSTILE_JOBS, st.just("good")), "rank": SMALL, "world_size": SMALL,
            "slot_bytes": st.one_of(st.just(0), UINT64),
            "pid": st.one_of(st.sampled_from([0, 1, dead_pid(), 2**32 - 1]), UINT32),
            "local_ranks": st.lists(SMALL, max_size=5), "force": st.just(True),
            "nodes": st.lists(other, max_size=5), "node_index": SMALL, "group_size": SMALL,
            "parity": SMALL,
        })
    if method == "Begin":
        return Spec(pb.BeginRequest, {**own, "step": st.just("<next>")}, {**bad, "step": INT64})
    if method == "Seal":
        return Spec(pb.SealRequest, {
            **own, "begin": st.just(True), "step": st.just("<begun>"), "slot": st.just("<begun>"),
            "data_bytes": st.integers(0, 8192), "manifest_offset": st.just(8192),
            "manifest_bytes": st.integers(1, 4096)}, {
            **bad, "begin": st.just(False), "step": INT64, "slot": SMALL, "data_bytes": SIZES,
            "manifest_offset": st.one_of(PAGES, SIZES), "manifest_bytes": SIZES})
    if method == "Latest":
        return Spec(pb.LatestRequest, {"job": st.sampled_from(["good", "fz"])},
                    {"job": AGENT_JOBS})
    if method in ("OpenForRestore", "Release"):
        cls = pb.OpenRequest if method == "OpenForRestore" else pb.ReleaseRequest
        return Spec(cls, {**own, "step": st.sampled_from([-1, 5])},
                    {**bad, "step": st.one_of(st.just(GOOD_STEP), INT64)})
    if method == "Unregister":
        return Spec(pb.UnregisterRequest, own, bad)
    if method == "Drop":
        # Never "good": dropping a job is what Drop is for.
        return Spec(pb.DropRequest, {"job": UNKNOWN_JOBS, "everywhere": st.booleans()},
                    {"job": st.one_of(st.just("fz"), HOSTILE_JOBS)})
    if method == "Verify":
        return Spec(pb.VerifyRequest, {"job": st.sampled_from(["good", "fz"]),
                                       "step": st.none()},
                    {"job": AGENT_JOBS, "step": st.one_of(st.sampled_from([5, GOOD_STEP]),
                                                          INT64)})
    if method == "Status":
        return Spec(pb.StatusRequest, {"job": st.sampled_from(["", "good", "fz"])},
                    {"job": AGENT_JOBS})
    raise AssertionError(method)


def agent_requests(method: str, node: Node) -> st.SearchStrategy[dict[str, Any]]:
    return agent_spec(method, node).strategy()


def send_agent(node: Node, claim: Claim, method: str, fields: dict[str, Any]
               ) -> tuple[Any, Any]:
    """Build the request (live lease filled in, a slot begun for Seal) and send it."""
    fields = dict(fields)
    if fields.get("lease") == LIVE:
        fields["lease"] = claim.lease
    if fields.get("step") == "<next>":
        fields["step"] = claim.next_step
    if fields.pop("begin", False) and fields["job"] == "fz" and fields["lease"] == claim.lease:
        o = agent_call(node.channel, "Begin", pb.BeginRequest(
            job="fz", rank=0, lease=claim.lease, step=claim.next_step))
        assert o.ok, o
        claim.writing = (claim.next_step, o.reply.slot)
        claim.next_step += 1
    for key, i in (("step", 0), ("slot", 1)):
        if fields.get(key) == "<begun>":
            fields[key] = claim.writing[i] if claim.writing else 0
    if fields.get("step", 0) is None:
        del fields["step"]  # Verify: the optional step left unset
    if method == "Register" and fields["job"] == "good" and fields["world_size"] == 1:
        fields["world_size"] = 2  # refused: re-registering "good" as it is would be a claim
    req = agent_spec(method, node).cls(**fields)
    return req, agent_call(node.channel, method, req)


def agent_invariants(node: Node) -> None:
    assert node.d.proc is not None and node.d.proc.poll() is None, node.d.log()
    assert restorable(node.d.socket, "good") == GOOD_STEP


JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def after_success(node: Node, claim: Claim, method: str, req: Any, o: Any,
                  tally: Any) -> None:
    """What an accepted request must mean, and putting the fuzzer's claim back."""
    if method == "Register":
        assert JOB_NAME.fullmatch(req.job), repr(req.job)  # N1
        assert os.path.exists(o.reply.arena_path)
        assert o.reply.arena_bytes <= 64 << 20  # the budget
        d = agent_call(node.channel, "Drop", pb.DropRequest(job=req.job))
        assert d.ok, d
        assert not os.path.exists(o.reply.arena_path)
    elif method in ("Unregister", "Drop") and req.job == "fz":
        claim.lease = ""
        claim.ensure()
    elif method == "OpenForRestore":
        r = agent_call(node.channel, "Release", pb.ReleaseRequest(
            job=req.job, rank=req.rank, lease=req.lease, step=o.reply.step))
        assert r.ok, r
    elif method == "Seal":
        claim.writing = None
    elif method == "Begin" and req.job == "fz":
        claim.writing = (req.step, o.reply.slot)
        if req.step < 2**63 - 1:
            claim.next_step = max(claim.next_step, req.step + 1)
    elif method == "Verify" and req.job == "good":
        assert o.reply.step == GOOD_STEP and o.reply.bad_ranks == 0


def agent_epilogue(node: Node) -> None:
    """The snapshot taken before the fuzzing restores bit-exact and verifies; the fuzzer's
    jobs dropped, nothing is left in shm but job good's files."""
    with sg.connect(node.d.socket, "good") as c:
        step, got = c.restore()
    assert step == GOOD_STEP
    assert_same_state(STATE, got)
    assert_verify_healthy(node.d.socket, "good")
    for job in jobs_of(node.d.socket):
        if job != "good":
            o = agent_call(node.channel, "Drop", pb.DropRequest(job=job))
            assert o.ok, o
    assert shm_files(node.d.prefix) == node.good_files


# Register's fast run (arenas made and dropped per example) takes half a minute: it runs
# with the slow tests, with the long runs of every method.
@pytest.mark.parametrize("method", [pytest.param(m, marks=[pytest.mark.slow] if m == "Register"
                                                 else []) for m in AGENT_METHODS])
@pytest.mark.parametrize("length", LENGTHS)
def test_agent_requests_with_hostile_fields(node: Node, claim: Claim, method: str,
                                            length: int) -> None:
    with recording(f"agent rpc {method}: hostile fields") as tally:
        def one(drawn: Any) -> None:
            tally.trials += 1
            req, o = send_agent(node, claim, method, drawn)
            check_typed(method, o, tally)
            if o.ok:
                after_success(node, claim, method, req, o, tally)
            agent_invariants(node)

        fuzz(25 * length, agent_requests(method, node), one)
        agent_epilogue(node)


def invalid_utf8_field(number: int) -> st.SearchStrategy[bytes]:
    """A length-delimited field whose bytes are not UTF-8 (proto3 strings must be)."""
    return st.binary(min_size=1, max_size=30).map(
        lambda b: bytes([number << 3 | 2, len(b) + 1]) + b"\xff" + b)


def raw_requests(node: Node) -> st.SearchStrategy[tuple[str, bytes]]:
    # Serialized requests of every method, then mutated. Never naming "good": a
    # RegisterRequest read as a DropRequest would be a valid drop of that job.
    def serialized(method: str) -> st.SearchStrategy[bytes]:
        spec = agent_spec(method, node)

        def encode(fields: dict[str, Any]) -> bytes:
            fields = {k: (0 if v in ("<next>", "<begun>") else "x" * 32 if v == LIVE else v)
                      for k, v in fields.items() if k != "begin" and v is not None}
            return spec.cls(**fields).SerializeToString()

        return spec.strategy().map(encode)

    valid = st.sampled_from(AGENT_METHODS).flatmap(serialized)
    mutated = st.tuples(valid, st.integers(0, 400), st.integers(0, 255)).map(
        lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:])
    truncated = st.tuples(valid, st.integers(1, 40)).map(lambda t: t[0][:-t[1]])
    data = st.one_of(st.binary(max_size=300), invalid_utf8_field(1), mutated, truncated,
                     st.sampled_from([b"\xff", b"\x0a\xff", b"\x08" + b"\xff" * 11,
                                      b"\x0a\x80\x80\x80\x80\x10"]))
    return st.tuples(st.sampled_from(AGENT_METHODS), data).filter(
        lambda t: b"good" not in t[1])


@pytest.mark.slow  # both lengths: the fast one takes 20 s
@pytest.mark.parametrize("length", LENGTHS)
def test_agent_raw_bytes_as_the_request(node: Node, claim: Claim, length: int) -> None:
    with recording("agent rpc: raw bytes as the serialized request") as tally:
        def one(drawn: tuple[str, bytes]) -> None:
            tally.trials += 1
            method, data = drawn
            o = raw_call(node.channel, AGENT + method, data)
            check_typed(method, o, tally)
            agent_invariants(node)
            claim.ensure()

        fuzz(60 * length, raw_requests(node), one)
        agent_epilogue(node)


def manifests() -> st.SearchStrategy[bytes]:
    """Manifests a hostile client could seal: near-valid documents, mangled ones, garbage."""
    tree = st.recursive(
        st.one_of(
            st.fixed_dictionaries({"t": st.sampled_from(["none", "int", "str", "float", "bool",
                                                         "exec", ""])},
                                  optional={"v": json_values(4)}),
            st.fixed_dictionaries({"t": st.sampled_from(["tensor", "ndarray", "bytes",
                                                         "pickle"]),
                                   "off": st.integers(-10, 1 << 13),
                                   "n": st.integers(-10, 1 << 13)},
                                  optional={"dtype": st.sampled_from(["float32", "<f4", "x",
                                                                      "bfloat16", "object"]),
                                            "shape": st.lists(st.integers(-2, 64), max_size=3)})),
        lambda kids: st.one_of(
            st.fixed_dictionaries({"t": st.sampled_from(["list", "tuple"]),
                                   "v": st.lists(kids, max_size=3)}),
            st.fixed_dictionaries({"t": st.just("dict"), "k": st.lists(kids, max_size=3),
                                   "v": st.lists(kids, max_size=3)})),
        max_leaves=8)
    doc = st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 2, "1", None]), "step": st.just("<step>"),
         "data_bytes": st.just("<data>"), "tree": tree})
    text = doc.map(json.dumps)
    return st.one_of(
        text.map(str.encode),
        st.tuples(text, st.integers(0, 60)).map(lambda t: t[0][:-t[1] or None].encode()),
        st.binary(min_size=1, max_size=300),
        json_values().map(lambda v: json.dumps(v).encode()),
        # Beyond Python's int-conversion limit (4300 digits).
        st.integers(4301, 6000).map(
            lambda n: b'{"v": 1, "step": <step>, "data_bytes": ' + b"9" * n + b', "tree": {}}'),
    )


@pytest.mark.parametrize("length", LENGTHS)
def test_seal_with_a_hostile_manifest(node: Node, claim: Claim, length: int) -> None:
    """A client writes any bytes as its manifest and seals: accepted as a valid manifest
    or refused with ManifestError/InvalidRequestError, never INTERNAL."""
    with recording("agent rpc Seal: hostile manifest bytes") as tally:
        def one(drawn: tuple[bytes, int]) -> None:
            tally.trials += 1
            raw, data_bytes = drawn
            step = claim.next_step
            claim.next_step += 1
            o = agent_call(node.channel, "Begin", pb.BeginRequest(
                job="fz", rank=0, lease=claim.lease, step=step))
            assert o.ok, o
            slot = o.reply.slot
            raw = raw.replace(b'"<step>"', str(step).encode()).replace(
                b"<step>", str(step).encode()).replace(
                b'"<data>"', str(data_bytes).encode())
            reg = agent_call(node.channel, "Status", pb.StatusRequest(job="fz")).reply
            arena = reg.jobs[0].ranks[0]
            slot_bytes = (arena.arena_bytes - fmt.HEADER_BYTES) // fmt.NSLOTS
            mm = np.memmap(arena.arena_path, dtype=np.uint8, mode="r+")
            base = fmt.slot_offset(slot, slot_bytes) + 8192
            mm[base:base + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            mm.flush()
            del mm
            o = agent_call(node.channel, "Seal", pb.SealRequest(
                job="fz", rank=0, lease=claim.lease, step=step, slot=slot, data_bytes=data_bytes,
                manifest_offset=8192, manifest_bytes=len(raw)))
            check_typed("Seal", o, tally)
            if not o.ok:
                assert o.error in ("ManifestError", "InvalidRequestError"), o
            elif o.ok:
                mf.parse(raw, data_bytes)  # what the daemon accepted is a valid manifest
            agent_invariants(node)

        fuzz(40 * length, st.tuples(manifests(), st.sampled_from([0, 64, 4096, 8192])), one)
        agent_epilogue(node)


# ------------------------------------------------------------------ agent bugs


# Regression test of BUG A1 (found by this fuzzing, fixed in the daemon).
def test_bug_undecodable_request_is_untyped(node: Node) -> None:
    with recording("agent rpc: undecodable request", bug="A1") as tally:
        for method, data in [("Status", b"\xff"), ("Latest", b"\x0a\x02\xff\xfe"),
                             ("Drop", b"\x0a\x80\x80\x80\x80\x10")]:
            tally.trials += 1
            o = raw_call(node.channel, AGENT + method, data)
            assert o.code == grpc.StatusCode.INVALID_ARGUMENT, o
            assert o.error == "InvalidRequestError", o
        agent_invariants(node)


# Regression test of BUG A3 (found by this fuzzing, fixed in the daemon).
def test_bug_a_non_ascii_lease_is_untyped(node: Node, claim: Claim) -> None:
    with recording("agent rpc: a lease that is not ASCII", bug="A3") as tally:
        for job in ("fz", "good"):
            tally.trials += 1
            o = agent_call(node.channel, "Begin", pb.BeginRequest(
                job=job, rank=0, lease="\u00e9t\u00e9", step=claim.next_step))
            assert o.error == "LeaseError", o
        agent_invariants(node)


# Regression test of BUG N1 (found by this fuzzing, fixed in the daemon).
def test_bug_a_job_name_with_a_trailing_newline_is_accepted(node: Node) -> None:
    with recording("agent rpc: a job name ending in a newline", bug="N1"):
        o = agent_call(node.channel, "Register", pb.RegisterRequest(
            job="good\n", rank=0, world_size=1, slot_bytes=4096, pid=os.getpid()))
        if o.ok:
            agent_call(node.channel, "Drop", pb.DropRequest(job="good\n"))
        assert o.error == "InvalidRequestError", o
        for method, req in [("Latest", pb.LatestRequest(job="good\n")),
                            ("Status", pb.StatusRequest(job="good\n"))]:
            o = agent_call(node.channel, method, req)
            assert o.error == "InvalidRequestError", o
        agent_invariants(node)


# Regression test of BUG A2 (found by this fuzzing, fixed in the daemon).
def test_bug_manifest_with_a_huge_integer_is_untyped(node: Node, claim: Claim) -> None:
    with recording("agent rpc Seal: manifest with a 5000-digit integer", bug="A2"):
        step = claim.next_step
        o = agent_call(node.channel, "Begin", pb.BeginRequest(job="fz", rank=0,
                                                              lease=claim.lease, step=step))
        assert o.ok, o
        st_ = agent_call(node.channel, "Status", pb.StatusRequest(job="fz")).reply
        arena = st_.jobs[0].ranks[0]
        slot_bytes = (arena.arena_bytes - fmt.HEADER_BYTES) // fmt.NSLOTS
        raw = b'{"v": 1, "step": ' + b"1" * 5000 + b', "data_bytes": 0, "tree": {"t": "none"}}'
        mm = np.memmap(arena.arena_path, dtype=np.uint8, mode="r+")
        base = fmt.slot_offset(o.reply.slot, slot_bytes) + 4096
        mm[base:base + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        mm.flush()
        del mm
        o = agent_call(node.channel, "Seal", pb.SealRequest(
            job="fz", rank=0, lease=claim.lease, step=step, slot=o.reply.slot, data_bytes=0,
            manifest_offset=4096, manifest_bytes=len(raw)))
        assert o.error == "ManifestError", o
        agent_invariants(node)


# =====================================================================================
# 2. + 3. Peer RPCs and ZeroMQ frames against a 2-node cluster
# =====================================================================================


@dataclass
class Trained:
    """A 2-node cluster (group 2, parity 1: k = 1, so an offer never waits for others)
    with ``job`` (protected: its restorable step must never move during the fuzzing) and
    ``job_1`` (the fuzzers' playground: a multi-node job any message may target)."""

    c: Cluster
    step: int
    peers: list[Peer]
    meta: dict[str, Any]
    step1: int = 0  # job_1's restorable step
    previous: frozenset[int | None] = frozenset()  # job's previous restorable step(s)


def train(c: Cluster, out: Path, job: str, steps: int) -> Any:
    return run_trainer(out, job, ",".join(c.sockets), len(c.sockets), steps)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("fuzz-cluster")
    c = Cluster.up(base / "cluster", 2, 2, 1)
    peers: list[Peer] = []
    try:
        procs = [(train(c, base / f"run-{j}", j, 4), base / f"run-{j}") for j in ("job", "job_1")]
        for proc, out in procs:
            assert finish(proc) == 0, trainer_log(out)
        steps = {restorable(s, "job") for s in c.sockets}
        assert len(steps) == 1 and None not in steps, steps
        peers = [c.peer(i) for i in range(2)]
        info = peers[0].call("StepInfo", ppb.StepInfoRequest(job="job"))
        assert info.ok, info
        previous = {json.loads(Path(f"/dev/shm/{p}.job.meta").read_text())["previous_step"]
                    for p in c.prefixes}
        yield Trained(c, steps.pop(), peers, json.loads(info.reply.meta),
                      step1=restorable(c.sockets[0], "job_1"), previous=frozenset(previous))
    finally:
        for p in peers:
            p.close()
        cluster.down(str(base / "cluster"))


def cluster_invariants(t: Trained) -> None:
    assert t.c.alive() == [True, True], [t.c.log(i)[-2000:] for i in range(2)]
    assert [restorable(s, "job") for s in t.c.sockets] == [t.step, t.step]


def spent(t: Trained, step: int) -> bool:
    """A step of ``job`` that training has passed: not the restorable one, nor the
    previous restorable one (its slots and metadata the job may still roll back to)."""
    return step < t.step - 1 and step not in t.previous


def no_future(t: Trained, step: int) -> bool:
    """Not one of the next steps of ``job``: those belong to the training that follows."""
    return not t.step < step <= t.step + 1000


PEER_JOBS = st.one_of(st.just("job_1"), UNKNOWN_JOBS, HOSTILE_JOBS)
PIECE_BYTES = st.one_of(st.integers(0, 1 << 20), st.sampled_from([1 << 50, 2**63, 2**64 - 1]))


def meta_documents(t: Trained) -> st.SearchStrategy[bytes]:
    """Step metadata: the real one with fields replaced or removed, or any JSON at all."""
    def mangle(drop: list[str], put: dict[str, Any]) -> bytes:
        doc = {k: v for k, v in t.meta.items() if k not in drop}
        doc.update(put)
        return json.dumps(doc).encode()

    keys = st.sampled_from(["job", "step", "topology", "layouts", "stripes"])
    return st.one_of(
        json_bytes(),
        st.builds(mangle, st.lists(keys, max_size=3),
                  st.dictionaries(keys, json_values(6), max_size=2)))


def reports(t: Trained) -> st.SearchStrategy[bytes]:
    stripe = st.fixed_dictionaries(
        {"kind": st.sampled_from(["stripe", "parity", "other"])},
        optional={"group": st.one_of(st.integers(-1, 3), json_values(2)),
                  "stripe": st.one_of(st.integers(-1, 3), json_values(2)),
                  "index": st.integers(-1, 3), "plen": st.integers(-1, 1 << 20),
                  "pieces": json_values(4), "layouts": json_values(4)})
    return st.one_of(json_bytes(), stripe.map(lambda d: json.dumps(d).encode()))


def completes(report: bytes) -> bool:
    """Could this report make the coordinator announce a step (a trusted peer's word)?"""
    try:
        doc = json.loads(report)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("kind") == "stripe"


def peer_requests(t: Trained, method: str) -> st.SearchStrategy[tuple[int, Any]]:
    nodes = st.integers(0, 1)
    job_steps = INT64.filter(lambda s: spent(t, s))
    if method == "Offer":
        req = st.builds(
            ppb.OfferRequest, job=PEER_JOBS, step=INT64, stripe=SMALL, group=SMALL, index=SMALL,
            node=SMALL, piece_bytes=PIECE_BYTES, real_bytes=UINT64, crc=UINT32,
            layout=json_bytes())
        own = st.builds(ppb.OfferRequest, job=st.just("job"), step=job_steps,
                        stripe=st.integers(0, 2), group=st.integers(0, 1), index=SMALL,
                        node=SMALL, piece_bytes=PIECE_BYTES, real_bytes=UINT64, crc=UINT32,
                        layout=json_bytes())
        return st.tuples(nodes, st.one_of(req, own))
    if method == "Report":
        req = st.builds(ppb.ReportRequest, job=PEER_JOBS, step=INT64, node=SMALL,
                        report=reports(t))
        own = st.builds(ppb.ReportRequest, job=st.just("job"),
                        step=INT64.filter(lambda s: no_future(t, s) and s != t.step),
                        node=SMALL, report=reports(t).filter(lambda r: not completes(r)))
        return st.tuples(nodes, st.one_of(req, own))
    if method == "Announce":
        req = st.builds(
            ppb.AnnounceRequest, job=PEER_JOBS,
            step=st.one_of(st.sampled_from([t.step1, t.step1 + 1, 2**63 - 1]), INT64),
            meta=meta_documents(t))
        return st.tuples(nodes, req)
    if method == "StepInfo":
        return st.tuples(nodes, st.builds(ppb.StepInfoRequest,
                                          job=st.one_of(st.just("job"), PEER_JOBS)))
    if method == "DropJob":
        return st.tuples(nodes, st.builds(ppb.DropJobRequest,
                                          job=st.one_of(UNKNOWN_JOBS, HOSTILE_JOBS)))
    if method == "VerifyLocal":
        return st.tuples(nodes, st.builds(
            ppb.VerifyLocalRequest, job=st.one_of(st.just("job"), PEER_JOBS),
            step=st.one_of(st.sampled_from([t.step, t.step - 1]), INT64)))
    raise AssertionError(method)


@pytest.mark.parametrize("method", PEER_METHODS)
@pytest.mark.parametrize("length", LENGTHS)
def test_peer_requests_with_hostile_fields(trained: Trained, method: str, length: int) -> None:
    t = trained
    with recording(f"peer rpc {method}: hostile fields (signed)") as tally:
        def one(drawn: tuple[int, Any]) -> None:
            tally.trials += 1
            i, req = drawn
            o = t.peers[i].call(method, req)
            check_typed(method, o, tally)
            if o.ok and method == "StepInfo" and req.job == "job":
                assert o.reply.step == t.step
            if o.ok and method == "VerifyLocal" and req.job == "job" and req.step == t.step:
                report = json.loads(o.reply.report)
                assert all(p["ok"] for p in report["pieces"]) and report["pieces"], report
            cluster_invariants(t)

        fuzz(25 * length, peer_requests(t, method), one)
        assert_verify_healthy(t.c.sockets[0], "job")


@pytest.mark.parametrize("length", LENGTHS)
def test_peer_raw_bytes_and_forged_tokens(trained: Trained, length: int) -> None:
    """Raw bytes as the request, signed (so that they reach deserialization and the
    handler) or carrying a garbage, empty or replayed token."""
    t = trained
    seen: list[tuple[int, str, bytes, str]] = []  # signed calls, to replay

    def send(i: int, m: str, data: bytes, how: str) -> Any:
        full = f"/shardguard.v1.Peer/{m}"
        if how == "replayed" and seen:
            i, full, data, token = seen[-1]
        elif how == "replayed elsewhere" and seen:
            j, full, data, token = seen[-1]  # to the other node: signed for node j
            i = 1 - j
        elif how == "signed":
            token = t.peers[i].auth.sign(grpc_context(t.peers[i].control, full, data))
            seen.append((i, full, data, token))
        else:
            token = {"garbage": "v1.123.abc.def", "empty": ""}.get(how, "v1.1.2.3")
        return t.peers[i].raw(full, data, token)

    data = st.one_of(st.binary(max_size=200), invalid_utf8_field(1),
                     st.sampled_from([b"\xff", b"\x0a\x03job\x10\xff"]))
    with recording("peer rpc: raw bytes, forged and replayed tokens") as tally:
        def one(drawn: tuple[int, str, bytes, str]) -> None:
            tally.trials += 1
            i, m, raw, how = drawn
            # Bytes that parse as a request naming the protected job may be a valid
            # Announce or DropJob for it: a trusted peer's word, not fuzzed.
            assume(b"job" not in raw)
            o = send(i, m, raw, how)
            check_typed(m, o, tally)
            if how != "signed":
                # Refused before any handler; bytes that do not parse are refused (typed)
                # even before authentication, which needs the parsed request.
                assert o.code == grpc.StatusCode.UNAUTHENTICATED or (
                    o.code == grpc.StatusCode.INVALID_ARGUMENT
                    and o.error == "InvalidRequestError" and "does not parse" in o.details), o
            cluster_invariants(t)

        fuzz(60 * length, st.tuples(st.integers(0, 1), st.sampled_from(PEER_METHODS), data,
                                    st.sampled_from(["signed", "garbage", "empty", "replayed",
                                                     "replayed elsewhere"])),
             one)


# Regression test of BUG P1/P2/P3/P10 (found by this fuzzing, fixed in the daemon).
def test_bug_peer_malformed_requests_are_untyped(trained: Trained) -> None:
    t = trained
    with recording("peer rpc: malformed signed requests", bug="P1/P2/P3/P10") as tally:
        bad = []
        for i, method, req in [
            (1, "Offer", ppb.OfferRequest(job="job", step=-5, group=7, stripe=0)),
            (1, "Offer", ppb.OfferRequest(job="job_1", step=10**9, group=0, stripe=1,
                                          piece_bytes=2**64 - 1)),
            (1, "Report", ppb.ReportRequest(job="job", step=-5, node=1, report=b"garbage")),
            (0, "Report", ppb.ReportRequest(job="job", step=-5, node=1, report=b"[]")),
            (0, "Report", ppb.ReportRequest(job="job", step=-5, node=1, report=b"{}")),
            (1, "Announce", ppb.AnnounceRequest(job="zzq", step=5, meta=b"garbage")),
            (1, "Announce", ppb.AnnounceRequest(job="a/b", step=5, meta=b"{}")),
            # A step already restorable: accepted, then the meta is used as an object.
            (1, "Announce", ppb.AnnounceRequest(job="job_1", step=-1, meta=b"null")),
        ]:
            tally.trials += 1
            o = t.peers[i].call(method, req)
            if o.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) or not o.error:
                bad.append(f"{method}: {o}")
        cluster_invariants(t)
        assert not bad, "\n".join(bad)


# Regression test of BUG P9 (found by this fuzzing, fixed in the daemon).
def test_bug_a_refused_announce_still_replaces_the_step_metadata(trained: Trained) -> None:
    # On job_1 of the 2-node cluster (node 1): what it poisons is the fuzzers' playground.
    t = trained
    with recording("peer rpc: refused Announce of a trained job", bug="P9"):
        info = t.peers[1].call("StepInfo", ppb.StepInfoRequest(job="job_1"))
        assert info.ok, info
        step, meta = info.reply.step, json.loads(info.reply.meta)
        future = step + 1000
        o = t.peers[1].call("Announce", ppb.AnnounceRequest(
            job="job_1", step=future, meta=json.dumps({**meta, "step": future}).encode()))
        assert o.error == "SlotStateError", o  # refused: no rank sealed that step
        assert restorable(t.c.sockets[1], "job_1") == step
        info = t.peers[1].call("StepInfo", ppb.StepInfoRequest(job="job_1"))
        assert info.ok and info.reply.step == step, info
        assert not os.path.exists(f"/dev/shm/{t.c.prefixes[1]}.job_1.x{future}")
        o = t.peers[1].call("Announce", ppb.AnnounceRequest(
            job="job_1", step=future + 1, meta=b'{"job": "job_1"}'))
        assert o.error and o.code != grpc.StatusCode.INTERNAL, o
        with agent_channel(t.c.sockets[1]) as ch:
            o = agent_call(ch, "Status", pb.StatusRequest())
        assert o.ok, o


# ------------------------------------------------------------------ ZeroMQ frames

KINDS = st.one_of(st.sampled_from([b"data", b"parity", b"fetch", b"chunk", b"error", b""]),
                  st.binary(max_size=10))
NUMS = st.one_of(st.integers(-2, 3), st.sampled_from([2**31, 2**63, -(2**63), 10**30]),
                 st.floats(allow_nan=False, allow_infinity=False),
                 st.sampled_from(["1", "x", None, [], {}, True]))


def zmq_messages(t: Trained) -> st.SearchStrategy[dict[str, Any]]:
    header = st.fixed_dictionaries({}, optional={
        "job": st.one_of(st.sampled_from(["job", "job_1"]), PEER_JOBS, st.integers()),
        "step": st.one_of(st.sampled_from([t.step, t.step - 1, t.step + 1]), NUMS, INT64),
        "group": NUMS, "stripe": NUMS, "index": NUMS, "off": NUMS, "n": NUMS,
        "plen": st.one_of(st.integers(-5, 1 << 20), st.sampled_from([1 << 50, 2**64])),
        "crc": NUMS, "req": json_values(6), "total": NUMS})
    raw_header = st.one_of(
        header.map(lambda h: json.dumps(h).encode()),
        json_bytes(),
        # Oversized: 1 MiB, and past the plane's 64 MiB message limit.
        st.sampled_from([1 << 20, 65 << 20]).map(lambda n: b"{" * n),
    )
    return st.fixed_dictionaries({
        "node": st.integers(0, 1),
        "kind": KINDS,
        "header": raw_header,
        "token": st.sampled_from(["signed", "signed", "signed", "garbage", "empty", "replay",
                                  "replay elsewhere", "other-header"]),
        "payload": st.one_of(st.none(), st.binary(max_size=9000)),
        "frames": st.one_of(st.none(), st.lists(st.binary(max_size=64), min_size=1,
                                                max_size=6)),
    })


def effective(h: Any, key: str) -> int | None:
    """The int the daemon would make of a header field (None: it would refuse it)."""
    try:
        return int(h[key])
    except Exception:  # noqa: BLE001 - whatever int() refuses, the daemon refuses too
        return None


def protected_harm(t: Trained, kind: bytes, raw: bytes) -> bool:
    """Would this signed message touch what ``job`` keeps, by taking part in the next
    steps (an authenticated peer's piece of them is trusted)?"""
    try:
        h = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(h, dict) or h.get("job") != "job":
        return False
    step = effective(h, "step")
    if kind not in (b"data", b"parity") or step is None:
        return False
    return t.step < step <= t.step + 1000  # the steps of the training that follows


def probe(peer: Peer, wait_ms: int = 10_000) -> None:
    """The plane still serves: a signed fetch of nothing gets its error answer."""
    hdr = json.dumps({"job": "zzprobe", "step": 1, "group": 0, "stripe": 0, "index": 0,
                      "req": "probe"}).encode()
    reply = peer.exchange([b"fetch", hdr, peer.sign_zmq(b"fetch", hdr)], wait_ms=wait_ms)
    assert reply is not None and reply[0] == b"error", f"data plane {peer.data} stopped: {reply}"


@pytest.mark.parametrize("length", LENGTHS)
def test_data_plane_frames(trained: Trained, length: int) -> None:
    """Every message gets an ``error`` answer, or nothing (a piece frame accepted, or a
    message over ZeroMQ's size limit, which drops the connection), or ``chunk`` answers
    to a signed fetch; the plane keeps serving after each."""
    t = trained
    # Signed messages sent, to replay to the node that took them (refused: its receiver
    # remembers the token) or to another node (refused: the token names its receiver).
    last: list[tuple[int, list[bytes]]] = []
    with recording("zeromq data plane: hostile frames") as tally:
        def one(m: dict[str, Any]) -> None:
            tally.trials += 1
            i, kind, raw, how = m["node"], m["kind"], m["header"], m["token"]
            peer = t.peers[i]
            if m["frames"] is not None:
                how, frames = "frames", m["frames"]
            elif how == "replay" and last:
                i, frames = last[-1]
                peer = t.peers[i]
            elif how == "replay elsewhere" and last:
                i, frames = last[-1]
                i = (i + 1) % len(t.peers)
                peer = t.peers[i]
            else:
                how = "empty" if how.startswith("replay") else how
                assume(not (how == "signed" and protected_harm(t, kind, raw)))
                token = {"signed": lambda: peer.sign_zmq(kind, raw),
                         "other-header": lambda: peer.sign_zmq(kind, raw + b" "),
                         "garbage": lambda: b"v1.1.2.3", "empty": lambda: b""}[how]()
                frames = [kind, raw, token] + ([m["payload"]] if m["payload"] is not None
                                               else [])
                if how == "signed":
                    last.append((i, frames))
            replies = peer.drain(frames, wait_ms=300)
            tally.seen[f"{how}:{kind[:8]!r}:" + (
                "no answer" if not replies else replies[0][0].decode() + ":"
                + str(json.loads(replies[0][1]).get("error", "")).split(":")[0])] += 1
            for r in replies:
                assert r[0] in (b"error", b"chunk"), r[:2]
                assert r[0] == b"error" or (how == "signed" and kind == b"fetch"), r[:2]
                json.loads(r[1])
            if sum(map(len, frames)) < 60 << 20:
                if how in ("garbage", "empty", "other-header", "replay elsewhere"):
                    assert replies and b"AuthenticationError" in replies[0][1], replies
                elif how == "replay":
                    assert replies and b"replayed" in replies[0][1], replies
                elif how == "frames":
                    assert replies and replies[0][0] == b"error", replies
            probe(peer)
            cluster_invariants(t)

        fuzz(60 * length, zmq_messages(t), one)
        assert_verify_healthy(t.c.sockets[1], "job")


def test_training_continues_after_the_fuzzing(trained: Trained, tmp_path: Path) -> None:
    """After everything above, the next steps of ``job`` still become restorable and
    verify healthy on every node (the planes serve, nothing was left half-done)."""
    t = trained
    with recording("after fuzzing: training goes on"):
        before = t.step
        proc = train(t.c, tmp_path / "more", "job", before + 5)
        assert finish(proc) == 0, trainer_log(tmp_path / "more")
        after = {restorable(s, "job") for s in t.c.sockets}
        assert len(after) == 1 and after.pop() > before
        t.step = restorable(t.c.sockets[0], "job")
        for s in t.c.sockets:
            assert_verify_healthy(s, "job")


def test_dropping_a_job_with_an_overlapping_name_leaves_the_other(trained: Trained) -> None:
    """``job_1`` (the fuzzers' playground, whatever they left in it) is dropped on every
    node: all its files go, ``job``'s stay and verify; then nothing is left in shm but
    ``job``'s files."""
    t = trained
    with recording("overlapping job names on a cluster (drop job_1, keep job)"):
        def files(i: int) -> set[str]:
            return shm_files(t.c.prefixes[i])

        def own(i: int, job: str) -> set[str]:
            return {f for f in files(i) if f.startswith(f"{t.c.prefixes[i]}.{job}.")}

        kept = [own(i, "job") for i in range(2)]
        r = cli("drop", "--job", "job_1", "--yes", "--socket", t.c.sockets[1])
        assert r.returncode == 0, r.stdout + r.stderr
        for i in range(2):
            assert not own(i, "job_1"), own(i, "job_1")
            assert own(i, "job") == kept[i]
            assert "job_1" not in jobs_of(t.c.sockets[i])
        cluster_invariants(t)
        for s in t.c.sockets:
            assert_verify_healthy(s, "job")
        # Only job's files are left: its meta, arena, the restorable step's (and the
        # previous restorable step's) metadata, its parity and parity pool; and the
        # daemon's own lock on its prefix.
        for i in range(2):
            step = t.step
            prev = json.loads(Path(f"/dev/shm/{t.c.prefixes[i]}.job.meta").read_text()
                              )["previous_step"]
            allowed = re.compile(rf"\.job\.(meta|r\d+|x({step}|{prev})|p{step}\.g\d+\.s\d+\.i\d+"
                                 rf"|q\.g\d+\.s\d+\.i\d+)\Z")
            extra = sorted(f for f in files(i) if not allowed.search(f[len(t.c.prefixes[i]):])
                           and f != f"{t.c.prefixes[i]}.lock")
            assert not extra, extra


# =====================================================================================
# Known bugs that damage what they touch: reproduced on a 3-node cluster of their own
# (group 3, parity 1; stripe s: parity on node s, its data piece q from node s+1+q).
# Each test uses its own node and checks only that node's part, so that they stay
# independent of each other's outcome and order.
# =====================================================================================


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("fuzz-victim")
    c = Cluster.up(base / "cluster", 3, 3, 1)
    peers: list[Peer] = []
    try:
        proc = train(c, base / "run", "job", 3)
        assert finish(proc) == 0, trainer_log(base / "run")
        steps = {restorable(s, "job") for s in c.sockets}
        assert len(steps) == 1 and None not in steps, steps
        peers = [c.peer(i) for i in range(3)]
        meta = json.loads(peers[0].call("StepInfo", ppb.StepInfoRequest(job="job")).reply.meta)
        yield Trained(c, steps.pop(), peers, meta)
    finally:
        for p in peers:
            p.close()
        cluster.down(str(base / "cluster"))


def local_parity_ok(t: Trained, i: int) -> bool:
    """Node ``i``'s own check of the restorable step: its parity piece is sound."""
    o = t.peers[i].call("VerifyLocal", ppb.VerifyLocalRequest(job="job", step=t.step))
    assert o.ok, o
    report = json.loads(o.reply.report)
    assert not report["superseded"], report
    parity = [p for p in report["pieces"] if p["parity"]]
    assert parity, report
    return all(p["ok"] for p in parity)


# Regression test of BUG Z3 (found by this fuzzing, fixed in the daemon).
def test_bug_a_data_frame_for_the_restorable_step_corrupts_its_parity(victim: Trained) -> None:
    t = victim
    with recording("zeromq: data frame for the restorable step", bug="Z3a"):
        assert local_parity_ok(t, 0)
        hdr = json.dumps({"job": "job", "step": t.step, "group": 0, "stripe": 0, "index": 0,
                          "off": 0, "n": 4096}).encode()
        replies = t.peers[0].drain([b"data", hdr, t.peers[0].sign_zmq(b"data", hdr),
                                    b"\x5a" * 4096], wait_ms=1000)
        probe(t.peers[0])
        assert local_parity_ok(t, 0), f"stored parity changed (answers: {replies})"


# Regression test of BUG Z3 (found by this fuzzing, fixed in the daemon).
def test_bug_a_parity_message_for_a_stored_piece_overwrites_it(victim: Trained) -> None:
    t = victim
    with recording("zeromq: parity message for a stored piece", bug="Z3b"):
        assert local_parity_ok(t, 1)
        hdr = json.dumps({"job": "job", "step": t.step, "group": 0, "stripe": 1, "index": 2,
                          "plen": 4096, "crc": 0, "off": 0, "n": 0}).encode()
        replies = t.peers[1].drain([b"parity", hdr, t.peers[1].sign_zmq(b"parity", hdr), b""],
                                   wait_ms=1000)
        probe(t.peers[1])
        assert local_parity_ok(t, 1), f"stored parity changed (answers: {replies})"


# Regression test of BUG Z1 (found by this fuzzing, fixed in the daemon).
def test_bug_a_deeply_nested_fetch_kills_the_data_plane(victim: Trained) -> None:
    t = victim
    with recording("zeromq: fetch with a deeply nested req", bug="Z1") as tally:
        where, piece = next((w, (idx, p)) for w, s in t.meta["stripes"].items()
                            for idx, p in s["pieces"].items() if p["node"] == 2)
        g, s = (int(x) for x in where.split("/"))
        peer = t.peers[2]
        # From deep (json.loads refuses: an error answer) to shallower, until a depth is
        # served: the depths in between are where json.dumps of the answer fails.
        for depth in range(1000, 900, -1):
            tally.trials += 1
            hdr = ('{"job": "job", "step": %d, "group": %d, "stripe": %d, "index": %s, '
                   '"req": %s}' % (t.step, g, s, piece[0], "[" * depth + "]" * depth)).encode()
            reply = peer.exchange([b"fetch", hdr, peer.sign_zmq(b"fetch", hdr)], wait_ms=3000)
            probe(peer, wait_ms=3000)
            if reply is not None and reply[0] == b"chunk":
                break


# Regression test of BUG P4/P6 (found by this fuzzing, fixed in the daemon).
def test_bug_announce_for_an_unknown_job_leaks_and_poisons(victim: Trained) -> None:
    t = victim
    with recording("peer rpc: Announce for an unknown job", bug="P4/P6"):
        before = shm_files(t.c.prefixes[0])
        for job, meta in [("zzghost", b"{}"), ("zzlist", b"[]")]:
            o = t.peers[0].call("Announce", ppb.AnnounceRequest(job=job, step=3, meta=meta))
            assert o.error == "UnknownJobError", o
            info = t.peers[0].call("StepInfo", ppb.StepInfoRequest(job=job))
            assert info.ok and not info.reply.HasField("step"), info
        assert shm_files(t.c.prefixes[0]) == before


# Regression test of BUG Z2 (found by this fuzzing, fixed in the daemon).
def test_bug_a_parity_message_for_an_unknown_job_leaves_a_file(victim: Trained) -> None:
    t = victim
    with recording("zeromq: parity for an unknown job", bug="Z2"):
        before = shm_files(t.c.prefixes[0])
        # (A far-future step of the real job from an authenticated peer is a trusted
        # peer's word: a node cannot tell it from a step its own ranks have not begun yet.)
        for job, step, plen in [("zzghost", 3, 8192), ("zzneg", 4, -5), ("job", 7, -4096),
                                ("job", 7, 3)]:
            hdr = json.dumps({"job": job, "step": step, "group": 0, "stripe": 0, "index": 2,
                              "plen": plen, "crc": 0, "off": 0, "n": 0}).encode()
            t.peers[0].drain([b"parity", hdr, t.peers[0].sign_zmq(b"parity", hdr), b""],
                             wait_ms=300)
        probe(t.peers[0])
        assert shm_files(t.c.prefixes[0]) == before


# Regression test of BUG R1 (found by this fuzzing, fixed in the daemon).
def test_bug_a_refused_register_still_rebuilds_ranks_into_the_node(victim: Trained) -> None:
    t = victim
    with recording("agent rpc: refused Register with a node list", bug="R1"):
        sock = t.c.sockets[1]
        before = shm_files(t.c.prefixes[1])
        nodes = [pb.NodeAddress(control=c, data=d) for c, d in zip(t.c.controls, t.c.datas)]
        with agent_channel(sock) as ch:
            o = agent_call(ch, "Register", pb.RegisterRequest(
                job="job", rank=1, world_size=3, slot_bytes=4096, pid=dead_pid(),
                local_ranks=[0, 1], nodes=nodes, node_index=1, group_size=5, parity=1))
            assert o.error == "InvalidRequestError", o
            st_ = agent_call(ch, "Status", pb.StatusRequest(job="job")).reply.jobs[0]
        assert list(st_.local_ranks) == [1] and [r.rank for r in st_.ranks] == [1], st_
        assert shm_files(t.c.prefixes[1]) == before


# =====================================================================================
# 4. Garbage in /dev/shm when a daemon starts
# =====================================================================================

VICTIM_STATE = {"v": torch.arange(30_000, dtype=torch.int64), "tag": "victim"}


def garbage_plans() -> st.SearchStrategy[dict[str, Any]]:
    """What is done to job ``victim``'s files (and which stray files appear) while the
    daemon is down. Covered elsewhere: a corrupt arena header (repaired) and garbage meta
    JSON (tests/unit/test_store.py, test_bad_input.py)."""
    step_values, rank_lists = json_values(3), json_values(3)
    stray = st.tuples(
        st.sampled_from(["victim", "good", "zzstray"]),
        st.sampled_from([".meta", ".x10", ".x3", ".x999", ".p3.g0.s0.i1", ".q.g0.s0.i1", ".r0",
                         ".r1", ".meta.tmp1"]),
        st.one_of(st.binary(max_size=200), json_bytes()),
    ).filter(lambda t: not (t[0] in ("victim", "good") and t[1] in (".meta", ".r0")))
    return st.fixed_dictionaries({
        "arena": st.one_of(
            st.just(("keep",)),
            st.tuples(st.just("truncate"), st.floats(0, 0.999)),
            st.tuples(st.just("extend"), st.integers(1, 1 << 16)),
            st.tuples(st.just("scribble"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
            st.just(("delete",))),
        "meta": st.one_of(
            st.just(("keep",)),
            st.tuples(st.just("garbage"), st.binary(max_size=300)),
            st.tuples(st.just("truncate"), st.floats(0, 0.999)),
            st.tuples(st.just("edit"), st.just("restorable_step"), step_values),
            st.tuples(st.just("edit"), st.just("local_ranks"), rank_lists),
            st.tuples(st.just("edit"), st.sampled_from(["world_size", "ranks", "job", "version"]),
                      json_values(3)),
            st.just(("delete",))),
        "strays": st.lists(stray, max_size=4),
    })


def apply_plan(d: DaemonProc, plan: dict[str, Any]) -> None:
    arena = f"/dev/shm/{d.prefix}.victim.r0"
    meta = f"/dev/shm/{d.prefix}.victim.meta"
    act = plan["arena"]
    if act[0] == "truncate":
        os.truncate(arena, int(os.path.getsize(arena) * act[1]))
    elif act[0] == "extend":
        os.truncate(arena, os.path.getsize(arena) + act[1])
    elif act[0] == "scribble":
        with open(arena, "r+b") as fh:
            fh.seek(int((os.path.getsize(arena) - len(act[2])) * act[1]))
            fh.write(act[2])
    elif act[0] == "delete":
        os.unlink(arena)
    act = plan["meta"]
    if act[0] == "garbage":
        Path(meta).write_bytes(act[1])
    elif act[0] == "truncate":
        os.truncate(meta, int(os.path.getsize(meta) * act[1]))
    elif act[0] == "edit":
        doc = json.loads(Path(meta).read_text())
        doc[act[1]] = act[2]
        Path(meta).write_text(json.dumps(doc))
    elif act[0] == "delete":
        os.unlink(meta)
    for name, ext, content in plan["strays"]:
        path = f"/dev/shm/{d.prefix}.{name}{ext}"
        Path(path).write_bytes(content)
        os.chmod(path, 0o600)


def restart(d: DaemonProc) -> str:
    """Kill and start ``d``; what it logged while starting."""
    d.kill()
    size = d.log_path.stat().st_size
    d.start()
    return d.log_path.read_bytes()[size:].decode(errors="replace")


@pytest.mark.parametrize("length", [pytest.param(1, id="fast"),
                                    pytest.param(8, id="long", marks=pytest.mark.slow)])
def test_restart_with_garbage_in_shm(daemon_factory: Any, length: int) -> None:
    """The daemon starts, keeps serving ``good`` bit-exact, and ``victim`` either is not
    adopted (and that is logged), or restores exactly what was snapshotted, or fails with
    a typed error: never a torn snapshot, never a crash."""
    d = daemon_factory()
    with sg.connect(d.socket, "good") as c:
        c.snapshot(GOOD_STEP, STATE).wait()
    good_files = set(d.shm_files())
    with recording("daemon restart with garbage in /dev/shm") as tally:
        def one(plan: dict[str, Any]) -> None:
            tally.trials += 1
            with sg.connect(d.socket, "victim") as c:
                c.snapshot(3, VICTIM_STATE).wait()
            d.kill()
            apply_plan(d, plan)
            log = restart(d)
            with sg.connect(d.socket, "good") as c:
                step, got = c.restore()
            assert step == GOOD_STEP
            assert_same_state(STATE, got)
            if "victim" in jobs_of(d.socket):
                try:
                    with sg.connect(d.socket, "victim") as c:
                        if c.latest() is not None:
                            step, got = c.restore()
                            assert step == 3  # a torn or other step is never served
                            assert_same_state(VICTIM_STATE, got)
                except sg.ShardguardError as exc:
                    assert type(exc).__name__ in E._BY_NAME and \
                        type(exc) is not sg.ShardguardError, repr(exc)
            elif plan["meta"][0] != "delete":
                assert "cannot adopt" in log, log
            # Start the next example clean: victim dropped, strays gone.
            for job in jobs_of(d.socket):
                if job != "good":
                    with agent_channel(d.socket) as ch:
                        o = agent_call(ch, "Drop", pb.DropRequest(job=job))
                    assert o.ok, o
            for f in set(d.shm_files()) - good_files:
                os.unlink(f)

        fuzz(6 * length, garbage_plans(), one)
    assert_verify_healthy(d.socket, "good")


# Regression test of BUG M2 (found by this fuzzing, fixed in the daemon).
def test_bug_a_meta_file_with_wrongly_typed_fields_breaks_status(daemon_factory: Any) -> None:
    d = daemon_factory()
    with recording("daemon restart: meta fields of the wrong type", bug="M2"):
        for job in ("good", "victim"):
            with sg.connect(d.socket, job) as c:
                c.snapshot(GOOD_STEP, STATE).wait()
        d.kill()
        meta = Path(f"/dev/shm/{d.prefix}.victim.meta")
        doc = json.loads(meta.read_text())
        doc["restorable_step"] = "7"
        meta.write_text(json.dumps(doc))
        d.start(timeout_s=8)  # start() waits for an answer to Status
        with agent_channel(d.socket) as ch:
            o = agent_call(ch, "Status", pb.StatusRequest())
        assert o.ok, o
        assert restorable(d.socket, "good") == GOOD_STEP


# Regression test of BUG P7 (found by this fuzzing, fixed in the daemon).
def test_bug_step_metadata_that_is_not_an_object_stops_the_daemon(daemon_factory: Any) -> None:
    d = daemon_factory()
    with recording("daemon restart: step metadata that is not a JSON object", bug="P7"):
        with sg.connect(d.socket, "good") as c:
            c.snapshot(GOOD_STEP, STATE).wait()
        d.kill()
        path = f"/dev/shm/{d.prefix}.zzghost.x3"
        Path(path).write_bytes(b"[]")
        try:
            d.start()
        finally:
            os.unlink(path)  # so that the fixture's own stop and wipe find a sane shm
        assert restorable(d.socket, "good") == GOOD_STEP


# Regression test of BUG M1 (found by this fuzzing, fixed in the daemon).
def test_bug_a_meta_file_naming_another_job_replaces_it(daemon_factory: Any) -> None:
    d = daemon_factory()
    with recording("daemon restart: a meta file whose content names another job", bug="M1"):
        with sg.connect(d.socket, "good") as c:
            c.snapshot(GOOD_STEP, STATE).wait()
            stale = Path(f"/dev/shm/{d.prefix}.good.meta").read_bytes()
            c.snapshot(GOOD_STEP + 1, {**STATE, "n": 8}).wait()
        d.kill()
        Path(f"/dev/shm/{d.prefix}.zz-copy.meta").write_bytes(stale)
        d.start()
        assert restorable(d.socket, "good") == GOOD_STEP + 1


# =====================================================================================
# 5. A client that vanishes holding a claim; job names that share a prefix
# =====================================================================================

HOLDER = r"""
import os, sys
import numpy as np
import grpc
from shardguard.proto import agent_pb2 as pb, agent_pb2_grpc as pb_grpc
from shardguard.proto import arena as fmt
from shardguard.proto.paths import grpc_target
stub = pb_grpc.AgentStub(grpc.insecure_channel(grpc_target(sys.argv[1])))
reg = stub.Register(pb.RegisterRequest(job="good", rank=0, world_size=1, slot_bytes=1 << 20,
                                       pid=os.getpid(), local_ranks=[0]))
stub.OpenForRestore(pb.OpenRequest(job="good", rank=0, lease=reg.lease, step=-1))
slot = stub.Begin(pb.BeginRequest(job="good", rank=0, lease=reg.lease, step=11)).slot
mm = np.memmap(reg.arena_path, dtype=np.uint8, mode="r+")
base = fmt.slot_offset(slot, reg.slot_bytes)
mm[base:base + 65536] = 0x5A  # half a snapshot: the process dies before it seals
mm.flush()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_client_that_vanishes_holding_a_claim(daemon: DaemonProc) -> None:
    """SIGKILLed while it holds the claim, a slot open for restore and a half-written step:
    a new process claims the rank, restores the old step exactly, and snapshots on."""
    with recording("client SIGKILLed holding a claim, a pin and a half-written step"):
        with sg.connect(daemon.socket, "good") as c:
            c.snapshot(GOOD_STEP, STATE).wait()
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, daemon.socket],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  start_new_session=True)
        try:
            assert holder.stdout.readline().strip() == b"held"
            st_ = daemon.status("good").jobs[0].ranks[0]
            assert st_.claimed and st_.pid == holder.pid
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
        finally:
            holder.kill()
            holder.wait(10)
            holder.stdout.close()
            holder.stdin.close()
        with sg.connect(daemon.socket, "good") as c:
            step, got = c.restore()
            assert step == GOOD_STEP
            assert_same_state(STATE, got)
            # Both slots cycle: the dead holder's pin and half-written slot are gone.
            for s in (GOOD_STEP + 1, GOOD_STEP + 2, GOOD_STEP + 3):
                c.snapshot(s, {**STATE, "n": s}).wait()
            step, got = c.restore()
        assert step == GOOD_STEP + 3 and got["n"] == GOOD_STEP + 3
        assert_verify_healthy(daemon.socket, "good")


def test_jobs_whose_names_share_a_prefix(daemon: DaemonProc) -> None:
    """Dropping ``a`` or ``job`` leaves ``a-b``, ``a_`` and ``job_1`` (files, restorable
    steps, verify), before and after a daemon restart."""
    names = ["a", "a-b", "a_", "job", "job_1", "job-"]
    with recording("overlapping job names on one daemon"):
        for i, job in enumerate(names):
            with sg.connect(daemon.socket, job) as c:
                c.snapshot(i, {"w": torch.full((1000,), float(i)), "job": job}).wait()
        for gone in ("a", "job"):
            with agent_channel(daemon.socket) as ch:
                o = agent_call(ch, "Drop", pb.DropRequest(job=gone))
            assert o.ok and o.reply.arenas_freed == 1, o
        kept = [j for j in names if j not in ("a", "job")]

        def check() -> None:
            assert sorted(jobs_of(daemon.socket)) == sorted(kept)
            for job in kept:
                i = names.index(job)
                with sg.connect(daemon.socket, job) as c:
                    step, got = c.restore()
                assert step == i and got["job"] == job and torch.equal(
                    got["w"], torch.full((1000,), float(i)))
                assert_verify_healthy(daemon.socket, job)
            files = {os.path.basename(f)[len(daemon.prefix) + 1:] for f in daemon.shm_files()}
            # The kept jobs' files, and the daemon's own lock on its prefix.
            assert files == {f"{j}.{x}" for j in kept for x in ("meta", "r0")} | {"lock"}

        check()
        daemon.kill()
        daemon.start()
        check()
