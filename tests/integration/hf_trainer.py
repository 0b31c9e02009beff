"""A Hugging Face Trainer run as users write it, with shardguard's callback: a tiny GPT-2
built from a config, synthetic tokens, two epochs, dropout on, a warmup+linear schedule.

    python hf_trainer.py --out DIR --steps 12                    # one process
    torchrun --nproc-per-node 2 ... hf_trainer.py --out DIR      # DDP, gloo

The user's code is the three marked lines. The rest records, for the tests, every
training step's exact loss (``OUT/losses.<rank>``: step and float.hex, each incarnation
appends), the step each incarnation resumed from (``OUT/restored.<rank>``), and at the end
the final model, optimizer and scheduler state and the Trainer's logged losses
(``OUT/final.<rank>.pt``).

``--kill-after-restorable K`` SIGKILLs rank 0 once (a marker file in OUT) when step K is
restorable; ``SHARDGUARD_TEST_FAULT=mid-copy@K`` SIGKILLs it in the middle of step K's copy.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from shardguard.integrations import unwrap_optimizer
from shardguard.integrations.hf import ShardguardCallback

SEQ = 16
VOCAB = 128
SAMPLES = 24  # 6 steps an epoch on one process: a 12-step run crosses an epoch


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences (a fixed generator: the same on every rank and run)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordingTrainer(Trainer):
    """Records every training step's loss exactly (test instrumentation, not user code)."""

    losses_path = ""

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        loss = super().training_step(model, inputs, num_items_in_batch)
        with open(self.losses_path, "a") as fh:
            fh.write(f"{self.state.global_step + 1} {loss.item().hex()}\n")
        return loss


class KillWhenRestorable(TrainerCallback):
    """SIGKILL rank 0 once step K is restorable (after shardguard's callback took it)."""

    def __init__(self, sg_cb: ShardguardCallback, step: int, marker: str) -> None:
        self.sg_cb, self.step, self.marker = sg_cb, step, marker

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step != self.step or os.path.exists(self.marker):
            return
        self.sg_cb.client.wait(restorable=True)
        if args.process_index == 0:
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--no-snapshot", action="store_true")
    p.add_argument("--kill-after-restorable", type=int, default=-1)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=os.path.join(a.out, "hf"), max_steps=a.steps, per_device_train_batch_size=4,
        learning_rate=3e-3, warmup_steps=3, lr_scheduler_type="linear", weight_decay=0.01,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=11,
        dataloader_num_workers=0, disable_tqdm=True)
    rank = args.process_index
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=SEQ, vocab_size=VOCAB,
                        bos_token_id=0, eos_token_id=0)
    set_seed(0)  # the initial weights: the same in every run and on every rank
    model = GPT2LMHeadModel(config)
    RecordingTrainer.losses_path = os.path.join(a.out, f"losses.{rank}")

    sg_cb = ShardguardCallback(every=a.every)                                    # user code
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Tokens(),
                               callbacks=[] if a.no_snapshot else [sg_cb])       # user code
    if a.kill_after_restorable >= 0:
        trainer.add_callback(KillWhenRestorable(sg_cb, a.kill_after_restorable,
                                                os.path.join(a.out, "killed")))
    resume = None if a.no_snapshot else sg_cb.resume(trainer)
    with open(os.path.join(a.out, f"restored.{rank}"), "a") as fh:
        fh.write(f"{sg_cb.restored_step}\n")
    trainer.train(resume_from_checkpoint=resume)                                 # user code

    logged = [{k: e[k] for k in ("step", "loss", "grad_norm", "learning_rate")}
              for e in trainer.state.log_history if "loss" in e]
    torch.save({"model": trainer.model.state_dict(),
                "optimizer": unwrap_optimizer(trainer.optimizer).state_dict(),
                "scheduler": trainer.lr_scheduler.state_dict(),
                "logged": logged}, os.path.join(a.out, f"final.{rank}.pt"))
    if sg_cb.client is not None:
        sg_cb.client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
