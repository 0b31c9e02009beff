"""Wrong or hostile requests: a typed error naming the fault, the daemon keeps serving,
and the stored snapshot stays restorable (asserted after every one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch

import shardguard.client as sg
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto import arena as fmt
from shardguard.proto import errors as E
from shardguard.proto.paths import grpc_target

STATE = {"w": torch.arange(200_000, dtype=torch.float32), "n": 7}

FAULT_CATEGORY = 'bad or hostile request from a local process (one case per test)'
FAULT_OUTCOME = 'typed error naming the fault; daemon kept serving; stored snapshots untouched'


@pytest.fixture
def stored(daemon):
    """A daemon holding job 'good' with restorable step 10."""
    with sg.connect(daemon.socket, "good") as c:
        c.snapshot(10, STATE).wait()
    return daemon


def assert_still_restorable(daemon) -> None:
    with sg.connect(daemon.socket, "good") as c:
        step, got = c.restore()
    assert step == 10 and torch.equal(got["w"], STATE["w"]) and got["n"] == 7
    assert daemon.proc.poll() is None


def call(daemon, method: str, request) -> object:
    with grpc.insecure_channel(grpc_target(daemon.socket)) as ch:
        try:
            return getattr(pb_grpc.AgentStub(ch), method)(request, timeout=10)
        except grpc.RpcError as exc:
            raise E.error_from_rpc(exc) from None


def register(daemon, job="evil", rank=0, world=1, slot_bytes=1 << 20, **kw) -> pb.RegisterReply:
    return call(daemon, "Register", pb.RegisterRequest(
        job=job, rank=rank, world_size=world, slot_bytes=slot_bytes, pid=os.getpid(),
        local_ranks=kw.pop("local_ranks", [rank]), **kw))


@pytest.mark.parametrize("job", ["", "../etc/passwd", "a/b", ".hidden", "x" * 65, "sp ace",
                                 "nul\x00"])
def test_bad_job_names(stored, job) -> None:
    with pytest.raises(E.InvalidRequestError, match="job name"):
        register(stored, job=job)
    assert_still_restorable(stored)


@pytest.mark.parametrize("kw,match", [
    ({"rank": 3, "world": 2}, "rank 3 outside world"),
    ({"world": 0}, "world_size 0"),
    ({"slot_bytes": 0}, "slot_bytes"),
    ({"local_ranks": [0, 5]}, "local_ranks"),
    ({"local_ranks": [1], "world": 2}, "local_ranks"),
])
def test_bad_register_fields(stored, kw, match) -> None:
    with pytest.raises(E.InvalidRequestError, match=match):
        register(stored, **kw)
    assert_still_restorable(stored)


def test_unknown_job_and_rank(stored) -> None:
    with pytest.raises(E.UnknownJobError, match="nosuch"):
        call(stored, "Latest", pb.LatestRequest(job="nosuch"))
    with pytest.raises(E.UnknownJobError, match="nosuch"):
        call(stored, "OpenForRestore", pb.OpenRequest(job="nosuch", rank=0, lease="x", step=1))
    with pytest.raises(E.UnknownJobError, match="rank 5"):
        call(stored, "Begin", pb.BeginRequest(job="good", rank=5, lease="x", step=11))
    with pytest.raises(E.UnknownJobError):
        call(stored, "Drop", pb.DropRequest(job="nosuch"))
    assert_still_restorable(stored)


def test_wrong_lease_changes_nothing(stored) -> None:
    for method, req in [
        ("Begin", pb.BeginRequest(job="good", rank=0, lease="forged", step=11)),
        ("Seal", pb.SealRequest(job="good", rank=0, lease="forged", step=10, slot=0,
                                data_bytes=1, manifest_offset=4096, manifest_bytes=10)),
        ("OpenForRestore", pb.OpenRequest(job="good", rank=0, lease="forged", step=10)),
        ("Unregister", pb.UnregisterRequest(job="good", rank=0, lease="forged")),
    ]:
        with pytest.raises(E.LeaseError):
            call(stored, method, req)
    assert_still_restorable(stored)


def test_step_going_backwards(stored) -> None:
    with sg.connect(stored.socket, "good") as c:
        with pytest.raises(E.StepOrderError, match="not after the restorable step 10"):
            c.snapshot(9, STATE)
        with pytest.raises(E.StepOrderError):
            c.snapshot(10, STATE)
    assert_still_restorable(stored)


def test_state_over_the_budget(daemon_factory) -> None:
    d = daemon_factory(["--memory-budget-bytes", "8MiB"])
    with sg.connect(d.socket, "good") as c:
        c.snapshot(10, STATE).wait()
        with pytest.raises(E.BudgetExceededError, match="memory budget"):
            c.snapshot(11, {"huge": torch.zeros(4 << 20)})
        assert c.latest() == 10
    assert_still_restorable(d)


def test_second_client_cannot_claim_a_held_rank(stored) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, shardguard.client as sg; c = sg.connect(sys.argv[1], 'good'); "
         "print('held', flush=True); sys.stdin.read()", stored.socket],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    with holder:
        try:
            assert holder.stdout.readline().strip() == b"held"
            with pytest.raises(E.RankClaimedError, match=f"live process {holder.pid}"):
                sg.connect(stored.socket, "good")
        finally:
            holder.kill()
    assert_still_restorable(stored)  # the holder is dead: its claim lapses


def _evil_slot(daemon, step: int = 11) -> tuple[pb.RegisterReply, int, np.memmap]:
    """Register as rank 0 of 'good' (after the real client left) and begin a step."""
    reg = register(daemon, job="good", slot_bytes=8 << 20)
    slot = call(daemon, "Begin", pb.BeginRequest(job="good", rank=0, lease=reg.lease,
                                                 step=step)).slot
    mm = np.memmap(reg.arena_path, dtype=np.uint8, mode="r+")
    return reg, slot, mm


@pytest.mark.parametrize("manifest", [
    b"not json at all",
    b'{"v": 1, "step": 11, "data_bytes": 4096, "tree": {"t": "tensor", "dtype": "float32", '
    b'"shape": [4], "off": 4000, "n": 1000}}',
    b'{"v": 1, "step": 11, "data_bytes": 4096, "tree": {"t": "exec", "v": "rm -rf /"}}',
    b'{"v": 2, "step": 11, "data_bytes": 4096, "tree": {"t": "none"}}',
    b'{"v": 1, "step": 12, "data_bytes": 4096, "tree": {"t": "none"}}',
    b"[" * 5000 + b"]" * 5000,
])
def test_corrupt_manifest_is_refused_at_seal(stored, manifest) -> None:
    reg, slot, mm = _evil_slot(stored)
    base = fmt.slot_offset(slot, reg.slot_bytes)
    mm[base + 4096: base + 4096 + len(manifest)] = np.frombuffer(manifest, dtype=np.uint8)
    mm.flush()
    del mm
    with pytest.raises(E.ManifestError, match="manifest"):
        call(stored, "Seal", pb.SealRequest(job="good", rank=0, lease=reg.lease, step=11,
                                            slot=slot, data_bytes=4096, manifest_offset=4096,
                                            manifest_bytes=len(manifest)))
    assert_still_restorable(stored)


@pytest.mark.parametrize("fields,match", [
    ({"slot": 9}, "slot 9 out of range"),
    ({"manifest_offset": 100}, "page-aligned"),
    ({"manifest_offset": 1 << 40}, "does not fit"),
    ({"manifest_bytes": 0}, "does not fit"),
    ({"step": 12}, "not WRITING step 12"),
])
def test_bad_seal_fields(stored, fields, match) -> None:
    reg, slot, mm = _evil_slot(stored)
    del mm
    req = {"job": "good", "rank": 0, "lease": reg.lease, "step": 11, "slot": slot,
           "data_bytes": 0, "manifest_offset": 4096, "manifest_bytes": 10, **fields}
    with pytest.raises((E.InvalidRequestError, E.SlotStateError), match=match):
        call(stored, "Seal", pb.SealRequest(**req))
    assert_still_restorable(stored)


def test_corrupted_header_is_repaired_on_restart(stored) -> None:
    path = next(p for p in stored.shm_files() if p.endswith(".r0"))
    with open(path, "r+b") as fh:
        fh.write(b"\xde\xad\xbe\xef" * 64)
    stored.kill()
    stored.start()
    assert_still_restorable(stored)
    with open(path, "rb") as fh:
        assert fmt.unpack_header(fh.read(fmt.HEADER_BYTES)).slots[0].step in (10, -1)


def test_corrupted_meta_file_is_reported_not_adopted(stored) -> None:
    meta = next(p for p in stored.shm_files() if p.endswith(".meta"))
    with open(meta, "w") as fh:
        fh.write("{garbage")
    stored.kill()
    stored.start()
    assert "cannot adopt" in stored.log()
    with pytest.raises(E.UnknownJobError):
        call(stored, "Latest", pb.LatestRequest(job="good"))


def test_flipped_data_byte_is_detected_not_returned(stored) -> None:
    path = next(p for p in stored.shm_files() if p.endswith(".r0"))
    with open(path, "rb") as fh:
        header = fmt.unpack_header(fh.read(fmt.HEADER_BYTES))
    slot = next(i for i, s in enumerate(header.slots) if s.step == 10)
    off = fmt.slot_offset(slot, header.slot_bytes) + 1000
    with open(path, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)
        fh.seek(off)
        fh.write(bytes([b[0] ^ 0x40]))
    with sg.connect(stored.socket, "good") as c:
        with pytest.raises(sg.RestoreError, match="checksum"):
            c.restore()
    assert stored.proc.poll() is None
    assert stored.status().jobs[0].restorable_step == 10


def test_garbage_on_the_socket(stored) -> None:
    for payload in (os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512),
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 100000):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(stored.socket)
            try:
                s.sendall(payload)
                s.settimeout(2)
                s.recv(1024)
            except OSError:
                pass
    time.sleep(0.1)
    assert_still_restorable(stored)


def test_oversized_request_is_refused(stored) -> None:
    with pytest.raises(sg.ShardguardError):
        call(stored, "Latest", pb.LatestRequest(job="x" * (2 << 20)))
    assert_still_restorable(stored)
