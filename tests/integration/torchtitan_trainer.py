"""What torchtitan's ``Trainer.train`` does with its checkpoint manager, on CPU and gloo.

torchtitan's Trainer needs an accelerator (its device is CUDA unless another is found), so
this script builds what the Trainer builds for checkpointing — its real
``OptimizersContainer``, ``LRSchedulersContainer`` (warmup + linear decay),
``ParallelAwareDataloader`` (a StatefulDataLoader) and a ``train_state`` that is
``Stateful`` like the Trainer — hands them to the checkpoint manager exactly as
``Trainer.__init__`` does (``config.checkpoint.build(...)``), and calls it as
``Trainer.train`` does: ``load(step=config.checkpoint.load_step)`` first, then after every
step ``save(step, last_step=step == steps)``; ``maybe_wait_for_saving`` and ``close`` at
the end. The model is a small MLP with dropout; each rank draws its own data shard.

    python torchtitan_trainer.py --out DIR --steps 12            # one process
    torchrun --nproc-per-node 2 ... torchtitan_trainer.py ...    # gloo, two ranks

Records, for the tests: every step's exact loss (``OUT/losses.<rank>``), the step each
incarnation loaded (``OUT/restored.<rank>``), the final model, optimizer and scheduler
state (``OUT/final.<rank>.pt``). ``--kill-after-restorable K`` SIGKILLs rank 0 once
when step K is restorable; ``SHARDGUARD_TEST_FAULT=mid-copy@K`` in the middle of a copy.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from shardguard.integrations.torchtitan import ShardguardCheckpointManager

DIM = 16
SAMPLES = 48


class TrainState(Stateful):
    """The Trainer's own ``train_state`` (``Trainer.state_dict``)."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--async-mode", default="disabled")
    p.add_argument("--no-snapshot", action="store_true")
    p.add_argument("--kill-after-restorable", type=int, default=-1)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    else:  # torchtitan always runs under torch.distributed (async saves need a group)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.GELU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(64, DIM))
    optimizers = OptimizersContainer.Config(
        implementation="for-loop",
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                       optimizer_kwargs={"lr": 3e-3, "weight_decay": 0.01})],
    ).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
        optimizers=optimizers, training_steps=a.steps)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, DIM, generator=g)
    data = torch.utils.data.TensorDataset(x, x.flip(1) * 0.5)
    sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=9)
    dataloader = ParallelAwareDataloader(data, dp_rank=rank, dp_world_size=world,
                                         batch_size=4, sampler=sampler)
    train_state = TrainState()

    # What Trainer.Config.checkpoint holds: the only line a torchtitan user changes.
    cls = CheckpointManager if a.no_snapshot else ShardguardCheckpointManager
    checkpoint = cls.Config(enable=not a.no_snapshot, interval=1, async_mode=a.async_mode,
                            last_save_model_only=False, keep_latest_k=0)
    checkpointer = checkpoint.build(  # as Trainer.__init__ builds it
        dataloader=dataloader, model_parts=[model], optimizers=optimizers,
        lr_schedulers=lr_schedulers, states={"train_state": train_state}, sd_adapter=None,
        base_folder=a.out)

    checkpointer.load(step=checkpoint.load_step)  # as Trainer.train starts
    with open(os.path.join(a.out, f"restored.{rank}"), "a") as fh:
        fh.write(f"{train_state.step if train_state.step else None}\n")
    marker = os.path.join(a.out, "killed")
    epoch, it = -1, None
    while train_state.step < a.steps:
        train_state.step += 1
        if it is None:
            it = iter(dataloader)
        try:
            xb, yb = next(it)
        except StopIteration:
            epoch += 1
            it = iter(dataloader)
            xb, yb = next(it)
        # torchtitan's checkpoints hold no RNG state (nor do its models use dropout); the
        # dropout here draws from a generator seeded per step, as a deterministic run does.
        torch.manual_seed(100 + rank + 1000 * train_state.step)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        if world > 1:
            for p_ in model.parameters():
                dist.all_reduce(p_.grad)
                p_.grad /= world
        optimizers.step()
        lr_schedulers.step()
        optimizers.zero_grad()
        train_state.ntokens_seen += xb.numel()
        with open(os.path.join(a.out, f"losses.{rank}"), "a") as fh:
            fh.write(f"{train_state.step} {loss.item().hex()}\n")
        checkpointer.save(train_state.step, last_step=(train_state.step == a.steps))
        if train_state.step == a.kill_after_restorable and not os.path.exists(marker):
            checkpointer.maybe_wait_for_saving()
            checkpointer.client.wait(restorable=True)
            if rank == 0:
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
    checkpointer.maybe_wait_for_saving()
    opt_state = optimizers.optimizers[0].state_dict()
    # A loaded optimizer lists its param-group keys in another order (torch's
    # set_optimizer_state_dict, as after torchtitan's own load): compare them by name.
    opt_state["param_groups"] = [dict(sorted(g.items())) for g in opt_state["param_groups"]]
    torch.save({"model": model.state_dict(),
                "optimizer": opt_state,
                "scheduler": lr_schedulers.state_dict(),
                "train_state": train_state.state_dict()},
               os.path.join(a.out, f"final.{rank}.pt"))
    checkpointer.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
