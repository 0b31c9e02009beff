"""Fixtures shared by the whole suite: real daemon processes, and a check that nothing leaks."""

from __future__ import annotations

import glob
import json
import os
import pwd
import signal
import threading
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

# Before gRPC is imported: this process forks daemons and trainers while its own
# channels are busy, and gRPC's fork handlers (on by default in grpcio 1.85) hung it
# inside fork() (make test, test_hostile_local). shardguard.proto sets the same default
# for trainers and daemons; here grpc comes first (tests/integration/test_fork_safety.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
import pytest  # noqa: E402

from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target

SHM = "/dev/shm"
TEST_PREFIX = "shardguard-t"
_STARTED: list["DaemonProc"] = []


class DaemonProc:
    """A real ``shardguard daemon`` subprocess with its own socket and shm prefix.

    ``user`` runs it as another uid (the test must be root), with ``python`` (the command
    that runs ``-m module`` for that user; default this interpreter); ``launcher`` is put
    before the command (a wrapper that, say, moves it into a cgroup and then execs it).
    """

    def __init__(self, workdir: Path, prefix: str, extra: list[str] | None = None, *,
                 user: int | None = None, python: list[str] | None = None,
                 launcher: list[str] | None = None) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "agent.sock")
        self.prefix = prefix
        self.extra = extra or []
        self.user = user
        self.python = python or [sys.executable]
        self.launcher = launcher or []
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once (see :meth:`start`)."""
        ids = {} if self.user is None else {
            "user": self.user, "group": pwd.getpwuid(self.user).pw_gid, "extra_groups": []}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, *self.python, "-m", "shardguard.daemon", "--socket",
                 self.socket, "--shm-prefix", self.prefix, "--log-level", "DEBUG", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **ids)
        return self.proc

    def start(self, timeout_s: float = 30.0) -> "DaemonProc":
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            if os.path.exists(self.socket):
                try:
                    self.status()
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up: {self.log()}")

    def status(self, job: str = "") -> pb.StatusReply:
        with grpc.insecure_channel(grpc_target(self.socket)) as ch:
            return pb_grpc.AgentStub(ch).Status(pb.StatusRequest(job=job), timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: the daemon dies as in a crash, its arenas stay in shm."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def shm_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(SHM, glob.escape(self.prefix) + ".*")))

    def wipe(self) -> None:
        for path in self.shm_files():
            os.unlink(path)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    """Start real daemons; every one is stopped and its shm freed at the end of the test."""
    made: list[DaemonProc] = []

    def make(extra: list[str] | None = None, start: bool = True, *,
             workdir: Path | None = None, **kwargs: Any) -> DaemonProc:
        if workdir is None:
            workdir = tmp_path / f"node{len(made)}"
            workdir.mkdir()
        d = DaemonProc(workdir, f"{TEST_PREFIX}{uuid.uuid4().hex[:10]}", extra, **kwargs)
        made.append(d)
        _STARTED.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.stop()
        d.wipe()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProc:
    return daemon_factory()


@pytest.fixture(autouse=True, scope="session")
def no_leaks() -> Iterator[None]:
    """Shared memory or daemon processes this session left behind fail the run.

    Only what this session started is checked, so suites can run side by side.
    """
    yield
    shm = [f for d in _STARTED for f in d.shm_files()]
    procs = [d.proc.pid for d in _STARTED if d.proc is not None and d.proc.poll() is None]
    if shm or procs:
        for f in shm:
            os.unlink(f)
        for pid in procs:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the suite left behind shm {shm} and daemon pids {procs}")


# ----------------------------------------------------------------- fault report
# ``make faults`` sets SHARDGUARD_FAULT_REPORT: every passing test of a module that
# names a FAULT_CATEGORY adds one trial to it (tests that count their own trials call
# record() and leave FAULT_CATEGORY unset). tests/fault_table.py makes the README table.

FAULT_REPORT_ENV = "SHARDGUARD_FAULT_REPORT"


def record(category: str, trials: int, outcome: str) -> None:
    path = os.environ.get(FAULT_REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"category": category, "trials": trials,
                                 "outcome": outcome}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    category = getattr(item.module, "FAULT_CATEGORY", None)
    if category and report.when == "call" and report.passed:
        record(category, 1, getattr(item.module, "FAULT_OUTCOME", "survived"))


# ----------------------------------------------------------- a terminated run tears down
# ``timeout``, CI and a user's kill send SIGTERM, whose default ends pytest at once: no
# fixture's teardown runs and the daemons and clusters it started (in sessions of their
# own, on purpose) stay with their shared memory. As KeyboardInterrupt, pytest stops the
# run and still tears every fixture down (and no_leaks kills what is left).


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
