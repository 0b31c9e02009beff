"""torchft's checkpoint transports (torchft 0.2.0): the state goes to a live peer replica, not to storage.

torchft keeps no checkpoint: a recovering replica fetches the state from a healthy one,
over ``HTTPTransport`` (torchft's default, ``num_chunks=0``) or ``PGTransport`` (gloo
send/recv, received in place). Here every checkpoint is one such transfer to a peer
replica (a process of its own, holding the same state shapes, as on another node):

- the healthy side (the measured trainer) calls ``send_checkpoint``; for HTTP that only
  allows serving, and ``optimizer.step()`` waits for the peer's fetch and then
  ``disallow_checkpoint()``, as torchft's Manager does before it lets the step commit;
  for PG the call itself sends every tensor;
- the checkpoint is in memory when the peer has received all of it;
- restore runs the other way: the trainer (its state scribbled on) receives the copy
  the peer holds, over the same transport, into its tensors (PG in place; HTTP as fresh
  tensors, then copied).

Without a recovering replica torchft does no work per step at all; these rows are what
each transfer costs, paid per recovery.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import _harness as h
import bench_node as bn
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchft.checkpointing.http_transport import HTTPTransport
from torchft.checkpointing.pg_transport import PGTransport
from torchft.process_group import ProcessGroupGloo

TIMEOUT = timedelta(seconds=300)
TRAINER, PEER = 0, 1


def make_transport(kind: str, rank: int, store_addr: str, state: Any) -> Any:
    if kind == "http":
        return HTTPTransport(timeout=TIMEOUT, num_chunks=0)
    pg = ProcessGroupGloo(timeout=TIMEOUT)
    pg.configure(store_addr, replica_id=str(rank), rank=rank, world_size=2)
    return PGTransport(pg, timeout=TIMEOUT, device=torch.device("cpu"), state_dict=lambda: state)


def peer_main(conn: Any, kind: str, store_addr: str, mib: int, seed: int) -> None:
    """The peer replica: receives each checkpoint, and sends back what it holds when asked."""
    torch.set_num_threads(1)
    state = bn.llm_state(mib * h.MiB, seed)
    transport = make_transport(kind, PEER, store_addr, state)
    conn.send(transport.metadata())
    held: Any = state
    while (msg := conn.recv())[0] != "stop":
        if msg[0] == "recv":
            _, step, metadata = msg
            held = transport.recv_checkpoint(TRAINER, metadata, step, TIMEOUT)
            conn.send("received")
        elif msg[0] == "send":
            transport.send_checkpoint([TRAINER], msg[1], held, TIMEOUT)
            conn.send("sent")
            if kind == "http":
                conn.recv()  # the trainer has it: stop serving
                transport.disallow_checkpoint()
    transport.shutdown()


class TorchftLive(h.Peer):
    kind = ""

    def __init__(self, args: Any, state: dict[str, Any]) -> None:
        super().__init__(args, state)
        self.store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        store_addr = f"localhost:{self.store.port}/shardguard-bench"
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=peer_main, args=(child, self.kind, store_addr, args.mib, args.seed),
                                name="torchft-peer", daemon=True)
        self.proc.start()
        self.transport = make_transport(self.kind, TRAINER, store_addr, state)
        self.peer_metadata = self.conn.recv()
        self.receiving: threading.Thread | None = None

    def protect(self, opt: torch.optim.Optimizer) -> None:
        opt.register_step_pre_hook(lambda *_: self.wait())

    def checkpoint(self, step: int, state: dict[str, Any]) -> h.Pending | None:
        p = h.Pending(time.perf_counter())
        self.conn.send(("recv", step, self.transport.metadata()))
        self.transport.send_checkpoint([PEER], step, state, TIMEOUT)
        self.receiving = threading.Thread(target=self._received, args=(p,), daemon=True)
        self.receiving.start()
        return p

    def _received(self, p: h.Pending) -> None:
        try:
            self.conn.recv()
        except BaseException as exc:  # noqa: BLE001 - reported with the run
            p.error = exc
        p.finish()

    def wait(self) -> None:
        if self.receiving is not None:
            self.receiving.join()
            self.receiving = None
            self.transport.disallow_checkpoint()  # a no-op for PG

    def daemon_pid(self) -> int | None:
        return self.proc.pid  # the peer replica (on another node in a real job)

    def close(self) -> None:
        self.wait()
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(timeout=60)
        self.transport.shutdown()


class TorchftHttp(TorchftLive):
    name = "torchft HTTPTransport (live peer)"
    restore_way = "recv_checkpoint over HTTP from the peer (fresh tensors), copied into the state"
    kind = "http"

    def restore(self, state: dict[str, Any]) -> None:
        step = int(state["step"])
        self.conn.send(("send", step))
        self.conn.recv()  # the peer serves its copy
        got = self.transport.recv_checkpoint(PEER, self.peer_metadata, step, TIMEOUT)
        h.copy_state(state, got)
        self.conn.send(("release",))


class TorchftPg(TorchftLive):
    name = "torchft PGTransport (live peer)"
    restore_way = "recv_checkpoint over gloo from the peer, in place into the state"
    kind = "pg"

    def restore(self, state: dict[str, Any]) -> None:
        step = int(state["step"])
        self.conn.send(("send", step))
        got = self.transport.recv_checkpoint(PEER, "<n/a>", step, TIMEOUT)
        self.conn.recv()
        if got is not state:  # in place: the tensors received are the state's own
            h.copy_state(state, got)


if __name__ == "__main__":
    kinds = {"http": TorchftHttp, "pg": TorchftPg}
    h.main(kinds[h.parse_args().options.get("transport", "http")])
