"""Hugging Face ``Trainer`` (and the accelerate inside it) on shardguard: one callback.

    from shardguard.integrations.hf import ShardguardCallback

    sg_cb = ShardguardCallback()                       # a snapshot every optimizer step
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[sg_cb])
    trainer.train(resume_from_checkpoint=sg_cb.resume(trainer))

A snapshot holds what the Trainer's own checkpoint holds (model, optimizer, scheduler,
grad scaler, its per-process RNG states, ``TrainerState`` with the callbacks' states and
``TrainerControl``), plus the logging accumulators, so that the losses logged after a
resume are the ones an uninterrupted run logs, and a DDP wrapper's bucket order
(:func:`shardguard.client.ddp_state`). It is taken where the Trainer would save its own
checkpoint of that step: after the step's logging, evaluation and saving, before the next
batch is trained on (at the next ``on_step_begin``, or ``on_epoch_end``). ``resume()``
writes the newest restorable snapshot out as a Trainer checkpoint folder in memory
(``/dev/shm``) and returns its path, so that the Trainer resumes with its own semantics:
the batches already seen are skipped, the RNG is set where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

import shardguard.client as sg
from shardguard.client._unwrap import unwrap_optimizer
from shardguard.integrations._versions import require

require("transformers")
require("accelerate")

from transformers import TrainerCallback  # noqa: E402  (after the version check)
from transformers.trainer_callback import ExportableState  # noqa: E402

logger = logging.getLogger(__name__)

# The Trainer's checkpoint file names (transformers.trainer and trainer_utils; stable
# since 4.x, spelled here so that a rename fails loudly in the tests, not silently).
WEIGHTS_NAME = "pytorch_model.bin"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
#: Where resume folders go: memory when the machine has /dev/shm.
RESUME_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


class ShardguardCallback(TrainerCallback):
    """Snapshots a ``Trainer`` into shardguard every ``every`` optimizer steps.

    Args:
        every: snapshot every this many optimizer steps (``global_step % every == 0``);
            the last step of training is always taken.
        client: a connected client; default: :func:`shardguard.client.connect` with
            ``connect_kwargs`` at :meth:`resume` (collective under torchrun: every rank
            calls ``resume``).
        resume_dir: where :meth:`resume` writes the checkpoint folder (default
            ``/dev/shm``); it is removed once the Trainer has read it.
    """

    def __init__(self, every: int = 1, *, client: sg.Client | None = None,
                 resume_dir: str | None = None, **connect_kwargs: Any) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.client = client
        self.resume_dir = resume_dir or RESUME_DIR
        self._connect_kwargs = connect_kwargs
        self._trainer: Any = None
        self._due: int | None = None        # a step whose snapshot waits for its save point
        self._folder: str | None = None     # the resume folder, until the Trainer read it
        self._restored: dict[str, Any] | None = None  # what the folder cannot carry
        self._protected: Any = None
        #: The step the last :meth:`resume` restored (None: started fresh).
        self.restored_step: int | None = None

    # ----------------------------------------------------------------- user API

    def resume(self, trainer: Any) -> str | None:
        """Bind to ``trainer``; the newest restorable snapshot as a Trainer checkpoint
        folder for ``trainer.train(resume_from_checkpoint=...)``, or None to start fresh.

        Collective under torch.distributed: call it on every rank.
        """
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        if self.client is None:
            self.client = sg.connect(**self._connect_kwargs)
        if self.client.latest() is None:
            return None
        step, state = self.client.restore()
        self.restored_step = step
        self._folder = self._write_folder(trainer, step, state)
        self._restored = {k: state.get(k) for k in ("loss", "ddp")}
        logger.info("job=%s rank=%d: resuming the Trainer from step %d (%s)",
                    self.client.job, self.client.rank, step, self._folder)
        return self._folder

    # ---------------------------------------------------------------- callbacks

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None or self.client is None:
            raise RuntimeError("ShardguardCallback: call trainer.train(resume_from_checkpoint="
                               "callback.resume(trainer)) so that it can snapshot and resume")
        trainer = self._trainer
        optimizer = unwrap_optimizer(trainer.optimizer)
        if optimizer is not self._protected:
            self.client.protect(optimizer)  # optimizer.step() waits for an in-flight copy
            self._protected = optimizer
        if self._restored is not None:
            # The Trainer has just reset these (after loading the folder, before step one):
            # the loss summed since the last log, so that the next logged loss is the
            # uninterrupted run's. (train_loss, the mean over this train() call, starts
            # afresh, as after the Trainer's own resume.)
            loss = self._restored["loss"]
            if loss is not None and hasattr(trainer, "_tr_loss"):
                trainer._tr_loss = loss["tr_loss"].to(trainer._tr_loss.device)
                trainer._globalstep_last_logged = loss["globalstep_last_logged"]
                trainer.current_flos = loss["current_flos"]
            ddp = self._restored["ddp"]
            if ddp is not None and isinstance(trainer.model_wrapped,
                                              torch.nn.parallel.DistributedDataParallel):
                sg.load_ddp_state(trainer.model_wrapped, ddp)  # before its first forward
            self._restored = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._drop_folder()  # the Trainer has read everything of it by now
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._due = state.global_step

    # The step's save point: its logging, evaluation and saving are done, the next batch
    # is not trained on yet (at an epoch's end, the next epoch's sampler has not drawn).
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._take_due()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._take_due()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._take_due()
        self._drop_folder()
        if self.client is not None:
            self.client.wait()  # collective: takes the last step if it was skipped

    # ---------------------------------------------------------------- internals

    def _take_due(self) -> None:
        if self._due is None:
            return
        step, self._due = self._due, None
        assert self.client is not None
        self.client.snapshot(step, self._state(self._trainer))

    def _state(self, trainer: Any) -> dict[str, Any]:
        """What the Trainer's checkpoint of this step holds, in memory."""
        state: dict[str, Any] = {
            "model": trainer.model.state_dict(),
            "optimizer": unwrap_optimizer(trainer.optimizer).state_dict(),
            "scheduler": trainer.lr_scheduler.state_dict(),
            "scaler": _scaler_state(trainer),
            "rng": _hf_rng_state(trainer.args),
            "trainer_state": _trainer_state_json(trainer),
            "loss": None,
            "ddp": None,
        }
        if hasattr(trainer, "_tr_loss"):
            state["loss"] = {
                "tr_loss": trainer._tr_loss.detach().clone(),
                "globalstep_last_logged": int(trainer._globalstep_last_logged),
                "current_flos": float(trainer.current_flos),
            }
        if isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
            state["ddp"] = sg.ddp_state(trainer.model_wrapped)
        return state

    def _write_folder(self, trainer: Any, step: int, state: dict[str, Any]) -> str:
        """The snapshot as the checkpoint folder ``Trainer._save_checkpoint`` writes."""
        assert self.client is not None
        folder = tempfile.mkdtemp(prefix=f"shardguard-hf-{self.client.job}-r{self.client.rank}"
                                         f"-step{step}-", dir=self.resume_dir)
        torch.save(state["model"], os.path.join(folder, WEIGHTS_NAME))
        torch.save(state["optimizer"], os.path.join(folder, OPTIMIZER_NAME))
        torch.save(state["scheduler"], os.path.join(folder, SCHEDULER_NAME))
        if state["scaler"] is not None:
            torch.save(state["scaler"], os.path.join(folder, SCALER_NAME))
        rng_name = ("rng_state.pth" if trainer.args.world_size <= 1
                    else f"rng_state_{trainer.args.process_index}.pth")
        torch.save(state["rng"], os.path.join(folder, rng_name))
        with open(os.path.join(folder, TRAINER_STATE_NAME), "w", encoding="utf-8") as fh:
            fh.write(state["trainer_state"])
        return folder

    def _drop_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _scaler_state(trainer: Any) -> Any:
    scaler = getattr(trainer.accelerator, "scaler", None)
    return None if scaler is None else scaler.state_dict()


def _hf_rng_state(args: Any) -> dict[str, Any]:
    """The RNG states in the format of ``Trainer._save_rng_state`` (what its resume reads)."""
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        distributed = args.parallel_mode.value == "distributed"
        rng["cuda"] = (torch.cuda.random.get_rng_state_all() if distributed
                       else torch.cuda.random.get_rng_state())
    return rng


def _trainer_state_json(trainer: Any) -> str:
    """``trainer.state`` as ``_save_checkpoint`` writes it: with every exportable
    callback's state (``TrainerControl`` included), without changing the live state."""
    state = copy.copy(trainer.state)
    exported: dict[str, Any] = {}
    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(cb, ExportableState):
            name = type(cb).__name__
            if name in exported:  # several of one class: a list, as TrainerState keeps them
                if not isinstance(exported[name], list):
                    exported[name] = [exported[name]]
                exported[name].append(cb.state())
            else:
                exported[name] = cb.state()
    state.stateful_callbacks = exported
    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
