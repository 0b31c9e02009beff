"""Moving the boxes a load plan reads between new ranks: each new rank holds the old ranks
it restored, and any new rank may need any box of them; one ``all_to_all`` over the
reader's gloo group moves them all."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from shardguard.client.agreement import group_rank
from shardguard.client.dcp.items import dtype
from shardguard.client.dcp.resharding import Held

#: A box of a stored item that a load plan reads: (old rank, item position, offsets,
#: lengths, is_bytes). Plain data: the boxes are gathered over the group.
Box = tuple[int, int, list[int], list[int], bool]

#: Pieces of the all_to_all buffers start at multiples of this, so that every
#: received piece can be viewed as its dtype in place.
_ALIGN = 64


class Boxes:
    """The boxes of the items this rank restored (``held``), described by ``items``
    ((old rank, position) -> the item's description)."""

    def __init__(self, held: Held, items: dict[tuple[int, int], dict[str, Any]]) -> None:
        self.held = held
        self.items = items

    def exchange(self, wanted: list[dict[int, list[Box]]], holders: list[int],
                 group: Any) -> list[Any]:
        """The boxes this rank's plan reads, in plan order: its own sliced in place, the
        others' through one all_to_all over ``group`` (skipped by every rank when no rank
        needs another's). ``wanted``: every rank's boxes per holder; ``holders``: the
        holder of each of this rank's plan items."""
        me, world = group_rank(group), len(wanted)
        mine = wanted[me]
        got: dict[int, list[Any]] = {me: [self.box(b) for b in mine.get(me, [])]}
        if any(h != r for r, w in enumerate(wanted) for h in w):
            sends = [[self.box(b) for b in w.get(me, [])] if r != me else []
                     for r, w in enumerate(wanted)]
            recv_sizes = [0 if h == me else sum(_padded(self.nbytes(b))
                                                for b in mine.get(h, []))
                          for h in range(world)]
            send_buf, send_sizes = _pack(sends)
            recv_buf = torch.empty(sum(recv_sizes), dtype=torch.uint8)
            dist.all_to_all_single(recv_buf, send_buf, recv_sizes, send_sizes, group=group)
            off = 0
            for h in range(world):
                if h == me:
                    continue
                for b in mine.get(h, []):
                    n = self.nbytes(b)
                    got.setdefault(h, []).append(self.unpack(recv_buf[off:off + n], b))
                    off += _padded(n)
        # The boxes of each holder are listed in plan order: pop them back in that order.
        cursors = {h: iter(v) for h, v in got.items()}
        return [next(cursors[h]) for h in holders]

    def box(self, b: Box) -> Any:
        """A box of an item this rank restored: bytes, or a view of the stored chunk."""
        q, pos, offsets, lengths, is_bytes = b
        value = self.held.states[q]["data"][pos]
        if is_bytes:
            return value
        for dim, (off, n) in enumerate(zip(offsets, lengths)):
            if n < value.size(dim):
                value = value.narrow(dim, off, n)
        return value

    def nbytes(self, b: Box) -> int:
        q, pos, _, lengths, is_bytes = b
        item = self.items[(q, pos)]
        if is_bytes:
            return item["n"]
        return math.prod(lengths) * dtype(item["dtype"]).itemsize

    def unpack(self, buf: torch.Tensor, b: Box) -> Any:
        q, pos, _, lengths, is_bytes = b
        if is_bytes:
            return buf.numpy().tobytes()
        return buf.view(dtype(self.items[(q, pos)]["dtype"])).view(lengths)


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(p: Any) -> int:
    return len(p) if isinstance(p, bytes) else p.numel() * p.element_size()


def _pack(sends: list[list[Any]]) -> tuple[torch.Tensor, list[int]]:
    """One uint8 buffer of every piece for every peer (each at an aligned offset)."""
    sizes = [sum(_padded(_nbytes(p)) for p in pieces) for pieces in sends]
    buf = torch.empty(sum(sizes), dtype=torch.uint8)
    off = 0
    for pieces in sends:
        for p in pieces:
            n = _nbytes(p)
            if n and isinstance(p, bytes):
                buf[off:off + n] = torch.frombuffer(bytearray(p), dtype=torch.uint8)
            elif n:
                buf[off:off + n].view(p.dtype).view(p.shape).copy_(p)
            off += _padded(n)
    return buf, sizes
