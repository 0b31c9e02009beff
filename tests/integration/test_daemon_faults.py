"""Every daemon fault point x every fault, on a real 4-node cluster, with the invariants checked.

A fault is armed in the daemons' environment (daemon/base/faults.py:
``point@step@node:action``) and fires for real inside the daemon: SIGKILL
(a crash), SIGSTOP (a hung daemon) or a dropped connection. Points cover
every protocol step: a seal, the sealed node before sending, mid-transfer,
mid-encode, a finished parity not yet forwarded, the coordinator's
announcement half done, a replacement node catching up, a rebuild half done.

After every fault, whatever it was:

- training never stops and computes exactly the losses of an uninterrupted run;
- the restorable step seen by a node never moves backwards, and protection
  resumes within the run (a later step becomes restorable everywhere);
- a restart restores bit-exactly what was protected, on every rank;
- ``shardguard verify`` finds every checksum and every stripe sound;
- no daemon and no shared memory is left behind.

The fast cases run in ``make test``; the whole matrix is marked slow
(``make test-slow``, ``make faults``).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from shardguard.daemon.service import cluster
from conftest import record
from _support import restored_steps
from _support import (assert_matches_reference, assert_same_state, environ, reference_run, finish, run_trainer, status_of_socket,
                      trainer_log)
from test_cluster import (  # noqa: F401 - reference4 is a fixture
    STEPS,
    free_base_port,
    reference4,
)

SHM = "/dev/shm"
FAULT_STEP = 5
IN_RUN = ["seal", "sealed", "mid-transfer", "mid-encode", "partial-parity", "announce"]
REBUILD = ["sync", "mid-rebuild"]
ACTIONS = ["kill", "stop", "drop", "slow"]
FAST = {("mid-encode", "stop")}
ENV = "SHARDGUARD_TEST_DAEMON_FAULT"


# In-run faults train longer than test_cluster's reference: after a fault at step 5 there
# must be steps left to show protection resuming within the run, even on a busy machine.
RUN_STEPS = 24


@pytest.fixture(scope="module")
def reference_long(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory.mktemp("ref-long"), 4, RUN_STEPS)


def _cases(points: list[str]):
    for point in points:
        for action in ACTIONS:
            marks = [] if (point, action) in FAST else [pytest.mark.slow]
            yield pytest.param(point, action, marks=marks, id=f"{point}-{action}")


def restorable(root: Path, node: int) -> int:
    try:
        st = status_of_socket(cluster.sockets(str(root))[node])
    except Exception:  # noqa: BLE001 - a node that is down or hung answers nothing
        return -2
    j = next((j for j in st.jobs if j.job == "job"), None)
    return j.restorable_step if j is not None and j.HasField("restorable_step") else -1


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a trainer and its ranks (no-op once it has ended)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def daemon_pid(root: Path, node: int) -> int:
    return int((root / f"node-{node}" / "daemon.pid").read_text())


def start_clean(root: Path, node: int) -> None:
    """Start a daemon in slot ``node`` with no fault armed."""
    with environ({ENV: None}):
        cluster.start(str(root), node)


def up(tmp_path: Path, fault: str | None) -> Path:
    root = tmp_path / "c"
    with environ({ENV: fault}):
        cluster.up(str(root), 4, 4, 1, base_port=free_base_port(8))
    return root


def down_and_check_no_leaks(root: Path) -> None:
    spec = cluster.load_spec(str(root))
    pids = [daemon_pid(root, i) for i in range(spec.nodes)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)  # a stopped daemon must be able to die
        except ProcessLookupError:
            pass
    cluster.down(str(root))
    assert not glob.glob(os.path.join(SHM, glob.escape(spec.prefix) + "*")), "shm left behind"
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid


def verify_healthy(root: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "shardguard.daemon.service.cli", "verify", "--job", "job",
                        "--socket", cluster.sockets(str(root))[1]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def settle(root: Path, after: int, timeout: float = 60.0) -> list[int]:
    """Wait until every node reports the same restorable step, newer than ``after``
    (the last snapshots of a run may still be under protection when it ends)."""
    deadline = time.monotonic() + timeout
    while True:
        steps = [restorable(root, i) for i in range(4)]
        if (len(set(steps)) == 1 and steps[0] > after) or time.monotonic() > deadline:
            return steps
        time.sleep(0.1)


def node_of(point: str) -> int:
    return 0 if point == "announce" else 2


@pytest.mark.parametrize("point,action", list(_cases(IN_RUN)))
def test_fault_during_a_run(reference_long, tmp_path: Path, point: str, action: str) -> None:
    node = node_of(point)
    # A slow peer stalls for 1 s: long against a step, short enough that protection
    # resumes within the run.
    with environ({"SHARDGUARD_TEST_DAEMON_FAULT_SLOW_S": "1"}):
        root = up(tmp_path, f"{point}@{FAULT_STEP}@{node}:{action}")
    out = tmp_path / "run"
    proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, RUN_STEPS,
                       step_sleep=0.3, env={"SHARDGUARD_PROTECT_TIMEOUT_S": "1"})
    seen: list[int] = []
    fired = False
    try:
        while proc.poll() is None:
            step = restorable(root, 1)
            if step >= -1:
                seen.append(step)
            pid = daemon_pid(root, node)
            if not fired and action == "kill" and not psutil.pid_exists(pid):
                fired = True
                start_clean(root, node)  # systemd's Restart=on-failure
            elif not fired and action == "kill":
                try:
                    if psutil.Process(pid).status() == "zombie":
                        fired = True
                        start_clean(root, node)
                except psutil.NoSuchProcess:
                    pass
            if not fired and action == "stop":
                try:
                    if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                        fired = True
                        time.sleep(1.5)  # hung for a while ...
                        os.kill(pid, signal.SIGCONT)  # ... then it goes on
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        assert finish(proc) == 0, trainer_log(out)
        log = (root / f"node-{node}" / "daemon.log").read_text()
        assert f"test fault {point}@{FAULT_STEP}@{node}:{action} fires" in log
        assert action in ("drop", "slow") or fired, "the fault never showed"
        assert_matches_reference(out, reference_long, 4)
        # The restorable step never went backwards, and protection resumed in the run.
        assert seen == sorted(seen), seen
        steps = settle(root, FAULT_STEP)
        assert len(set(steps)) == 1 and steps[0] > FAULT_STEP, steps
        verify_healthy(root)
        # A restart restores what was protected, bit-exactly, on every rank.
        again = tmp_path / "again"
        proc = run_trainer(again, "job", ",".join(cluster.sockets(str(root))), 4, RUN_STEPS)
        assert finish(proc) == 0, trainer_log(again)
        restored = restored_steps(again, 4)
        assert restored == {str(steps[0])}, restored
        for rank in range(4):
            a = torch.load(reference_long / f"final.{rank}.pt", weights_only=False)
            b = torch.load(again / f"final.{rank}.pt", weights_only=False)
            assert_same_state(a, b)
        record(f"daemon fault: {point} / {action}", 1, "survived: bit-exact, nothing lost")
    finally:
        kill(proc)
        down_and_check_no_leaks(root)


@pytest.mark.parametrize("point,action", list(_cases(REBUILD)))
def test_fault_while_a_replacement_node_rebuilds(reference4, tmp_path: Path, point: str,
                                                 action: str) -> None:
    root = up(tmp_path, None)
    out = tmp_path / "run"
    try:
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 6)
        assert finish(proc) == 0, trainer_log(out)
        step = restorable(root, 0)
        cluster.kill(str(root), 2)  # node 2 lost: daemon, and its memory
        with environ({ENV: f"{point}@0@2:{action}"}):
            cluster.start(str(root), 2)  # its replacement, with the fault armed
        first = tmp_path / "first"
        proc = run_trainer(first, "job", ",".join(cluster.sockets(str(root))), 4, STEPS)
        pid = daemon_pid(root, 2)
        if action == "stop":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    break
                time.sleep(0.05)
            assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
            kill(proc)  # the job, stuck registering with a hung node, is restarted
        code = finish(proc, timeout=180) if proc.poll() is None else proc.returncode
        log = (root / "node-2" / "daemon.log").read_text()
        assert f"test fault {point}@0@2:{action} fires" in log
        if action == "drop":
            # The failed catch-up fails the restore (typed, every rank), nothing torn;
            # the next registration tries again.
            assert code != 0, trainer_log(first)
        elif action == "kill":
            # The replacement crashed mid-rebuild and restarts in place (systemd): it
            # adopts what it had rebuilt so far and catches up.
            assert code != 0, trainer_log(first)
            start_clean(root, 2)
        elif action == "stop":
            # The replacement hung: declare it lost, start another empty one.
            os.kill(pid, signal.SIGKILL)
            cluster.kill(str(root), 2)
            start_clean(root, 2)
        else:
            # A slow replacement only takes longer: the first restart goes through.
            assert code == 0, trainer_log(first)
            restored = restored_steps(first, 4)
            assert restored == {str(step)}, restored
            assert_matches_reference(first, reference4, 4)
            verify_healthy(root)
            record(f"daemon fault: {point} / {action} (replacement node)", 1,
                   "survived: bit-exact, nothing lost")
            return
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, STEPS)
        assert finish(proc) == 0, trainer_log(out)
        restored = restored_steps(out, 4)
        assert restored == {str(step)}, restored
        assert_matches_reference(out, reference4, 4)
        verify_healthy(root)
        record(f"daemon fault: {point} / {action} (replacement node)", 1,
               "survived: bit-exact, nothing lost")
    finally:
        down_and_check_no_leaks(root)


@pytest.mark.slow
def test_a_replacement_node_without_memory_for_the_job(reference4, tmp_path: Path) -> None:
    """A full memory budget on the node that must rebuild: a typed error on every rank,
    nothing torn; with the memory back, the same step restores bit-exactly."""
    root = up(tmp_path, None)
    out = tmp_path / "run"
    try:
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 6)
        assert finish(proc) == 0, trainer_log(out)
        step = restorable(root, 0)
        cluster.kill(str(root), 2)
        cluster.start(str(root), 2, extra_args=["--memory-budget-bytes", "64KiB"])
        full = tmp_path / "full"
        proc = run_trainer(full, "job", ",".join(cluster.sockets(str(root))), 4, STEPS,
                           expect_restore_error=True)
        assert finish(proc) == 0, trainer_log(full)
        errors = [(full / f"error.{r}").read_text() for r in range(4)]
        assert all(e.startswith("RestoreError") for e in errors), errors  # one class, all ranks
        assert "BudgetExceededError" in errors[2], errors  # and the rank that failed says why
        cluster.kill(str(root), 2, keep_memory=True)
        start_clean(root, 2)
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, STEPS)
        assert finish(proc) == 0, trainer_log(out)
        restored = restored_steps(out, 4)
        assert restored == {str(step)}, restored
        assert_matches_reference(out, reference4, 4)
        record("full memory budget on the rebuilding node", 1,
               "BudgetExceededError on every rank, nothing torn; bit-exact once memory is back")
    finally:
        down_and_check_no_leaks(root)
