"""PyTorch Lightning on shardguard: one callback, no other change to the script.

    from shardguard.integrations.lightning import ShardguardLightningCallback

    trainer = L.Trainer(max_steps=..., callbacks=[ShardguardLightningCallback()])
    trainer.fit(model, train_dataloaders=loader)     # resumes by itself when a snapshot exists

Why a ``Callback`` and not a ``CheckpointIO`` plugin: a ``CheckpointIO`` only sees the
paths Lightning chose before ``fit`` started, and before the process group exists (so it
cannot ask shardguard, which agrees on a step across ranks, whether there is anything to
resume), and it would also catch the files ``ModelCheckpoint`` is meant to write to disk. A
callback is called at both moments that matter: in ``setup`` (the process group exists,
Lightning has not restored yet) it hands Lightning the restored checkpoint exactly as if
``fit(ckpt_path=...)`` had read it from a file; in ``on_train_batch_end`` (where
``ModelCheckpoint(every_n_train_steps=...)`` saves, the point Lightning's mid-epoch resume
is built for) it snapshots the checkpoint Lightning itself would write, asynchronously.

What is resumed: everything in a Lightning checkpoint (model, optimizers, LR schedulers,
precision plugin, callbacks' and the datamodule's state, the fit loop's progress, and a
``torchdata.stateful_dataloader.StatefulDataLoader``'s position), plus the RNG states
(python, numpy, torch CPU and CUDA), which a Lightning checkpoint does not hold. A plain
``DataLoader`` has no position to save: a resume in the middle of an epoch then cannot skip
the batches already seen (Lightning warns); use a ``StatefulDataLoader`` for an exact
resume mid-epoch.

A Lightning checkpoint may hold arbitrary Python objects (``hyper_parameters``, a
callback's state), so snapshots are taken with ``allow_pickle=True``, as a ``.ckpt`` file is
read with ``torch.load(weights_only=False)``: restore only snapshots of your own jobs.
"""

from __future__ import annotations

import logging
from typing import Any

import shardguard.client as sg
from shardguard.integrations._versions import require

require("lightning")

import lightning.pytorch as pl  # noqa: E402  (after the version check)
from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)

#: The key under which a snapshot carries what a Lightning checkpoint lacks.
STATE_KEY = "shardguard"


class ShardguardLightningCallback(pl.Callback):
    """Snapshots a Lightning fit into shardguard every ``every`` optimizer steps and
    resumes it from the newest restorable snapshot.

    Args:
        every: snapshot when ``trainer.global_step % every == 0`` (after an optimizer
            step); the last step of training is always taken.
        client: a connected client; default: :func:`shardguard.client.connect` with
            ``connect_kwargs`` in ``setup`` (after Lightning set up the process group).
    """

    def __init__(self, every: int = 1, *, client: sg.Client | None = None,
                 **connect_kwargs: Any) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.client = client
        self._connect_kwargs = {"allow_pickle": True, **connect_kwargs}
        self._last_step = -1          # the newest global step snapshotted
        self._handle: sg.SnapshotHandle | None = None
        self._protected: list[Any] = []
        # After a resume: the RNG states to set, and at which hook (see _rng_point).
        self._rng: Any = None
        self._rng_at: tuple[str, ...] = ()
        #: The step the last resume restored (None: started fresh).
        self.restored_step: int | None = None

    # ------------------------------------------------------------------ resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.client is None:
            self.client = sg.connect(**self._connect_kwargs)  # collective: every rank
        connector = trainer._checkpoint_connector
        if connector._ckpt_path or self.client.latest() is None:
            return  # fit(ckpt_path=...) given explicitly wins; or nothing to resume
        step, checkpoint = self.client.restore()
        ours = checkpoint.pop(STATE_KEY)
        # What fit(ckpt_path=...) would have read from a file: Lightning restores the model
        # and callbacks next, then optimizers, schedulers and loops after strategy setup.
        connector._loaded_checkpoint = _pl_migrate_checkpoint(checkpoint)
        self._rng, self._rng_at = ours["rng"], _rng_point(ours["last_of_epoch"])
        self._last_step = self.restored_step = step
        logger.info("job=%s rank=%d: resuming the Lightning fit from step %d",
                    self.client.job, self.client.rank, step)

    def _set_rng(self, hook: str) -> None:
        if self._rng is not None and hook in self._rng_at:
            sg.set_rng_state(self._rng)
            self._rng = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_rng("on_train_epoch_start")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._set_rng("on_train_batch_start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_rng("on_train_epoch_end")

    # ---------------------------------------------------------------- snapshot

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.client is not None
        if not pl_module.automatic_optimization:
            # The user steps the optimizers: the copy must be done before any of them steps.
            for opt in trainer.optimizers:
                if opt not in self._protected:
                    self.client.protect(opt)
                    self._protected.append(opt)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # Lightning runs forward and backward inside optimizer.step(closure), so an
        # optimizer pre-hook (client.protect) would wait before the forward; here, after
        # the backward, the copy has had the whole forward and backward to finish in.
        if self._handle is not None:
            self._handle.wait_copied()
            self._handle = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > self._last_step and (step % self.every == 0 or _is_last_step(trainer)):
            self._snapshot(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.client is not None
        if trainer.global_step > self._last_step:
            self._snapshot(trainer, trainer.global_step)  # the last step is never left out
        self.client.wait()  # collective: takes the last step if it was skipped

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.client is not None:
            self.client.close()
            self.client = None
            self._protected = []

    def _snapshot(self, trainer: pl.Trainer, step: int) -> None:
        assert self.client is not None
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        epoch_loop = trainer.fit_loop.epoch_loop
        checkpoint[STATE_KEY] = {"rng": sg.rng_state(),
                                 "last_of_epoch": bool(epoch_loop.batch_progress.is_last_batch)}
        self._handle = self.client.snapshot(step, checkpoint)
        self._last_step = step


def _is_last_step(trainer: pl.Trainer) -> bool:
    return trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step


def _rng_point(last_of_epoch: bool) -> tuple[str, ...]:
    """Where a resumed fit sets the snapshot's RNG states: where the uninterrupted run
    drew next from them. In the middle of an epoch, that is the next batch (nothing
    between a batch's end and the next batch's start draws, but a resumed fit recreates
    the dataloader iterator first, which does). After an epoch's last batch it is the
    epoch's end (or the next epoch's start), before the next epoch's sampler draws."""
    if last_of_epoch:
        return ("on_train_epoch_end", "on_train_epoch_start")
    return ("on_train_batch_start",)
