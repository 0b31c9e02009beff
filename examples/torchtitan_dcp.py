"""torchtitan's checkpoints in shardguard: the configuration a torchtitan user changes.

torchtitan builds its checkpoint manager from ``Trainer.Config.checkpoint``; with
``ShardguardCheckpointManager.Config`` there, every ``dcp.save``/``dcp.async_save`` of the
Trainer goes into the node daemons' memory and ``checkpointer.load()`` at start reads the
newest restorable step back. In a torchtitan config module::

    from shardguard.integrations.torchtitan import ShardguardCheckpointManager

    def llama3_debugmodel() -> Trainer.Config:
        return Trainer.Config(
            ...,
            checkpoint=ShardguardCheckpointManager.Config(
                enable=True, interval=10, async_mode="async",
                last_save_model_only=True,          # the final export still goes to files
            ),
        )

and launch torchtitan as usual, under torchrun with ``--rdzv-id`` (the shardguard job)
and a daemon per node (``shardguard daemon``).

torchtitan's Trainer needs an accelerator, so this script, which runs anywhere (CPU, gloo),
drives the same manager the way ``Trainer.train`` does, with torchtitan's real optimizer,
LR-scheduler and dataloader containers:

    shardguard daemon &
    torchrun --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 \
        --rdzv-id titan-demo examples/torchtitan_dcp.py --steps 100
    # ... kill -9 a rank, then the same command again: it resumes

(``pip install -c constraints.txt 'shardguard[torchtitan]'``.)
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from shardguard.integrations.torchtitan import ShardguardCheckpointManager


class TrainState(Stateful):
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 32))
    optimizers = OptimizersContainer.Config(
        implementation="for-loop",
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                       optimizer_kwargs={"lr": 1e-3})]).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=10).build(
        optimizers=optimizers, training_steps=a.steps)
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(x, x.flip(1))
    dataloader = ParallelAwareDataloader(
        data, dp_rank=rank, dp_world_size=world, batch_size=32,
        sampler=torch.utils.data.DistributedSampler(data, world, rank, seed=0))
    state = TrainState()

    config = ShardguardCheckpointManager.Config(enable=True, interval=1,    # shardguard
                                                async_mode="async")
    checkpointer = config.build(dataloader=dataloader, model_parts=[model],
                                optimizers=optimizers, lr_schedulers=lr_schedulers,
                                states={"train_state": state}, sd_adapter=None)
    checkpointer.load(step=config.load_step)
    batches = iter(dataloader)
    while state.step < a.steps:
        state.step += 1
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(dataloader)
            xb, yb = next(batches)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        for prm in model.parameters():
            dist.all_reduce(prm.grad)
            prm.grad /= world
        optimizers.step()
        lr_schedulers.step()
        optimizers.zero_grad()
        checkpointer.save(state.step, last_step=state.step == a.steps)
        if rank == 0 and state.step % 10 == 0:
            print(f"step {state.step} loss {loss.item():.4f}", flush=True)
    checkpointer.maybe_wait_for_saving()
    checkpointer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
