"""A PyTorch Lightning fit as users write it, with shardguard's callback: a small MLP with
dropout, AdamW and a per-step LR schedule, a shuffled StatefulDataLoader, two epochs.

    python lightning_fit.py --out DIR --steps 12                       # one process
    torchrun --nproc-per-node 2 ... lightning_fit.py --out DIR         # DDP, gloo

The user's code is the marked line. The rest records, for the tests, every training
step's exact loss (``OUT/losses.<rank>``), the step each incarnation resumed from
(``OUT/restored.<rank>``), and the final model, optimizer and scheduler state
(``OUT/final.<rank>.pt``). ``--kill-after-restorable K`` SIGKILLs rank 0 once (a marker
file in OUT) when step K is restorable; ``SHARDGUARD_TEST_FAULT=mid-copy@K`` SIGKILLs it
in the middle of step K's copy.
"""

from __future__ import annotations

import argparse
import os
import signal

import lightning.pytorch as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from shardguard.integrations.lightning import ShardguardLightningCallback

DIM = 16
SAMPLES = 24  # 6 batches an epoch on one process


class Net(pl.LightningModule):
    def __init__(self, losses_path: str) -> None:
        super().__init__()
        self.losses_path = losses_path
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.GELU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(64, DIM))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):  # type: ignore[override]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        with open(self.losses_path, "a") as fh:  # test instrumentation
            fh.write(f"{self.global_step + 1} {loss.item().hex()}\n")
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=64)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class KillWhenRestorable(pl.Callback):
    def __init__(self, sg_cb: ShardguardLightningCallback, step: int, marker: str) -> None:
        self.sg_cb, self.step, self.marker = sg_cb, step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step != self.step or os.path.exists(self.marker):
            return
        self.sg_cb.client.wait(restorable=True)
        if trainer.global_rank == 0:
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--no-snapshot", action="store_true")
    p.add_argument("--kill-after-restorable", type=int, default=-1)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    pl.seed_everything(3, verbose=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, DIM, generator=g)
    data = torch.utils.data.TensorDataset(x, x.flip(1) * 0.5)
    loader = StatefulDataLoader(data, batch_size=4, shuffle=True)
    model = Net(os.path.join(a.out, f"losses.{rank}"))

    sg_cb = ShardguardLightningCallback()
    callbacks: list[pl.Callback] = [] if a.no_snapshot else [sg_cb]
    if a.kill_after_restorable >= 0:
        callbacks.append(KillWhenRestorable(sg_cb, a.kill_after_restorable,
                                            os.path.join(a.out, "killed")))
    trainer = pl.Trainer(
        max_steps=a.steps, accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", "1")),
        callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=a.out)                                                # user code
    trainer.fit(model, train_dataloaders=loader)
    with open(os.path.join(a.out, f"restored.{rank}"), "a") as fh:
        fh.write(f"{sg_cb.restored_step}\n")
    torch.save({"model": model.state_dict(),
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()},
               os.path.join(a.out, f"final.{rank}.pt"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
