"""A PyTorch Lightning fit protected by shardguard: kill it at any point, run it again, and it
goes on from the last snapshot, bit for bit, mid-epoch included (a StatefulDataLoader keeps
the position).

    shardguard daemon &                                  # one per node, before the job
    SHARDGUARD_JOB=pl-demo python examples/lightning_fit.py --steps 300
    # ... kill -9 it, then the same command again: it resumes

(``pip install -c constraints.txt 'shardguard[lightning]'`` and ``torchdata``.) The
shardguard line is marked.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from shardguard.integrations.lightning import ShardguardLightningCallback


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(256, 32))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    pl.seed_everything(0)
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(1))
    loader = StatefulDataLoader(torch.utils.data.TensorDataset(x, x.flip(1)), batch_size=32,
                                shuffle=True)
    trainer = pl.Trainer(max_steps=a.steps, logger=False, enable_checkpointing=False,
                         callbacks=[ShardguardLightningCallback()])          # shardguard
    trainer.fit(Net(), train_dataloaders=loader)


if __name__ == "__main__":
    main()
