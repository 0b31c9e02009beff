"""shardguard end to end: lose a node mid-training, rebuild it from parity, resume bit-exactly.

    python examples/demo.py [--steps 50] [--seed S] [--nodes 4]

What it does, on one machine:

1. starts a local cluster of ``--nodes`` daemons (``shardguard cluster``; group
   size 4, parity 1) under ``demo-out/run-*/cluster``;
2. trains a tiny GPT (examples/gpt.py) with the real ``torchrun``: one elastic
   agent per node (c10d rendezvous on 127.0.0.1, ``--rdzv-id demo-gpt``, which
   names the job), one gloo rank each, snapshotting every step;
3. at a random step (30-60 % of the run, drawn from ``--seed``) loses a node
   for real: its daemon is SIGKILLed and its shared memory wiped, its agent and
   rank are SIGKILLed, and the job fails; a replacement daemon starts empty in
   that slot and the job is relaunched, the replacement's agent joining last, so
   the rendezvous renumbers the nodes and ranks move (a survivor may run the lost
   node's rank): every rank restores the newest restorable step from wherever its
   bytes are (its old node, or decoded from the survivors' data and parity) and
   goes on;
4. trains the same job again without interruption and without shardguard, and
   checks that every loss and every final tensor is bit-for-bit the same;
5. plots both loss curves to ``demo-out/loss.png`` if matplotlib is installed.

The cluster is always brought down (shared memory freed, daemons stopped),
also on Ctrl-C. If this process is SIGKILLed, the daemons outlive it, as node
daemons do: ``shardguard cluster down --dir <the printed dir>`` cleans up.
The same script is each rank's training program (``--worker``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

import gpt
import shardguard.client as sg
from shardguard.daemon.service import cluster

REPO = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO / "demo-out"
JOB = "demo-gpt"
GROUP_SIZE, PARITY = 4, 1
BATCH, BLOCK, D_MODEL = 8, 64, 96
LR, WEIGHT_DECAY, WARMUP_STEPS = 2e-3, 0.1, 8
# The share of the run in which the node is lost.
FAIL_WINDOW = (0.3, 0.6)
# As torchrun: SIGTERM to the surviving workers, SIGKILL after this grace.
STOP_GRACE_S = 5.0
PHASE_TIMEOUT_S = 600.0
# Which local node an agent stands for (its worker writes it down: the demo's map of ranks).
NODE_ENV = "SHARDGUARD_DEMO_NODE"


# ============================================================== one rank (--worker)


def worker(args: argparse.Namespace) -> None:
    """One rank of the job: train, snapshot every step, resume from the newest snapshot."""
    _pdeathsig()  # a worker must not outlive its agent
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(args.out)
    with open(out / f"node.{rank}", "a", encoding="utf-8") as fh:
        fh.write(f"{os.environ[NODE_ENV]}\n")
    # One thread per rank: the ranks share two cores, and one thread keeps the maths in one order.
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://, as under torchrun
    data, alphabet = gpt.make_corpus(seed=args.seed)
    # The same initial weights on every rank (DDP broadcasts rank 0's; seeding is equivalent).
    torch.manual_seed(args.seed)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=len(alphabet), block_size=BLOCK, d_model=D_MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    # Each rank draws its own batches and dropout masks; every stream a resume must
    # reproduce is seeded per rank and travels in the snapshot.
    rank_seed = args.seed * 1000 + rank
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)

    client, start = None, 0
    if not args.no_snapshot:
        # The job name is torchrun's --rdzv-id; the socket is $SHARDGUARD_SOCKET.
        client = sg.connect(group_size=min(GROUP_SIZE, world), parity=PARITY)
        client.protect(opt)
        restored = client.latest()
        if restored is not None:
            step, state = client.restore(restored)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            sg.set_rng_state(state["rng"])
            start = step + 1
        (out / f"restored.{rank}").write_text(f"{restored}\n")

    params = list(model.parameters())
    with open(out / f"losses.{rank}", "a", encoding="utf-8") as log:
        for step in range(start, args.steps):
            # A pure function of the step, so a resume needs no scheduler state.
            for group in opt.param_groups:
                group["lr"] = LR * min(1.0, (step + 1) / WARMUP_STEPS)
            x, y = gpt.get_batch(data, BATCH, BLOCK)
            loss = model(x, y)
            loss.backward()
            gpt.all_reduce_grads(params, world)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean /= world
            log.write(f"{step} {loss.item().hex()} {mean.item().hex()}\n")
            log.flush()
            if client is not None:
                client.snapshot(step, {"model": model.state_dict(), "optim": opt.state_dict(),
                                       "rng": sg.rng_state(), "step": step})
    if client is not None:
        client.wait()
        client.close()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, out / f"final.{rank}.pt")
    dist.destroy_process_group()


# ============================================================== the launcher


def _pdeathsig() -> None:
    """In a child, before exec: die with the demo (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Agents:
    """The job as torchrun runs it on ``len(nodes)`` nodes: one real elastic agent per node
    (``torchrun``, c10d rendezvous on 127.0.0.1, run id = the job name), one worker each.

    The rendezvous numbers the agents by host and pid, so on this one host the order in
    which they start decides which node runs which rank, as on a real cluster the
    order in which nodes join does. ``nodes`` is the launch order: (node, its socket or
    None for a run without shardguard).
    """

    def __init__(self, out: Path, nodes: list[tuple[int, str | None]], steps: int,
                 seed: int) -> None:
        self.out = out
        self.nodes = [n for n, _ in nodes]
        out.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for node, sock in nodes:
                self._launch(node, sock, len(nodes), steps, seed, port)
        except BaseException:
            self.stop()
            raise

    def _launch(self, node: int, sock: str | None, nnodes: int, steps: int, seed: int,
                port: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               # torch 2.13: workers restarted by an agent die in init_process_group when
               # they share the rendezvous store (a known PyTorch issue; README, torchrun).
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        env.pop("SHARDGUARD_JOB", None)  # the job name comes from --rdzv-id
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", JOB,
               "--max-restarts", "0", "--monitor-interval", "0.2",
               str(Path(__file__).resolve()), "--worker", "--out", str(self.out),
               "--steps", str(steps), "--seed", str(seed)]
        if sock is None:
            cmd.append("--no-snapshot")
        else:
            env["SHARDGUARD_SOCKET"] = sock
        env[NODE_ENV] = str(node)
        with open(self.out / f"agent-node{node}.log", "ab") as log:
            # Own session: a Ctrl-C reaches the demo, which stops the agents in order.
            self.procs[node] = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pdeathsig)

    def kill(self, node: int) -> None:
        """The node is gone: its agent and its worker die at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[node].pid, signal.SIGKILL)
        self.procs[node].wait()

    def failed(self) -> list[int]:
        return [n for n, p in self.procs.items() if p.poll() not in (None, 0)]

    def done(self) -> bool:
        return all(p.poll() == 0 for p in self.procs.values())

    def stop(self) -> list[int]:
        """Stop every agent still running (and its worker); returns their nodes."""
        with _uninterruptible():
            return self._stop()

    def _stop(self) -> list[int]:
        running = [n for n, p in self.procs.items() if p.poll() is None]
        for n in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[n].pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for n in running:
            try:
                self.procs[n].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[n].pid, signal.SIGKILL)
            self.procs[n].wait()
        return running

    def describe_exit(self, node: int) -> str:
        rc = self.procs[node].returncode
        if rc is None:
            return "running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exit code {rc}"

    def log_tail(self, node: int, lines: int = 15) -> str:
        text = (self.out / f"agent-node{node}.log").read_text(errors="replace").splitlines()
        return "\n".join("    | " + line for line in text[-lines:])

    def placement(self) -> dict[int, int]:
        """rank -> node, as the rendezvous placed them (each worker writes its node)."""
        out = {}
        for path in self.out.glob("node.*"):
            lines = path.read_text().split()
            if lines:
                out[int(path.suffix[1:])] = int(lines[-1])
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================== reading the ranks' output


@dataclass(frozen=True)
class Row:
    step: int
    loss_hex: str  # this rank's loss
    mean_hex: str  # the loss averaged over the ranks (the same on every rank)

    @property
    def mean(self) -> float:
        return float.fromhex(self.mean_hex)


def read_rows(out: Path, rank: int) -> list[Row]:
    path = out / f"losses.{rank}"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and all(_is_hex_float(p) for p in parts[1:]):
            rows.append(Row(int(parts[0]), parts[1], parts[2]))
        # else: the torn last line of a killed rank
    return rows


def _is_hex_float(text: str) -> bool:
    try:
        float.fromhex(text)
    except ValueError:
        return False
    return True


def read_restored(out: Path, world: int) -> set[str]:
    return {(out / f"restored.{r}").read_text().strip() for r in range(world)}


class Progress:
    """Prints a line every few steps of a phase, from rank 0's loss log."""

    def __init__(self, label: str, out: Path, steps: int) -> None:
        self.label, self.out, self.steps = label, out, steps
        self.every = max(1, steps // 10)
        self.shown = -1
        self.first_row_at: float | None = None

    def update(self) -> None:
        rows = read_rows(self.out, 0)
        if rows and self.first_row_at is None:
            self.first_row_at = time.monotonic()
        for row in rows:
            if row.step > self.shown and (row.step % self.every == 0
                                          or row.step == self.steps - 1):
                print(f"  [{self.label}] step {row.step:3d}/{self.steps}  "
                      f"loss {row.mean:.4f}", flush=True)
                self.shown = row.step


# ============================================================== the demo's phases


@dataclass
class Failure:
    node: int
    after_step: int  # the last step the lost node's rank finished
    rank: int = -1  # the rank the lost node ran
    restored: int | None = None  # the step every rank resumed from
    lost_at: float = 0.0  # time.monotonic() of the loss


def say(msg: str = "") -> None:
    print(msg, flush=True)


def wait_for(agents: Agents, progress: Progress, what: str) -> None:
    """Wait for every agent to finish; on a failure stop the rest and raise."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not agents.done():
        progress.update()
        if agents.failed():
            bad = agents.failed()[0]
            agents.stop()
            raise DemoError(f"{what}: node {bad}'s agent {agents.describe_exit(bad)}; its "
                            f"log:\n{agents.log_tail(bad)}")
        if time.monotonic() > deadline:
            agents.stop()
            raise DemoError(f"{what}: not done within {PHASE_TIMEOUT_S:.0f}s")
        time.sleep(0.05)
    progress.update()


def _placement(agents: Agents, world: int, what: str) -> dict[int, int]:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while len(placed := agents.placement()) < world:
        if agents.failed() or agents.done() or time.monotonic() > deadline:
            bad = (agents.failed() or [agents.nodes[0]])[0]
            raise DemoError(f"{what}: the ranks did not start: node {bad}'s agent "
                            f"{agents.describe_exit(bad)}; its log:\n{agents.log_tail(bad)}")
        time.sleep(0.05)
    return placed


def train_and_lose_a_node(cdir: str, out: Path, world: int, steps: int, seed: int,
                          fail: Failure, fail_after: int) -> None:
    say(f"\n== training on {world} nodes with torchrun (one elastic agent per node, c10d "
        f"rendezvous), snapshotting every step; node {fail.node} will be lost after step "
        f"{fail_after}")
    socks = cluster.sockets(cdir)
    agents = Agents(out, [(n, socks[n]) for n in range(world)], steps, seed)
    progress = Progress("train", out, steps)
    try:
        placed = _placement(agents, world, "training")
        say("  the rendezvous placed " + ", ".join(f"rank {r} on node {placed[r]}"
                                                   for r in sorted(placed)))
        fail.rank = next(r for r, n in placed.items() if n == fail.node)
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while True:
            rows = read_rows(out, fail.rank)
            if rows and rows[-1].step >= fail_after:
                break
            if agents.failed() or agents.done() or time.monotonic() > deadline:
                bad = (agents.failed() or [agents.nodes[0]])[0]
                raise DemoError(f"training ended before the failure point: node {bad}'s "
                                f"agent {agents.describe_exit(bad)}; its log:\n"
                                f"{agents.log_tail(bad)}")
            progress.update()
            time.sleep(0.005)
        # A node is lost: its daemon, its agent and its rank die together, its memory too.
        cluster.kill(cdir, fail.node)
        agents.kill(fail.node)
        fail.lost_at = time.monotonic()
        fail.after_step = read_rows(out, fail.rank)[-1].step
        progress.update()
        say(f"  XX node {fail.node} lost after step {fail.after_step}: daemon SIGKILLed, "
            f"its shared memory wiped, its torchrun agent and rank {fail.rank} SIGKILLed")
        stopped = agents.stop()
        say(f"  the job fails (the other ranks lose their peer); the scheduler stops the "
            f"other nodes' agents {stopped} and relaunches the job")
    finally:
        agents.stop()


def replace_node_and_resume(cdir: str, out: Path, world: int, steps: int, seed: int,
                            fail: Failure, before: dict[int, int]) -> None:
    say(f"\n== replacing node {fail.node} and relaunching with torchrun")
    pid = cluster.start(cdir, fail.node)
    say(f"  replacement daemon for node {fail.node} is up (pid {pid}), its memory empty")
    socks = cluster.sockets(cdir)
    # The survivors' agents join first and the replacement last, as on a cluster where
    # the spare node is brought in: the rendezvous renumbers the nodes accordingly.
    order = [n for n in range(world) if n != fail.node] + [fail.node]
    agents = Agents(out, [(n, socks[n]) for n in order], steps, seed)
    progress = Progress("resume", out, steps)
    try:
        placed = _placement(agents, world, "resumed training")
        moved = [r for r in sorted(placed) if placed[r] != before.get(r)]
        say("  the rendezvous placed " + ", ".join(
            f"rank {r} on node {placed[r]}" + (f" (was {before[r]})" if r in moved else "")
            for r in sorted(placed)))
        if moved:
            say(f"  ranks {moved} moved to other nodes: each restores from wherever its "
                f"bytes are (its old node, or parity)")
        wait_for(agents, progress, "resumed training")
    finally:
        agents.stop()
    restored = read_restored(out, world)
    if len(restored) != 1:
        raise DemoError(f"the ranks restored different steps: {sorted(restored)}")
    value = restored.pop()
    fail.restored = None if value == "None" else int(value)
    if fail.restored is None:
        say("  nothing was restorable: the job restarted from step 0")
    else:
        say(f"  every rank restored step {fail.restored} and resumed at step "
            f"{fail.restored + 1}")
    if progress.first_row_at is not None:
        say(f"  training again {progress.first_row_at - fail.lost_at:.1f}s after the loss "
            f"(new daemon, {world} torchrun agents and rank processes importing torch, "
            f"rendezvous, rebuild, restore)")
    log = Path(cdir, f"node-{fail.node}", "daemon.log").read_text(errors="replace")
    rebuilt = [line for line in log.splitlines() if "rebuilt ranks" in line]
    if rebuilt:
        line = rebuilt[-1]
        say(f"  node {fail.node}'s replacement daemon: {line[line.find('job='):]}")


def train_reference(out: Path, world: int, steps: int, seed: int) -> None:
    say("\n== the same training, uninterrupted and without shardguard (torchrun again)")
    agents = Agents(out, [(n, None) for n in range(world)], steps, seed)
    try:
        wait_for(agents, Progress("reference", out, steps), "reference training")
    finally:
        agents.stop()


# ============================================================== comparing the runs


def first_divergence(first: Path, second: Path, ref: Path, world: int, steps: int,
                     fail: Failure) -> str | None:
    """Where the interrupted run (``first`` then ``second`` attempt) and the reference
    first differ, or None if they are bit-for-bit the same."""
    resumed_at = 0 if fail.restored is None else fail.restored + 1
    for rank in range(world):
        want = {row.step: row for row in read_rows(ref, rank)}
        if sorted(want) != list(range(steps)):
            return f"the reference run of rank {rank} is incomplete"
        second_rows = read_rows(second, rank)
        if [row.step for row in second_rows] != list(range(resumed_at, steps)):
            return f"rank {rank} did not train steps {resumed_at}..{steps - 1} after the resume"
        for attempt, rows in (("before the failure", read_rows(first, rank)),
                              ("after the resume", second_rows)):
            for row in rows:
                ref_row = want[row.step]
                if (row.loss_hex, row.mean_hex) != (ref_row.loss_hex, ref_row.mean_hex):
                    return (f"rank {rank} step {row.step} ({attempt}): loss {row.loss_hex} "
                            f"(mean {row.mean_hex}), uninterrupted {ref_row.loss_hex} "
                            f"(mean {ref_row.mean_hex})")
    for rank in range(world):
        a = torch.load(second / f"final.{rank}.pt", weights_only=True)
        b = torch.load(ref / f"final.{rank}.pt", weights_only=True)
        where = _state_divergence(a, b, f"rank {rank} final state")
        if where is not None:
            return where
    return None


def _state_divergence(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return None if ok else f"{path} differs"
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return f"{path}: keys differ"
        return next((d for k in a if (d := _state_divergence(a[k], b[k], f"{path}[{k!r}]"))),
                    None)
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{path}: lengths differ"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := _state_divergence(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {a!r} != {b!r}"


def loss_curves(first: Path, second: Path, ref: Path
                ) -> tuple[dict[int, Row], dict[int, Row], dict[int, Row]]:
    """Rank 0's rows (the mean loss is the same on every rank): before the failure,
    after the resume, uninterrupted."""
    return ({r.step: r for r in read_rows(first, 0)}, {r.step: r for r in read_rows(second, 0)},
            {r.step: r for r in read_rows(ref, 0)})


def print_table(before: dict[int, Row], after: dict[int, Row], ref: dict[int, Row],
                steps: int, fail: Failure) -> None:
    say(f"\n{'step':>5}  {'interrupted':>12}  {'uninterrupted':>13}  same bits")
    for step in range(steps):
        row = after.get(step) or before.get(step)
        got = f"{row.mean:12.6f}" if row else f"{'-':>12}"
        want = f"{ref[step].mean:13.6f}" if step in ref else f"{'-':>13}"
        same = "yes" if row and step in ref and row.mean_hex == ref[step].mean_hex else "NO"
        redone = "recomputed" if step in after and step in before else ""
        notes = []
        if step == fail.restored:
            notes.append("<- restored: the newest restorable snapshot at the failure")
        if fail.restored is not None and step == fail.restored + 1:
            notes.append("<- resumed here")
        if step == fail.after_step:
            notes.append(f"XX node {fail.node} lost after this step")
        say(f"{step:5d}  {got}  {want}  {same:<4}  {redone:<10}  {'  '.join(notes)}".rstrip())


def plot(before: dict[int, Row], after: dict[int, Row], ref: dict[int, Row],
         fail: Failure, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        say("plot skipped: matplotlib is not installed (`pip install matplotlib` to get "
            f"{path.relative_to(REPO)})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(sorted(ref), [ref[s].mean for s in sorted(ref)], color="0.6", lw=4,
            label="uninterrupted")
    ax.plot(sorted(before), [before[s].mean for s in sorted(before)], color="C0", lw=1.5,
            marker=".", label="interrupted run, before the failure")
    ax.plot(sorted(after), [after[s].mean for s in sorted(after)], color="C1", lw=1.5,
            marker=".", label="interrupted run, after the resume")
    ax.axvline(fail.after_step + 0.5, color="C3", ls="--",
               label=f"node {fail.node} lost (after step {fail.after_step})")
    if fail.restored is not None:
        ax.axvline(fail.restored, color="C2", ls=":",
                   label=f"restored step {fail.restored} (rebuilt from parity)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title("shardguard: node lost and rebuilt, training resumed bit-exactly")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    say(f"plot: {path.relative_to(REPO)}")


# ============================================================== the driver


class DemoError(Exception):
    """The demo could not go on; the message says why."""


def _fresh_dir() -> Path:
    OUT_ROOT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        d = OUT_ROOT / (f"run-{stamp}" + (f"-{n}" if n else ""))
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            return d
    raise DemoError(f"no fresh directory under {OUT_ROOT}")


@contextlib.contextmanager
def local_cluster(cdir: Path, nodes: int) -> Iterator[str]:
    """A local cluster that is brought down, its shared memory freed, however we leave."""
    group = min(GROUP_SIZE, nodes)
    say(f"== starting a local cluster: {nodes} nodes, groups of {group}, parity {PARITY} "
        f"(each node: a daemon with its own socket, ports and shared memory)")
    say(f"   {cdir.relative_to(REPO)}  (if this demo is SIGKILLed: "
        f"shardguard cluster down --dir {cdir})")
    try:
        cluster.up(str(cdir), nodes, group, PARITY)
        for i, sock in enumerate(cluster.sockets(str(cdir))):
            say(f"  node {i}: {Path(sock).relative_to(REPO)}")
        yield str(cdir)
    finally:
        if (cdir / "cluster.json").exists():
            with _uninterruptible():
                cluster.down(str(cdir))
            say("== cluster down, its shared memory freed")


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """A second Ctrl-C must not cut a cleanup short and leave daemons or memory behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    rnd = random.Random(seed)
    lo, hi = (math.ceil(args.steps * f) for f in FAIL_WINDOW)
    fail = Failure(node=rnd.randrange(args.nodes), after_step=-1)
    fail_after = rnd.randint(lo, max(lo, hi))
    run_dir = _fresh_dir()
    first, second, ref = run_dir / "interrupted-1", run_dir / "interrupted-2", run_dir / "reference"
    say(f"shardguard demo: seed {seed} (rerun with --seed {seed}), {args.steps} steps, "
        f"{args.nodes} ranks on {args.nodes} local nodes, output in "
        f"{run_dir.relative_to(REPO)}")
    t0 = time.monotonic()
    with local_cluster(run_dir / "cluster", args.nodes) as cdir:
        train_and_lose_a_node(cdir, first, args.nodes, args.steps, seed, fail, fail_after)
        before = {r: int(n) for r, n in ((int(p.suffix[1:]), p.read_text().split()[-1])
                                         for p in first.glob("node.*"))}
        replace_node_and_resume(cdir, second, args.nodes, args.steps, seed, fail, before)
    train_reference(ref, args.nodes, args.steps, seed)

    before, after, reference = loss_curves(first, second, ref)
    print_table(before, after, reference, args.steps, fail)
    plot(before, after, reference, fail, OUT_ROOT / "loss.png")
    where = first_divergence(first, second, ref, args.nodes, args.steps, fail)
    say(f"\n(losses compared as exact float hex on every rank; final model and optimizer "
        f"state with torch.equal; {time.monotonic() - t0:.0f}s)")
    if where is not None:
        say(f"bit-exact: NO (first divergence: {where})")
        return 1
    say("bit-exact: yes")
    # The final states served the comparison only (about 3 MB a rank and run); on a
    # divergence they stay, for a closer look.
    for path in run_dir.glob("*/final.*.pt"):
        path.unlink()
    return 0


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=None, help="default: random, and printed")
    p.add_argument("--nodes", type=int, default=4, help="local nodes, one rank each")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--no-snapshot", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.nodes < 2:
        p.error("--nodes must be at least 2 (parity needs another node)")
    if args.steps < 4:
        p.error("--steps must be at least 4")
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the cluster always comes down.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return run(args)
    except DemoError as exc:
        say(f"demo failed: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; everything was stopped and cleaned up")
        return 130


if __name__ == "__main__":
    sys.exit(main())
