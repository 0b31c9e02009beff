"""torchtitan on shardguard: a checkpoint manager that saves through the DCP backend.

torchtitan builds its checkpoint manager from ``Trainer.Config.checkpoint`` (any
``BaseCheckpointManager.Config``; ``config.checkpoint.build(...)`` constructs the class
that declares it). Putting this one there is the whole change::

    from shardguard.integrations.torchtitan import ShardguardCheckpointManager

    config = Trainer.Config(
        ...,
        checkpoint=ShardguardCheckpointManager.Config(enable=True, interval=1,
                                                      async_mode="async"),
    )

It is torchtitan's own ``CheckpointManager`` (same states: ``model`` flattened,
``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state``; same intervals, same
``load_step``/``exclude_from_loading``/``initial_load_path`` rules) with its DCP calls
pointed at shardguard: ``dcp.save``/``dcp.async_save`` with a
:class:`~shardguard.client.ShardguardWriter` (``checkpoint_id`` ``<folder>/step-N`` names
step N), ``dcp.load`` with a :class:`~shardguard.client.ShardguardReader` of the job's
newest restorable step. What stays on files: a fresh run's ``initial_load_path`` (or HF
weights) when shardguard holds nothing for the job, and the final model-only / HF export
(``last_save_model_only``, ``last_save_in_hf``), which goes to ``checkpoint.folder`` as
before, after the full last step went into shardguard.

``async_mode="async"`` runs DCP's ``write_data`` on its thread: the client then agrees on
the manager's own gloo group (the one torchtitan passes to ``async_save``).
``"async_with_pinned_mem"`` (DCP's staging into pinned memory, written from another
process) is refused: shardguard's snapshot is already one copy into pinned shared memory,
and its writer cannot leave the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import shardguard.client as sg
from shardguard.integrations._versions import require

require("torchtitan")

from torchtitan.components.checkpointer import CheckpointManager  # noqa: E402
from torchtitan.components.checkpointer.base import MODEL  # noqa: E402
from torchtitan.components.checkpointer.dcp import AsyncMode  # noqa: E402

logger = logging.getLogger(__name__)


class ShardguardCheckpointManager(CheckpointManager):
    """torchtitan's DCP checkpoint manager, saving to and loading from shardguard."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        job: str | None = None
        """The shardguard job (default: SHARDGUARD_JOB, SLURM_JOB_ID, torchrun --rdzv-id)."""

        socket: str | None = None
        """The node daemon's socket (default: SHARDGUARD_SOCKET, else the default path)."""

        wait_restorable: bool = False
        """A save returns only once the step is protected on every node (not as soon as
        its bytes are in the node's memory)."""

        def __post_init__(self) -> None:
            CheckpointManager.Config.__post_init__(self)
            if self.async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM.value:
                raise ValueError(
                    "ShardguardCheckpointManager: async_mode='async_with_pinned_mem' writes "
                    "from another process; use async_mode='async' (a shardguard snapshot is "
                    "already one copy into pinned shared memory)")

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not self.enable:
            return
        self.wait_restorable = config.wait_restorable
        # With async saves, DCP's collectives and the client's agreement run on the
        # manager's own gloo group, from DCP's thread, in order.
        self.client = sg.connect_dcp(config.socket, config.job, group=self.pg)
        self._files = False  # True while the parent writes the final export to files
        logger.info("job=%s rank=%d: checkpoints go to shardguard (DCP backend)",
                    self.client.job, self.client.rank)

    # --------------------------------------------------------------------- save

    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False) -> Any:
        if to_hf or self._files:
            return super().dcp_save(state_dict, checkpoint_id, async_mode,
                                    enable_garbage_collection, to_hf)
        writer = sg.ShardguardWriter(self.client, wait_restorable=self.wait_restorable)
        if async_mode == AsyncMode.ASYNC:
            return dcp.async_save(state_dict, storage_writer=writer,
                                  checkpoint_id=checkpoint_id, process_group=self.pg)
        dcp.save(state_dict, storage_writer=writer, checkpoint_id=checkpoint_id)
        return None

    def _save_last_step(self, curr_step: int) -> None:
        # The full state of the last step into shardguard, like every other step ...
        self.dcp_save(self._flattened_model_states_sd(), self._create_checkpoint_id(curr_step),
                      AsyncMode.DISABLED)
        if self.last_save_model_only or self.last_save_in_hf:
            # ... and the final export (model only, maybe HF) to files, as torchtitan does.
            self._files = True
            try:
                super()._save_last_step(curr_step)
            finally:
                self._files = False

    # --------------------------------------------------------------------- load

    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        latest = self.client.latest()  # the same on every rank
        if latest is None:
            # Nothing in memory for this job: a fresh start, or an initial load from files.
            return super()._load(step)
        if step not in (-1, latest):
            raise ValueError(f"checkpoint.load_step={step}: shardguard holds step {latest} of "
                             f"job {self.client.job} (a job keeps its newest step only)")
        states = self._states_to_load(model_only=False)
        reader = sg.ShardguardReader(self.client)
        dcp.load(states, storage_reader=reader)
        # torchtitan flattens the model's keys into the top level (as in its dcp_load).
        self.states[MODEL].load_state_dict(states)
        logger.info("job=%s rank=%d: loaded step %d from shardguard", self.client.job,
                    self.client.rank, reader.loaded_step)
        return True

    def _close(self) -> None:
        super()._close()
        client = getattr(self, "client", None)
        if client is not None:
            if self.save_future is not None:  # an async_save still writing
                self.save_future.result()
                self.save_future = None
            # Every save is whole when dcp.save returns (it never skips): nothing to flush,
            # and close() may run from __del__, where no collective belongs.
            client.close(flush=False)
            self.client = None
