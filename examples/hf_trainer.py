"""A Hugging Face Trainer protected by shardguard: kill it at any point, run it again, and it
goes on from the last snapshot, bit for bit (a tiny GPT-2 from a config, synthetic tokens).

    shardguard daemon &                                  # one per node, before the job
    SHARDGUARD_JOB=gpt2-demo python examples/hf_trainer.py --steps 200
    # ... kill -9 it, then the same command again: it resumes
    torchrun --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 \
        --rdzv-id gpt2-ddp examples/hf_trainer.py --steps 200          # DDP

(``pip install -c constraints.txt 'shardguard[hf]'``.) The shardguard lines are marked.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from shardguard.integrations.hf import ShardguardCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 512, seq: int = 64, vocab: int = 1024) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="/tmp/shardguard-hf-example")
    a = p.parse_args()
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, warmup_steps=20, logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64,
                                       vocab_size=1024, bos_token_id=0, eos_token_id=0))
    sg_cb = ShardguardCallback()                                             # shardguard
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[sg_cb])
    trainer.train(resume_from_checkpoint=sg_cb.resume(trainer))              # shardguard


if __name__ == "__main__":
    main()
