"""Every restore path against a real daemon: bit-exact, and a flipped byte in the snapshot
is never returned silently (issue 14, item 1).

The paths: ``restore()`` into fresh tensors, ``restore(into=state)``, and
``restore(copy=False)`` (tensors mapped copy-on-write from the slot). A copying restore
checks each chunk against the seal's CRC32C as it copies it; a restore without
copies checks the slot before it returns, and once more when the rank's next snapshot
makes the mapped pages its own.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch

import shardguard.client as sg
from shardguard.client.errors import RestoreError
from shardguard.client.seal_sums import BlockSums
from shardguard.daemon.coding.checksum import CRC_BLOCK_BYTES, crc32c, crc32c_blocks
from shardguard.proto import arena as fmt
from shardguard.proto import state_layout
from test_node_api import assert_equal, rich_state

PATHS = ["fresh", "into", "no-copy"]


class Obj:
    """Stored pickled (allow_pickle)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Obj) and other.x == self.x


def state_of(seed: int) -> dict[str, Any]:
    """Every kind of leaf, and tensors bigger than a copy chunk and a huge page."""
    g = torch.Generator().manual_seed(seed)
    return {**rich_state(), "large": torch.randn(3, 1 << 20, generator=g),  # 12 MiB
            "half": torch.randn(1 << 19, generator=g).half(), "obj": Obj(seed),
            "od": OrderedDict(m=torch.full((5,), float(seed)))}


