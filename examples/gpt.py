"""A tiny decoder-only transformer and a synthetic character corpus, for the demo.

Plain PyTorch, no shardguard: token and position embeddings, pre-LayerNorm
blocks of causal self-attention and an MLP, a head tied to the token
embedding. The corpus is generated from a fixed seed, so every rank and every
run sees the same text; batches are drawn from torch's global generator, so a
rank's data stream is part of the RNG state a snapshot holds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

WORDS = ("the", "a", "node", "rank", "shard", "parity", "step", "loss", "model", "daemon",
         "memory", "snapshot", "gradient", "stripe", "group", "token", "layer", "head")
VERBS = ("keeps", "rebuilds", "loses", "restores", "encodes", "sends", "holds", "trains")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 96
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        # Not a parameter and not in the state dict: it is rebuilt identically on every start.
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy of ``idx`` against ``targets``."""
        t = idx.size(1)
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def make_corpus(n_chars: int = 200_000, seed: int = 0) -> tuple[torch.Tensor, str]:
    """A deterministic text of simple sentences, as token ids, and its alphabet."""
    rnd = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        s = (f"{rnd.choice(WORDS)} {rnd.choice(WORDS)} {rnd.choice(VERBS)} "
             f"{rnd.choice(WORDS)} {rnd.randrange(100)}.\n")
        parts.append(s)
        size += len(s)
    text = "".join(parts)[:n_chars]
    alphabet = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(alphabet)}
    return torch.tensor([lookup[ch] for ch in text], dtype=torch.long), alphabet


def get_batch(data: torch.Tensor, batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data`` and their next tokens, drawn from torch's global generator."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,))
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
    return x, y


def all_reduce_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over the ranks in one flat bucket, as DDP does.

    A single fixed-order bucket keeps the reduction order, and so the bits, the
    same on every run.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
