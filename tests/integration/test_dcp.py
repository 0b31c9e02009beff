"""torch.distributed.checkpoint through shardguard: FSDP2 state saved by N ranks, loaded by M.

Real daemons, real ranks: this file is also the rank program (``python
test_dcp.py save|load ...`` starts the ranks with torch.multiprocessing, gloo on
CPU). A save trains a small FSDP2 model with AdamW on 4 ranks, checkpoints it with
``dcp.save`` and ``dcp.async_save`` (the latter while the next step trains), and
writes the full tensors of what it saved (``DTensor.full_tensor()``), plus each
rank's local shards. A load builds the model on M ranks, ``dcp.load``s it, and
checks every parameter and every optimizer moment, as full tensors, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

# Run as the rank program, this file imports its neighbours itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shardguard.client as sg  # noqa: E402
from _support import finish, status_of_socket  # noqa: E402
from shardguard.daemon.service import cluster  # noqa: E402

HERE = Path(__file__).resolve()
EXAMPLE = HERE.parents[2] / "examples" / "train_fsdp.py"
SAVED_STEP = 2  # the async_save; step 1 is the synchronous save


# ================================================================ the ranks


def _model() -> Any:
    # Odd sizes: shards are uneven, and at 8 ranks some are empty.
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.GELU(),
                               torch.nn.Linear(40, 33), torch.nn.GELU(),
                               torch.nn.Linear(33, 5))


def _build(seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt


def _train_step(model: Any, opt: Any, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    loss = model(torch.randn(8, 12, generator=g)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _state(model: Any, opt: Any) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _tensors(state: Any, fn: Any) -> Any:
    """``state`` with ``fn`` applied to every DTensor and every tensor."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _tensors(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_tensors(v, fn) for v in state)
    return state


def _full(state: Any) -> Any:
    """Every DTensor gathered into a full tensor (collective), every tensor cloned."""
    return _tensors(state, lambda t: (t.full_tensor() if isinstance(t, DTensor) else t)
                    .detach().clone())


def _local(state: Any) -> Any:
    """Every DTensor's local shard, every tensor, cloned."""
    return _tensors(state, lambda t: (t.to_local() if isinstance(t, DTensor) else t)
                    .detach().clone())


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two states differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{path} keys"]
        return [d for k in a for d in _diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{path} len"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _init(rank: int, args: argparse.Namespace) -> None:
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(args.world)
    os.environ["SHARDGUARD_SOCKET"] = args.sockets[rank % len(args.sockets)]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                            world_size=args.world)


def save_rank(rank: int, args: argparse.Namespace) -> None:
    """Train, dcp.save step 1, check a same-run load, dcp.async_save step 2 while training."""
    _init(rank, args)
    out = Path(args.out)
    model, opt = _build(seed=0)
    ckpt_group = dist.new_group(backend="gloo")
    client = sg.connect_dcp(job=args.job, group=ckpt_group)
    writer = sg.ShardguardWriter(client)
    for step in range(2):
        _train_step(model, opt, rank, step)
    state = _state(model, opt)
    before = _local(state)
    written = dcp.save(state, checkpoint_id=1, storage_writer=writer)
    client.wait(restorable=True)
    # Same run, same world: the client's own reader gives back every local shard.
    _train_step(model, opt, rank, 2)
    fresh = _state(model, opt)
    reader = sg.ShardguardReader(client)
    read = reader.read_metadata()  # what dcp.load gets: the metadata rebuilt from the ranks
    dcp.load(fresh, storage_reader=reader)
    problems = _diff(before, _local(fresh), "step1")
    if reader.loaded_step != 1:
        problems.append(f"loaded step {reader.loaded_step}")
    if read.state_dict_metadata != written.state_dict_metadata \
            or read.planner_data != written.planner_data:
        problems.append("the rebuilt Metadata is not the one dcp.save made")
    # The async save: staged at the call, written while the next step trains.
    _train_step(model, opt, rank, 3)
    state = _state(model, opt)
    full = _full(state)
    local = _local(state)
    fut = dcp.async_save(state, checkpoint_id=SAVED_STEP, storage_writer=writer,
                         process_group=ckpt_group)
    _train_step(model, opt, rank, 4)
    fut.result()
    client.wait(restorable=True)
    if args.extras:
        problems += _native_round_trip(args, rank, model, opt)
        problems += _async_refusal(args, state, ckpt_group)
    torch.save(local, out / f"local.{rank}.pt")
    if rank == 0:
        torch.save(full, out / "full.pt")
    (out / f"check.{rank}.json").write_text(json.dumps(problems))
    client.close()
    dist.destroy_process_group()


