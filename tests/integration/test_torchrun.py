"""The real launcher: torchrun's elastic agent with its c10d rendezvous on 127.0.0.1.

- a worker SIGKILLed mid-run; the agent (``--max-restarts 1``) restarts every
  worker and they resume bit-exactly from the node's daemon;
- two agents as two nodes of a local cluster (4 ranks of DDP, its bucket order kept
  with each snapshot): one node lost (its agent, its
  workers, its daemon and its memory), a replacement daemon, and a relaunch in
  which the rendezvous hands the survivor node rank 0, so that it runs the lost
  node's ranks and the replacement the survivor's; bit-exact;
- torchrun without ``--rdzv-id`` (run id ``none``) and no SHARDGUARD_JOB: refused
  with a clear error, never a resume of another run.

The script (tests/integration/torchrun_trainer.py) is what a user writes: env://
init, its socket from SHARDGUARD_SOCKET, its job from the launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardguard.daemon.service import cluster
from _support import assert_matches_reference, read_losses, status_of_socket

TRAINER = str(Path(__file__).with_name("torchrun_trainer.py"))
STEPS = 12

FAULT_CATEGORY = "real torchrun: worker SIGKILL + agent restart; node lost + c10d reshuffle"
FAULT_OUTCOME = "bit-exact resume"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, sock: str, *, nnodes: int = 1, nproc: int = 2, port: int = 0,
             rdzv_id: str | None = "trjob", max_restarts: int = 0, standalone: bool = False,
             args: list[str] = (), log: str = "torchrun.log") -> subprocess.Popen[bytes]:
    """One torchrun agent (a node) whose workers use the daemon at ``sock``."""
    env = {**os.environ, "SHARDGUARD_SOCKET": sock, "OMP_NUM_THREADS": "1",
           # torch 2.13: workers restarted by the agent die in init_process_group when the
           # rendezvous store is shared with them (README, "torchrun").
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("SHARDGUARD_JOB", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.2"]
    if standalone:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}"]
        if rdzv_id is not None:
            cmd += ["--rdzv-id", rdzv_id]
    cmd += [TRAINER, "--out", str(out), "--steps", str(STEPS), *args]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / log, "ab") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen[bytes], timeout: float = 240) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers an agent left behind
        except ProcessLookupError:
            pass


def logs(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(out.glob("*.log")))


def reference(out: Path, world: int, ddp: bool = True) -> Path:
    proc = torchrun(out, "/nonexistent", nproc=world, standalone=True,
                    args=["--no-snapshot"] + (["--ddp"] if ddp else []))
    assert finish(proc) == 0, logs(out)
    return out


def restorable(sock: str, job: str) -> int:
    st = status_of_socket(sock)
    j = next((j for j in st.jobs if j.job == job), None)
    return j.restorable_step if j is not None and j.HasField("restorable_step") else -1


def incarnations(out: Path, rank: int, name: str) -> list[str]:
    return (out / f"{name}.{rank}").read_text().split()


def test_worker_killed_agent_restarts_all_workers_bit_exact(daemon, tmp_path: Path) -> None:
    ref = reference(tmp_path / "ref", 2)
    out = tmp_path / "run"
    proc = torchrun(out, daemon.socket, port=free_port(), max_restarts=1,
                    args=["--ddp", "--kill-at", "7", "--kill-rank", "1"])
    assert finish(proc) == 0, logs(out)
    assert (out / "killed").exists()
    for rank in range(2):
        restored = incarnations(out, rank, "restored")
        assert len(restored) == 2 and restored[0] == "None" and restored[1] != "None", restored
    assert incarnations(out, 0, "restored")[1] == incarnations(out, 1, "restored")[1]
    assert_matches_reference(out, ref, 2)


def test_torchrun_without_rdzv_id_is_refused(daemon, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = torchrun(out, daemon.socket, port=free_port(), rdzv_id=None)
    assert finish(proc) != 0
    text = logs(out)
    assert "JobNameError" in text and "--rdzv-id" in text, text
    assert not read_losses(out, 0), "trained without a job name"
    assert not status_of_socket(daemon.socket).jobs


@pytest.fixture
def two_nodes(tmp_path: Path):
    root = tmp_path / "c"
    cluster.up(str(root), 2, 2, 1)
    yield root
    cluster.down(str(root))


@pytest.mark.slow
def test_node_lost_and_c10d_reshuffles_node_ranks_bit_exact(two_nodes: Path,
                                                             tmp_path: Path) -> None:
    root = two_nodes
    socks = cluster.sockets(str(root))
    ref = reference(tmp_path / "ref", 4)
    out = tmp_path / "run"
    # First launch: node 0's agent starts first and gets node rank 0 (ranks 0-1).
    port = free_port()
    agents = [torchrun(out, socks[0], nnodes=2, port=port,
                       args=["--ddp", "--step-sleep", "0.3"], log="agent0.log")]
    time.sleep(1.0)
    agents.append(torchrun(out, socks[1], nnodes=2, port=port,
                           args=["--ddp", "--step-sleep", "0.3"], log="agent1.log"))
    deadline = time.monotonic() + 180
    while min(restorable(s, "trjob") for s in socks) < 3:
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents), logs(out)
        time.sleep(0.05)
    assert [incarnations(out, r, "where")[0] for r in range(4)] == [socks[0]] * 2 + [socks[1]] * 2
    # Node 0 is lost: its agent, its workers, its daemon and its memory. The job fails
    # (node 1's workers lose their peers) and the scheduler relaunches it.
    os.killpg(agents[0].pid, signal.SIGKILL)
    cluster.kill(str(root), 0)
    os.killpg(agents[1].pid, signal.SIGKILL)
    for a in agents:
        finish(a, timeout=30)
    cluster.start(str(root), 0)  # the replacement node, empty
    # Relaunch: the survivor's agent starts first, so c10d (ordering agents by host and
    # pid) makes it node rank 0: it runs ranks 0-1, the lost node's.
    port = free_port()
    agents = [torchrun(out, socks[1], nnodes=2, port=port, args=["--ddp"], log="agent1b.log")]
    time.sleep(1.0)
    agents.append(torchrun(out, socks[0], nnodes=2, port=port, args=["--ddp"],
                           log="agent0b.log"))
    assert [finish(a) for a in agents] == [0, 0], logs(out)
    where = [incarnations(out, r, "where")[-1] for r in range(4)]
    assert where == [socks[1]] * 2 + [socks[0]] * 2, f"no reshuffle: {where}"
    restored = {incarnations(out, r, "restored")[-1] for r in range(4)}
    assert len(restored) == 1 and restored != {"None"}, restored
    assert_matches_reference(out, ref, 4)
