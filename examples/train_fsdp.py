"""Train a small transformer with FSDP2, checkpointing into shardguard through DCP.

torchtitan's checkpoint flow with shardguard as the storage: the training state is
a ``Stateful`` (model and optimizer through ``get_state_dict``/``set_state_dict``,
so DTensor shards), saved every ``--ckpt-every`` steps with ``dcp.async_save``
(staged at the call, written into the node daemon's memory while the next steps
train) and loaded with ``dcp.load`` on start. A restart may use another number of
ranks: each world size trains under its own shardguard job (``<job>-w<world>``),
the newest restorable one is read whatever its size, and DCP's planner reshards it.
After the resized run's first checkpoint is protected, the old job is dropped.

    shardguard daemon &                                   # one per node, before the job
    torchrun --nproc-per-node 4 examples/train_fsdp.py --steps 200 --ckpt-every 20
    # ... kill it at any point, then run it again, with 4 ranks or any other number:
    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 200 --ckpt-every 20

Without torchrun, ``--nproc N`` starts N local ranks itself. On GPUs the model
trains with NCCL (one device per local rank); the checkpoint's collectives run
on a gloo group of their own, as ``async_save`` needs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import fully_shard

import shardguard.client as sg

VOCAB = 256


# ------------------------------------------------------------------ the model


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.size(1), device=tokens.device)
        x = self.tok(tokens) + self.pos(pos)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def batch(step: int, rank: int, args: argparse.Namespace, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch that depends only on (step, rank): a resumed run sees the same data.

    The sequences count up modulo a stride, so there is something to learn.
    """
    g = torch.Generator().manual_seed(step * 100_003 + rank)
    start = torch.randint(VOCAB, (args.batch, 1), generator=g)
    stride = torch.randint(1, 8, (args.batch, 1), generator=g)
    seq = (start + stride * torch.arange(args.seq + 1)) % VOCAB
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


# ------------------------------------------------------------- checkpointing


class TrainState(Stateful):
    """What a checkpoint holds; DCP calls state_dict() to save, load_state_dict() to load."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.step = state["step"]


class Checkpointer:
    """Async saves into shardguard every ``every`` steps; the newest checkpoint on start."""

    def __init__(self, base: str, every: int, state: TrainState) -> None:
        self.base, self.every, self.state = base, every, state
        world = dist.get_world_size()
        # async_save's collectives, and the client's, run on DCP's thread: on a group the
        # training loop never uses.
        self.group = dist.new_group(backend="gloo")
        self.client = sg.connect_dcp(job=f"{base}-w{world}", group=self.group)
        self.writer = sg.ShardguardWriter(self.client)
        self.future: Any = None
        self.old_job: str | None = None

    def load(self) -> int:
        """Load the newest checkpoint of any world size; returns the step to start after."""
        job = sg.newest_job(f"{self.base}-w", self.client.socket_path, group=self.group)
        if job is None:
            return 0
        source = self.client if job == self.client.job else job
        reader = sg.ShardguardReader(source, group=self.group)
        t0 = time.perf_counter()
        dcp.load({"train": self.state}, storage_reader=reader)
        if job != self.client.job:
            self.old_job = job
        log(f"resumed from step {self.state.step} of job {job} "
            f"({time.perf_counter() - t0:.2f}s)")
        return self.state.step

    def save(self, step: int, last: bool = False) -> None:
        if step % self.every and not last:
            return
        self.wait()  # one checkpoint in flight at a time
        self.state.step = step
        self.future = dcp.async_save({"train": self.state}, checkpoint_id=step,
                                     storage_writer=self.writer, process_group=self.group)

    def wait(self) -> None:
        if self.future is None:
            return
        self.future.result()
        self.future = None
        if self.old_job is not None:
            # The run's own checkpoint is protected: the other world's job can go.
            self.client.wait(restorable=True)
            if dist.get_rank() == 0:
                try:
                    sg.drop_job(self.old_job, self.client.socket_path)
                    log(f"dropped job {self.old_job}")
                except sg.ShardguardError as exc:  # e.g. this node never held it
                    log(f"could not drop job {self.old_job}: {exc} (`shardguard drop`)")
            self.old_job = None

    def close(self) -> None:
        self.wait()
        self.client.wait(restorable=True)
        self.client.close()


# ------------------------------------------------------------------- training


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[rank 0] {msg}", flush=True)


def train(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    torch.manual_seed(args.seed)
    model = Transformer(args.dim, args.layers, args.heads, args.seq).to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    state = TrainState(model, optimizer)
    ckpt = Checkpointer(args.job, args.ckpt_every, state)
    start = ckpt.load()
    losses = open(args.losses, "a") if args.losses and rank == 0 else None
    for step in range(start + 1, args.steps + 1):
        if step == args.fail_at and rank == 0:
            log(f"failing at step {step}, as asked")
            os._exit(17)
        tokens, targets = batch(step, rank, args, device)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == args.steps:
            log(f"step {step} loss {loss.item():.4f}")
        if losses is not None:
            losses.write(f"{step} {world} {loss.item().hex()}\n")
            losses.flush()
        ckpt.save(step, last=step == args.steps)
    ckpt.close()
    dist.destroy_process_group()


def _local_rank(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.nproc))
    train(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=os.environ.get("SHARDGUARD_JOB", "train_fsdp"),
                   help="shardguard job name; each world size adds -w<world>")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA exists")
    p.add_argument("--nproc", type=int, default=0,
                   help="start this many local ranks (without torchrun)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank with --nproc (default: cores / nproc)")
    p.add_argument("--fail-at", type=int, default=0, help="rank 0 dies at this step")
    p.add_argument("--losses", default="", help="rank 0 appends 'step world loss' lines here")
    args = p.parse_args(argv)
    if not args.nproc:
        train(args)  # under torchrun
        return 0
    import torch.multiprocessing as mp

    args.port = _free_port()
    try:
        mp.start_processes(_local_rank, args=(args,), nprocs=args.nproc, start_method="fork")
    except mp.ProcessExitedException as exc:
        print(f"train_fsdp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