def _native_round_trip(args: argparse.Namespace, rank: int, model: Any, opt: Any) -> list[str]:
    """FSDP2 state through client.snapshot/restore, as local shards plus placements."""
    state = _state(model, opt)
    with sg.connect(job=f"{args.job}-native") as c:
        c.snapshot(7, sg.sharded_state_dict_to_local(state)).wait()
        step, got = c.restore()
    mesh = next(iter(state["model"].values())).device_mesh
    back = sg.sharded_state_dict_from_local(got, device_mesh=mesh)
    problems = [] if step == 7 else [f"native step {step}"]
    problems += _diff(_local(state), _local(back), "native")
    for k, v in state["model"].items():
        if back["model"][k].placements != v.placements or back["model"][k].shape != v.shape:
            problems.append(f"native placements {k}")
    return problems


def _async_refusal(args: argparse.Namespace, state: Any, group: Any) -> list[str]:
    """A client agreeing on the default group saves synchronously, refuses async saves."""
    with sg.connect(job=f"{args.job}-world") as c:
        writer = sg.ShardguardWriter(c)
        dcp.save(state, checkpoint_id=1, storage_writer=writer)
        fut = dcp.async_save(state, checkpoint_id=2, storage_writer=writer, process_group=group)
        try:
            fut.result()
        except CheckpointException as exc:  # every rank's failure, wrapped by DCP
            return [] if "connect_dcp" in str(exc) else [f"async refusal: {exc}"]
    return ["an async save through a default-group client was not refused"]