def zeroed(x: Any) -> Any:
    """``x``'s own tensors and arrays zeroed in place (an ``into`` target)."""
    if isinstance(x, torch.Tensor):
        x.zero_()
    elif isinstance(x, np.ndarray):
        x.fill(0)
    elif isinstance(x, dict):
        for v in x.values():
            zeroed(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            zeroed(v)
    return x


def restore(c: sg.Client, path: str) -> Any:
    if path == "fresh":
        return c.restore()[1]
    if path == "into":
        into = zeroed(c.restore()[1])
        got = c.restore(into=into)[1]
        assert got["large"] is into["large"] and got["np"]["f"] is into["np"]["f"]
        return got
    return c.restore(copy=False)[1]


def slot_of(c: sg.Client, step: int) -> tuple[str, int, fmt.SlotDesc]:
    """The rank's arena file, where the slot holding ``step`` starts, and its record."""
    m = c._map
    assert m is not None
    header = m.header()
    index = next(i for i, d in enumerate(header.slots)
                 if d.step == step and d.state == fmt.SlotState.RESTORABLE)
    return m.path, fmt.slot_offset(index, header.slot_bytes), header.slots[index]


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def read(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_is_bit_exact(daemon, path: str) -> None:
    state = state_of(1)
    with sg.connect(daemon.socket, f"exact-{path}", allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        assert_equal(state, restore(c, path))
        assert_equal(state, restore(c, path))  # again, once the first let its slot go


def test_a_tensor_over_512_mib_restores_on_every_path(daemon) -> None:
    """A tensor of 2^29 bytes and more after other bytes (an LLM's embedding): the copy's
    CRC is combined with the CRC of the bytes before it over the tensor's length; that
    combination was wrong beyond 512 MiB, and every copying restore of such a state failed
    with "the snapshot's data fails its checksum"."""
    big = torch.arange((1 << 27) + 1024, dtype=torch.float32)  # 512 MiB + 4 KiB
    state = {"small": torch.ones(3), "emb": big}  # bytes before it: a CRC to shift
    with sg.connect(daemon.socket, "over-512") as c:
        c.snapshot(0, state).wait()
        for path in PATHS:
            got = c.restore(into={"emb": torch.empty_like(big), "small": torch.zeros(3)}
                            )[1] if path == "into" else restore(c, path)
            assert torch.equal(got["emb"], big) and torch.equal(got["small"], state["small"])
            del got


# A byte of the large tensor's data, one between two leaves (padding), one of the manifest.
WHERE = ["data", "padding", "manifest"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("path", PATHS)
def test_a_flipped_byte_is_never_returned(daemon, path: str, where: str) -> None:
    """One node, no parity: the restore fails on every path, nothing is returned, and the
    daemon never serves the slot again (with parity it repairs it: test_cluster.py)."""
    state = state_of(2)
    with sg.connect(daemon.socket, f"flip-{path}-{where}", allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        into = zeroed(c.restore()[1]) if path == "into" else None
        arena, base, desc = slot_of(c, 0)
        leaves = [n for n in _data_nodes(c, base, desc)]
        at = {"data": next(n["off"] for n in leaves if n.get("shape") == [3, 1 << 20]) + 12345,
              "padding": _padding(leaves),
              "manifest": desc.manifest_offset + 7}[where]
        flip(arena, base + at)
        # The client's check fails, the daemon's confirms it and marks the slot corrupt;
        # the retry finds it so (a job with parity would be repaired there).
        with pytest.raises(RestoreError, match="the stored bytes failed their checksum"):
            if path == "into":
                c.restore(into=into)
            else:
                c.restore(copy=path == "fresh")
        with pytest.raises(RestoreError, match="failed their checksum"):
            c.restore()
    assert f"{'manifest' if where == 'manifest' else 'data'} checksum fails" in daemon.log()


def _data_nodes(c: sg.Client, base: int, desc: fmt.SlotDesc) -> list[dict[str, Any]]:
    from shardguard.proto import manifest as mf
    m = c._map
    assert m is not None
    raw = m.arr[base + desc.manifest_offset:base + desc.manifest_offset + desc.manifest_bytes]
    return sorted(mf.data_entries(mf.parse(raw, desc.data_bytes)["tree"]),
                  key=lambda n: n["off"])


def _padding(leaves: list[dict[str, Any]]) -> int:
    """An offset between two leaves that belongs to neither."""
    for a, b in zip(leaves, leaves[1:]):
        if a["off"] + a["n"] < b["off"]:
            return a["off"] + a["n"]
    raise AssertionError("no padding between leaves")


def test_the_seal_carries_the_copys_block_checksums(daemon, monkeypatch) -> None:
    """The copy thread checksums the slot's blocks as it copies (client/seal_sums.py) and
    the daemon seals with them instead of reading the slot: they equal a read of the
    slot's bytes; made wrong (a client bug, a tensor changed under the copy), the restore
    refuses the snapshot, it is never returned."""
    state, made = state_of(8), []
    real = BlockSums.blocks

    def spy(self: BlockSums) -> list[int]:
        made.append(real(self))
        return made[-1]

    monkeypatch.setattr(BlockSums, "blocks", spy)
    with sg.connect(daemon.socket, "client-sums", allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        arena, base, desc = slot_of(c, 0)
        data = read(arena, base, desc.data_bytes)
        assert len(made) == 1 and made[0] == crc32c_blocks(data, CRC_BLOCK_BYTES)[1]
        assert len(made[0]) > 1 and desc.data_crc == crc32c(data)
        monkeypatch.setattr(BlockSums, "blocks", lambda self: [x ^ 1 for x in real(self)])
        c.snapshot(1, state).wait()
        with pytest.raises(RestoreError, match="failed their checksum"):
            c.restore()
    assert "data checksum fails" in daemon.log()


def test_a_bad_copy_of_a_sound_slot_is_read_again(daemon, monkeypatch) -> None:
    """The client's check fails but the daemon's passes (the client's own copy went bad):
    the restore reads again and succeeds."""
    state = state_of(3)
    real, calls = state_layout.crc32c_at, []

    def bad_once(addr: int, n: int, init: int = 0) -> int:
        calls.append(n)
        return real(addr, n, init) ^ (1 if len(calls) == 1 else 0)

    with sg.connect(daemon.socket, "bad-copy", allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        monkeypatch.setattr(state_layout, "crc32c_at", bad_once)
        assert_equal(state, c.restore()[1])
    assert len(calls) > 1
    assert "the stored bytes pass theirs" in daemon.log()


def test_no_copy_is_copy_on_write_and_the_slot_is_let_go_at_the_next_snapshot(daemon) -> None:
    a, b, c_ = state_of(4), state_of(5), state_of(6)
    with sg.connect(daemon.socket, "cow", allow_pickle=True) as c:
        c.snapshot(0, a).wait()
        arena, base, desc = slot_of(c, 0)
        before = read(arena, base, desc.data_bytes)
        got = c.restore(copy=False)[1]
        assert_equal(a, got)
        got["large"][0, :10].add_(1.0)  # a write copies its page: the slot never sees it
        got["np"]["f"][0] = -1.0
        assert read(arena, base, desc.data_bytes) == before
        # The next snapshots reuse the slot (it was pinned until the first of them), and
        # the tensors of the restore keep what they held.
        c.snapshot(1, b)
        c.wait(restorable=True)
        c.snapshot(2, c_)
        c.wait(restorable=True)
        assert read(arena, base, desc.data_bytes) != before  # step 2 is in the slot now
        expect = state_of(4)
        expect["large"][0, :10].add_(1.0)
        expect["np"]["f"][0] = -1.0
        assert_equal(expect, got)
        assert_equal(c_, c.restore()[1])


def test_no_copy_a_flip_after_the_check_is_reported_at_the_next_snapshot(daemon,
                                                                         caplog) -> None:
    """What ``copy=False`` promises: the slot is checked before restore returns; after that
    a page the trainer has not written is the slot's own memory, so a byte that changes
    there shows through (as a fault in any memory would) until the next snapshot copies the
    pages; that snapshot checks the slot again first and reports the change, and the
    daemon marks the slot corrupt."""
    state = state_of(7)
    with sg.connect(daemon.socket, "cow-flip", allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        arena, base, desc = slot_of(c, 0)
        got = c.restore(copy=False)[1]
        off = next(n["off"] for n in _data_nodes(c, base, desc) if n.get("shape") == [3, 1 << 20])
        flip(arena, base + off)  # the first byte of got["large"]
        assert not torch.equal(got["large"], state["large"])  # it shows through
        with caplog.at_level(logging.ERROR, logger="shardguard.client.restorer"):
            c.snapshot(1, state).wait()
        assert "changed in this node's memory after its check" in caplog.text
        flip(arena, base + off)  # the slot again as sealed: the tensor no longer follows
        assert not torch.equal(got["large"], state["large"])
    assert "checksum fails" in daemon.log()


def test_no_copy_refuses_into_and_close_makes_the_pages_private(daemon) -> None:
    state = state_of(8)
    with sg.connect(daemon.socket, "cow-close", allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        with pytest.raises(ValueError, match="cannot fill into"):
            c.restore(into=state, copy=False)
        got = c.restore(copy=False)[1]
    # Another client of the job writes both slots: the closed one's tensors keep their bytes.
    with sg.connect(daemon.socket, "cow-close", allow_pickle=True) as c:
        c.snapshot(1, state_of(9))
        c.wait(restorable=True)
        c.snapshot(2, state_of(10))
        c.wait(restorable=True)
    assert_equal(state, got)
