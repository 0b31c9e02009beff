"""NVRx local checkpointing (nvidia-resiliency-ext 0.4.1): ``LocalCheckpointManager`` in /dev/shm,
``save(..., is_async=True)`` scheduled on NVRx's ``AsyncCallsQueue`` (its persistent writer process).

0.4.1 is the newest release with a CPython 3.11 wheel (0.5 on are cp312-only; torch 2.13 here is a
cp311 build). ``save`` copies the tensors to the host (on a GPU the device-to-host copy; here the
shim's clone) before it returns, so ``optimizer.step()`` never waits; the writer process writes the
host copy to /dev/shm, where it is safe when the file is renamed into place. A step whose previous
save is still being written is skipped (NVRx leaves that policy to the caller). Restore: the
manager's ``find_latest()`` and ``load()`` (``torch.load`` of its file), copied into the state.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import _harness as h
import torch
import torch.distributed as dist
from _common import free_port
from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue
from nvidia_resiliency_ext.checkpointing.local.basic_state_dict import BasicTensorAwareStateDict
from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import LocalCheckpointManager

POLL_S = 0.002


class CpuStateDict(BasicTensorAwareStateDict):
    """Shim: ``BasicTensorAwareStateDict`` asserts that every tensor is on CUDA, and on a CPU its
    device-to-host copy (``.to("cpu")``) would hand the writer the trainer's live tensors, which
    the next ``optimizer.step()`` mutates. ``clone()`` is the host copy a GPU run makes."""

    def __init__(self, state_dict: dict[str, Any]) -> None:
        self.state_dict = state_dict
        self._is_hollow = False

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        _map_tensors(self.state_dict, lambda t: t.clone())

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        pass  # the tensors' device is the CPU already


def _map_tensors(x: Any, fn: Any) -> None:
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        if isinstance(v, torch.Tensor):
            x[k] = fn(v)
        else:
            _map_tensors(v, fn)


def _containers(x: Any) -> Any:
    """The dicts and lists of ``x`` anew, its leaves shared: NVRx replaces tensors in the
    dict it is given (a GPU trainer hands it a fresh ``state_dict()`` each time)."""
    if isinstance(x, dict):
        return {k: _containers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_containers(v) for v in x]
    return x


def _no_cuda_sync() -> None:
    """Shim for ``torch.cuda.synchronize()``, which ``save(is_async=True)`` calls to wait for the
    device-to-host copy, and which raises on a torch built without CUDA; there is nothing to wait for."""


class NvrxLocal(h.Peer):
    name = "NVRx local checkpoint (async, /dev/shm)"
    restore_way = "find_latest() + load() (torch.load of its file), copied into the state"

    def __init__(self, args: Any, state: dict[str, Any]) -> None:
        super().__init__(args, state)
        # NVRx asks torch.distributed for the rank and gathers checkpoint ids over it: one rank.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        torch.cuda.synchronize = _no_cuda_sync
        self.manager = LocalCheckpointManager(os.path.join(args.scratch, "nvrx"), session_id="bench")
        self.queue = AsyncCallsQueue()  # persistent=True: one writer process, NVRx's default
        self.watching: threading.Thread | None = None
        self._start_writer()

    def _start_writer(self) -> None:
        """The writer process starts (spawned: seconds) with the first save; start it before the
        loop, with a tiny save through a manager of its own, as a long run would have long before."""
        warmup = LocalCheckpointManager(os.path.join(self.args.scratch, "nvrx-warmup"), session_id="warmup")
        self.queue.schedule_async_request(warmup.save(CpuStateDict({"x": torch.zeros(1)}), 0, is_async=True))
        self.queue.maybe_finalize_async_calls(blocking=True, no_dist=True)

    def _in_flight(self) -> bool:
        self.queue.maybe_finalize_async_calls(blocking=False, no_dist=True)
        return self.queue.get_num_unfinalized_calls() > 0

    def checkpoint(self, step: int, state: dict[str, Any]) -> h.Pending | None:
        if self._in_flight():
            return None
        p = h.Pending(time.perf_counter())
        request = self.manager.save(CpuStateDict(_containers(state)), step, is_async=True)
        self.queue.schedule_async_request(request)
        final = self.manager._local_ckpt_path_from_id(self.manager._ckpt_id(step))
        self.watching = threading.Thread(target=self._watch, args=(p, str(final)), daemon=True)
        self.watching.start()
        return p

    @staticmethod
    def _watch(p: h.Pending, path: str) -> None:
        """Stamp the moment the writer renamed the file into place: the checkpoint is then safe
        (NVRx's own signal, a queue the trainer polls, comes only as often as it polls)."""
        while not os.path.exists(path):
            time.sleep(POLL_S)
        p.finish()

    def wait(self) -> None:
        self.queue.maybe_finalize_async_calls(blocking=True, no_dist=True)
        if self.watching is not None:
            self.watching.join()

    def restore(self, state: dict[str, Any]) -> None:
        self.manager.find_latest()
        got, _ = self.manager.load()
        h.copy_state(state, got.state_dict)

    def daemon_pid(self) -> int | None:
        return None  # the writer process starts with the first save; its CPU is not counted

    def close(self) -> None:
        self.queue.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    h.main(NvrxLocal)