def load_rank(rank: int, args: argparse.Namespace) -> None:
    """Build the model on this world, dcp.load the checkpoint, compare with what was saved."""
    _init(rank, args)
    out, saved = Path(args.out), Path(args.saved)
    model, opt = _build(seed=1)  # other values: the load has to overwrite every one
    state = _state(model, opt)
    expected = torch.load(saved / "full.pt", weights_only=False)
    fresh = _full(state)
    problems = ["the fresh model already equals the checkpoint"] \
        if rank == 0 and not _diff(expected["model"], fresh["model"]) else []
    client = None
    if args.source == "client":
        client = sg.connect_dcp(job=args.job)
        reader = sg.ShardguardReader(client)
    else:
        reader = sg.ShardguardReader(args.source)
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if reader.loaded_step != SAVED_STEP:
        problems.append(f"loaded step {reader.loaded_step}")
    now = _state(model, opt)
    full = _full(now)
    if rank == 0:
        problems += _diff(expected, full, "full")
    if args.source == "client":
        problems += _diff(torch.load(saved / f"local.{rank}.pt", weights_only=False),
                          _local(now), "local")
    # The loaded optimizer steps on (every rank, or FSDP's collectives would hang).
    _train_step(model, opt, rank, 5)
    (out / f"check.{rank}.json").write_text(json.dumps(problems))
    if client is not None:
        client.close()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["save", "load"])
    p.add_argument("--out", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--sockets", required=True, help="comma-separated; rank i uses i mod n")
    p.add_argument("--extras", action="store_true",
                   help="also: the native client's round trip, an async writer's refusal")
    p.add_argument("--saved", default="", help="load: the save's output directory")
    p.add_argument("--source", default="client",
                   help="load: 'client' (the job's own client), else the job to read")
    args = p.parse_args(argv)
    args.sockets = args.sockets.split(",")
    args.port = _free_port()
    os.makedirs(args.out, exist_ok=True)
    fn = save_rank if args.role == "save" else load_rank
    try:
        mp.start_processes(fn, args=(args,), nprocs=args.world, start_method="fork")
    except mp.ProcessExitedException as exc:
        print(f"ranks: {exc}", file=sys.stderr)
        return 1
    return 0


# ================================================================ the tests


def _run(tmp: Path, name: str, *args: str, timeout: float = 180) -> Path:
    out = tmp / name
    out.mkdir()
    with open(out / "ranks.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(HERE), *args, "--out", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rc = finish(proc, timeout)
    logs = (out / "ranks.log").read_text(errors="replace")[-4000:]
    assert rc == 0, logs
    checks = sorted(out.glob("check.*.json"))
    assert checks, logs
    for c in checks:
        assert json.loads(c.read_text()) == [], f"{c.name}: {c.read_text()}\n{logs}"
    return out


def _save(tmp: Path, job: str, sockets: str, *extra: str) -> Path:
    return _run(tmp, "save", "save", "--job", job, "--world", "4", "--sockets", sockets,
                *extra)


def _load(tmp: Path, saved: Path, job: str, sockets: str, world: int, source: str) -> Path:
    return _run(tmp, f"load{world}-{source}", "load", "--job", job, "--world", str(world),
                "--sockets", sockets, "--saved", str(saved), "--source", source)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Any:
    """A local 2-node cluster (one daemon per node, parity across them)."""
    root = tmp_path / "cluster"
    try:
        cluster.up(str(root), 2, 2, 1)
        yield root
    finally:
        if (root / "cluster.json").exists():
            cluster.down(str(root))


@pytest.mark.slow
def test_fsdp_checkpoint_loads_on_2_4_and_8_ranks(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory()
    saved = _save(tmp_path, "fsdp-w4", daemon.socket, "--extras")
    # Other world sizes read the old job by name; the same world through its own client
    # (each rank's local shards come back too).
    _load(tmp_path, saved, "fsdp-w2", daemon.socket, 2, "fsdp-w4")
    _load(tmp_path, saved, "fsdp-w8", daemon.socket, 8, "fsdp-w4")
    _load(tmp_path, saved, "fsdp-w4", daemon.socket, 4, "client")


def test_fsdp_checkpoint_reshards_across_nodes(two_nodes: Path, tmp_path: Path) -> None:
    """4 ranks on 2 nodes saved, loaded by 2 ranks, one per node."""
    socks = ",".join(cluster.sockets(str(two_nodes)))
    saved = _save(tmp_path, "nodes-w4", socks)
    _load(tmp_path, saved, "nodes-w2", socks, 2, "nodes-w4")
    _assert_untouched(two_nodes, "nodes-w4")


@pytest.mark.slow
def test_fsdp_checkpoint_reshards_across_nodes_to_8_ranks(two_nodes: Path,
                                                          tmp_path: Path) -> None:
    """4 ranks on 2 nodes saved; 8 ranks, 4 per node, each node's 2 old ranks on 2 of them."""
    socks = ",".join(cluster.sockets(str(two_nodes)))
    saved = _save(tmp_path, "nodes-w4", socks)
    _load(tmp_path, saved, "nodes-w8", socks, 8, "nodes-w4")
    _assert_untouched(two_nodes, "nodes-w4")


def _assert_untouched(root: Path, name: str) -> None:
    """The reader registered as the old ranks and let them go: the job is as it was."""
    for sock in cluster.sockets(str(root)):
        job = next(j for j in status_of_socket(sock).jobs if j.job == name)
        assert job.restorable_step == SAVED_STEP and job.nodes == 2
        assert not any(r.claimed for r in job.ranks)


def test_example_resumes_on_another_world_size(daemon, tmp_path: Path) -> None:
    """examples/train_fsdp.py: 2 ranks die mid-run; 1 rank resumes from their checkpoint."""
    losses = tmp_path / "losses"
    env = {**os.environ, "SHARDGUARD_SOCKET": daemon.socket}
    # One thread per rank whatever the world: the same kernels, the same bits.
    common = [sys.executable, str(EXAMPLE), "--job", "ex", "--ckpt-every", "3",
              "--dim", "32", "--threads", "1", "--losses", str(losses)]
    first = subprocess.run([*common, "--nproc", "2", "--steps", "8", "--fail-at", "7"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 1 and "failing at step 7" in first.stdout, first.stderr[-3000:]
    second = subprocess.run([*common, "--nproc", "1", "--steps", "9"], env=env,
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    resumed = int(second.stdout.split("resumed from step ")[1].split()[0])
    # Step 6's checkpoint may have been in flight when rank 0 died: 3 or 6.
    assert resumed in (3, 6), second.stdout
    rows = [line.split() for line in losses.read_text().splitlines()]
    by_world = {(int(step), int(world)): loss for step, world, loss in rows}
    # The first step after the resume: the same parameters and rank 0's same batch, so the
    # same loss, bit for bit, on one rank as on two.
    assert by_world[(resumed + 1, 1)] == by_world[(resumed + 1, 2)]
    assert "dropped job ex-w2" in second.stdout
    assert {j.job for j in daemon.status().jobs} == {"ex-w1"}
    assert daemon.status(job="ex-w1").jobs[0].restorable_step == 9


# ------------------------------------------------- one process, no torch.distributed

_no_dist = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _plain_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 200, generator=g), "i": torch.arange(7) * seed,
            "half": torch.randn(33, generator=g).to(torch.bfloat16),
            "meta": {"lr": 0.1 * seed, "name": f"s{seed}", "betas": (0.9, 0.95)}}


def _zeros_like(state: Any) -> Any:
    """The same structure, tensors zeroed and other values None: what a load must fill."""
    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    return torch.zeros_like(state) if isinstance(state, torch.Tensor) else None


@_no_dist
def test_save_async_save_and_load_in_one_process(daemon) -> None:
    with sg.connect(daemon.socket, "solo") as c:
        writer = sg.ShardguardWriter(c)
        dcp.save(_plain_state(1), checkpoint_id="ckpt/step-5", storage_writer=writer)
        c.wait(restorable=True)  # dcp.save returned once the bytes were copied
        assert c.latest() == 5
        got = _zeros_like(_plain_state(1))
        dcp.load(got, storage_reader=sg.ShardguardReader(c))
        assert _diff(_plain_state(1), got) == []
        fut = dcp.async_save(_plain_state(2), checkpoint_id=6, storage_writer=writer)
        fut.result()
        c.wait(restorable=True)
        assert c.latest() == 6
        # A live process holds the job's rank: the reader by name says which client to use.
        with pytest.raises(CheckpointException, match="pass its Client"):
            dcp.load(_zeros_like(_plain_state(2)),
                     storage_reader=sg.ShardguardReader("solo", socket=daemon.socket))
    got = _zeros_like(_plain_state(2))
    reader = sg.ShardguardReader("solo", socket=daemon.socket)
    dcp.load(got, storage_reader=reader)
    assert reader.loaded_step == 6 and _diff(_plain_state(2), got) == []


@_no_dist
def test_writer_and_reader_refusals(daemon) -> None:
    with sg.connect(daemon.socket, "refuse") as c:
        with pytest.raises(CheckpointException, match="needs a step"):
            dcp.save(_plain_state(1), storage_writer=sg.ShardguardWriter(c))
        writer = sg.ShardguardWriter(c, step=3)
        dcp.save(_plain_state(1), storage_writer=writer)
        with pytest.raises(CheckpointException, match="not after step 3"):
            dcp.save(_plain_state(1), storage_writer=writer)
        with pytest.raises(ValueError, match="names no step"):
            dcp.save(_plain_state(1), checkpoint_id="latest", storage_writer=writer)
    with pytest.raises(CheckpointException, match="none of the ranks' daemons"):
        dcp.load(_zeros_like(_plain_state(1)),
                 storage_reader=sg.ShardguardReader("nosuchjob", socket=daemon.socket))


if __name__ == "__main__":
    sys.exit(main())
