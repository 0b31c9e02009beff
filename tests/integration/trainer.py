"""A real training job for the integration tests: N gloo ranks started with torch.multiprocessing.

Each rank trains a small MLP with AdamW (gradients all-reduced, as DDP does),
snapshots every step into its node daemon, and on start resumes from the
newest restorable step if there is one. Every (step, loss) it computes is
appended to ``OUT/losses.<rank>`` as an exact hex float; at the end the final
model, optimizer and RNG state go to ``OUT/final.<rank>.pt``. When any rank
dies, torch.multiprocessing ends the others and this launcher exits non-zero,
as torchrun would.

    python trainer.py --out DIR --job J --world 2 --steps 60 [--socket S | --sockets S0,S1]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import shardguard.client as sg

DIM = 64
# Big enough that some tensors take the background copy path, small enough to be quick.
HIDDEN = 1024


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.GELU(), torch.nn.Linear(HIDDEN, DIM))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return model, opt


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "rng": sg.rng_state(),
            "step": step, "meta": {"dim": DIM, "tag": "mlp", "lr": 1e-3}}


def worker(rank: int, args: argparse.Namespace) -> None:
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(args.world)
    os.environ["SHARDGUARD_SOCKET"] = args.sockets[rank % len(args.sockets)]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                            world_size=args.world)
    with open(os.path.join(args.out, f"pid.{rank}"), "w") as fh:
        fh.write(str(os.getpid()))
    model, opt = build()
    # Each rank draws its own data; every stream a resume must reproduce is seeded.
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    client = sg.connect(job=args.job) if not args.no_snapshot else None
    start = 0
    if client is not None:
        client.protect(opt)
        try:
            restorable = client.latest()
            step, state = client.restore() if restorable is not None else (None, None)
        except sg.ShardguardError as exc:
            if not args.expect_restore_error:
                raise
            with open(os.path.join(args.out, f"error.{rank}"), "w") as fh:
                fh.write(f"{type(exc).__name__}: {exc}")
            try:  # nobody leaves (and closes its connections) while another still gathers
                dist.barrier()
            except RuntimeError:
                pass
            client.close()
            dist.destroy_process_group()
            return
        with open(os.path.join(args.out, f"restored.{rank}"), "a") as fh:
            fh.write(f"{step}\n")
        if step is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            sg.set_rng_state(state["rng"])
            assert state["meta"] == {"dim": DIM, "tag": "mlp", "lr": 1e-3}
            start = step + 1
    losses = open(os.path.join(args.out, f"losses.{rank}"), "a")
    taken = open(os.path.join(args.out, f"snapshots.{rank}"), "a")
    target = torch.linspace(-1, 1, DIM)
    for step in range(start, args.steps):
        x = torch.randn(16, DIM)
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= args.world
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.write(f"{step} {loss.item().hex()}\n")
        losses.flush()
        if client is not None:
            handle = client.snapshot(step, state_of(model, opt, step))
            if not handle.skipped:
                taken.write(f"{step}\n")
                taken.flush()
        if args.step_sleep:
            time.sleep(args.step_sleep)
    if client is not None:
        client.wait()
        client.close()
    final = state_of(model, opt, args.steps - 1)
    torch.save(final, os.path.join(args.out, f"final.{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--socket", default=None)
    p.add_argument("--sockets", default=None, help="comma-separated, rank i uses i mod n")
    p.add_argument("--no-snapshot", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to wait after each step (time for faults mid-run)")
    p.add_argument("--expect-restore-error", action="store_true",
                   help="a failed restore is written to OUT/error.<rank> instead of raised")
    args = p.parse_args(argv)
    args.sockets = (args.sockets or args.socket or os.environ["SHARDGUARD_SOCKET"]).split(",")
    args.port = free_port()
    os.makedirs(args.out, exist_ok=True)
    try:
        mp.start_processes(worker, args=(args,), nprocs=args.world, start_method="fork")
    except mp.ProcessExitedException as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
