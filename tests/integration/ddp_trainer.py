"""A real DistributedDataParallel job for tests/integration/test_ddp.py, launched by torchrun.

Every rank trains a small MLP wrapped in ``DistributedDataParallel`` (gloo, CPU,
``bucket_cap_mb`` small enough for several gradient buckets) with AdamW. With
``--socket`` it snapshots every step into its node daemon and waits until the step
is restorable (so a rank killed at step k resumes from step k - 1 exactly); on start
it resumes from the newest restorable step. ``--ddp-state`` keeps the wrapper's
bucket order with each snapshot (``sg.ddp_state``) and installs it on resume
(``sg.load_ddp_state``); without it the resume is the plain one. Without
``--socket`` it is the uninterrupted reference: plain DDP, no shardguard at all.

Each (step, loss) goes to ``OUT/losses.<rank>`` as an exact hex float; the restored
step and what ``load_ddp_state`` answered to ``OUT/restored.<rank>``; the final
parameters and optimizer state to ``OUT/final.<rank>.pt``; DDP's rebuilt bucket sizes
to ``OUT/buckets.<rank>``.
A fault (``SHARDGUARD_TEST_FAULT``) fires in torchrun's first incarnation only.

    torchrun --standalone --nproc-per-node N ddp_trainer.py --out DIR --steps S
        [--socket SOCK --job JOB [--ddp-state]] [--static-graph]
"""

from __future__ import annotations

import argparse
import os
import sys

# The fault is for the first incarnation: torchrun restarts every worker with the
# same environment, and shardguard's fault points read it when imported.
if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
    os.environ.pop("SHARDGUARD_TEST_FAULT", None)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import shardguard.client as sg  # noqa: E402

DIM = 32
# Parameters of five sizes; at 0.02 MB a bucket DDP rebuilds them into four buckets.
WIDTHS = (DIM, 64, 128, 128, 64, 16)
BUCKET_CAP_MB = 0.02


def build(static_graph: bool) -> tuple[torch.nn.Module, DistributedDataParallel,
                                       torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(WIDTHS, WIDTHS[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB, static_graph=static_graph)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    return model, ddp, opt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--socket", default=None, help="snapshot into this daemon (else: reference)")
    p.add_argument("--job", default="ddp")
    p.add_argument("--ddp-state", action="store_true", help="keep and restore the bucket order")
    p.add_argument("--static-graph", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ddp, opt = build(args.static_graph)
    torch.manual_seed(1000 + rank)  # each rank its own data; the stream is in the snapshot
    client = sg.connect(socket=args.socket, job=args.job) if args.socket else None
    start = 0
    if client is not None:
        client.protect(opt)
        step, exact = None, None
        if client.latest() is not None:
            step, state = client.restore()
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            sg.set_rng_state(state["rng"])
            if args.ddp_state:
                exact = sg.load_ddp_state(ddp, state["ddp"])
            start = step + 1
        with open(os.path.join(args.out, f"restored.{rank}"), "a") as fh:
            fh.write(f"{step} {exact}\n")
    target = torch.linspace(-1, 1, WIDTHS[-1])
    with open(os.path.join(args.out, f"losses.{rank}"), "a") as losses:
        for step in range(start, args.steps):
            loss = ((ddp(torch.randn(8, DIM)) - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.write(f"{step} {loss.item().hex()}\n")
            losses.flush()
            if client is not None:
                state = {"model": model.state_dict(), "optim": opt.state_dict(),
                         "rng": sg.rng_state(), "step": step}
                if args.ddp_state:
                    state["ddp"] = sg.ddp_state(ddp)
                client.snapshot(step, state)
                client.wait(restorable=True)
    if client is not None:
        client.close()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()},
               os.path.join(args.out, f"final.{rank}.pt"))
    with open(os.path.join(args.out, f"buckets.{rank}"), "w") as fh:
        fh.write(ddp._get_ddp_logging_data().get("rebuilt_bucket_sizes", ""))
    dist.destroy_process_group()
    # torch 2.13: the DDP Reducer's destructor joins gloo's worker thread while holding the
    # GIL that thread may need to free its last work item, and a worker hangs at exit (seen
    # in the suite). Every output above is written and closed; leave without the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
