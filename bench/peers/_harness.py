"""The one harness every peer adapter runs under: bench_node's state, loop and floor, in the peer's own venv.

An adapter module (``bench/peers/<peer>.py``) defines a :class:`Peer` subclass and
calls :func:`main` with it; ``bench/bench_peers.py`` runs the module as a script
with the peer's interpreter, once per round, and reads the JSON it writes to
``--out``. Every figure is measured as ``bench/bench_node.py`` measures it, by
bench_node's own code: the same LLM-shaped state (``llm_state``), the same
training loop (``run_loop``: fixed compute, ``optimizer.step()`` that writes
every tensor, then the checkpoint), the same baseline loops around the peer's
loop (``one_run``) and the same memcpy floor (``memcpy_floor``).

Per checkpoint: *blocked* is the call plus the wait the next ``optimizer.step()``
makes before it may mutate the state; *extra* is the wall time per checkpoint
over the loops that checkpoint nothing; *until in memory* is from the call until
the checkpoint is safe in host memory, meaning it survives the trainer process
(a daemon's or agent's shared memory, a file in /dev/shm, a live peer).
*Restore* is the time to get the newest checkpoint back into the trainer's own
tensors, verified against the state that was checkpointed.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
import types
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH_DIR))


class _AbsentShardguard(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """bench_node imports ``shardguard`` (its client, for its own shardguard method, and proto
    helpers) at the top. A peer's venv has no shardguard (it would bring grpcio, pyzmq and pyeclib
    next to the peer's own pins) and nothing here uses those parts: placeholder modules stand in
    for every ``shardguard.*`` there, and any use of one fails loudly."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "shardguard" and not name.startswith("shardguard."):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)

        def absent(attr: str) -> Any:
            # AttributeError, as for any missing attribute (inspect and hasattr look for __file__).
            raise AttributeError(f"{spec.name}.{attr}: shardguard is not installed in this venv ({sys.prefix})")

        module.__getattr__ = absent  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]  # a package: its submodules come here too


if importlib.util.find_spec("shardguard") is None:
    sys.meta_path.append(_AbsentShardguard())

import bench_node as bn  # noqa: E402
import torch  # noqa: E402
from _common import load_average  # noqa: E402

Pending = bn.Pending
Watcher = bn.Watcher
MiB = bn.MiB
SHM_DIR = bn.SHM_DIR
_CpuTimes = namedtuple("_CpuTimes", "user system")


class Peer(bn.Method):
    """One peer's checkpointing, as the loop sees it.

    ``checkpoint(step, state)`` starts (or does) a checkpoint and returns a
    :class:`Pending` that finishes when the checkpoint is safe in host memory, or
    None when the peer skips the step (its previous one still in flight);
    ``protect(opt)`` makes ``opt.step()`` wait until the state may be mutated;
    ``wait()`` waits for everything in flight; ``restore(state)`` puts the newest
    checkpoint back into ``state``'s tensors.
    """

    #: How ``restore`` gets the state back, for the table's notes.
    restore_way = ""

    def __init__(self, args: argparse.Namespace, state: dict[str, Any]) -> None:
        self.args = args
        #: Figures a peer measures beyond the table's (JSON only), e.g. a zero-copy restore.
        self.extra: dict[str, Any] = {}

    def wait(self) -> None:
        """Wait for every checkpoint in flight."""

    def drain(self) -> None:
        self.wait()

    def restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def daemon_pid(self) -> int | None:
        """A process besides the trainer that does the peer's work (its CPU time is reported)."""
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where the JSON result goes")
    p.add_argument("--mib", type=int, default=512, help="state size in MiB (model + Adam moments)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6, help="measured steps per loop")
    p.add_argument("--min-taken", type=int, default=3, help="run on until this many checkpoints were taken")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--compute-s", type=float, default=0.3, help="compute per step")
    p.add_argument("--compute-threads", type=int, default=None, help="default: cores - 1, at least 1")
    p.add_argument("--floor-repeat", type=int, default=3)
    p.add_argument("--restore-tries", type=int, default=3)
    p.add_argument("--scratch", default=None, help="a directory of this run's own under /dev/shm")
    p.add_argument("--option", action="append", default=[], help="KEY=VALUE for the adapter")
    args, _ = p.parse_known_args(argv)  # launchers (dlrover-run) may add their own
    args.options = dict(o.split("=", 1) for o in args.option)
    return args


class BenchNodePeer(Peer):
    """A peer that is one of bench_node.py's own methods (``self.inner``): the loop's calls
    go to it as they do in bench_node."""

    inner: bn.Method

    def protect(self, opt: Any) -> None:
        self.inner.protect(opt)

    def checkpoint(self, step: int, state: dict[str, Any]) -> Any:
        return self.inner.checkpoint(step, state)

    def wait(self) -> None:
        self.inner.drain()


class _NoDaemon:
    """For peers whose work runs inside the trainer: no other process's CPU to count."""

    def cpu_times(self) -> _CpuTimes:
        return _CpuTimes(0.0, 0.0)


def _process(pid: int | None) -> Any:
    if pid is None:
        return _NoDaemon()
    import psutil

    return psutil.Process(pid)


def measure(peer_cls: type[Peer], args: argparse.Namespace) -> dict[str, Any]:
    """Floor, loop and restore for one peer, in this process."""
    cores = len(os.sched_getaffinity(0))
    threads = args.compute_threads or max(1, cores - 1)
    torch.set_num_threads(threads)
    load = {"start": load_average()}
    state = bn.llm_state(args.mib * MiB, seed=args.seed)
    nbytes = bn.nbytes_of(state)
    floor = bn.memcpy_floor(state, args.floor_repeat, cores)
    compute = bn.Compute(args.compute_s)

    peer = peer_cls(args, state)
    try:
        baseline = bn.NoCheckpoint()
        opts = {m.name: bn.optimizer_for(m, state) for m in (baseline, peer)}
        daemon = _process(peer.daemon_pid())

        def loop(m: bn.Method, first: int) -> tuple[bn.LoopStats, int]:
            return bn.run_loop(m, *opts[m.name], state, compute, first, steps=args.steps,
                               min_taken=0 if m is baseline else args.min_taken,
                               max_steps=args.max_steps, daemon=daemon)

        summary, step = bn.one_run([baseline, peer], loop, 0, lambda m: None)
        restore = _restore(peer, state, step, args.restore_tries, threads=cores)
    finally:
        peer.close()
    load["end"] = load_average()
    return {
        "ok": True, "name": peer.name, "bytes": nbytes, "tensors": sum(1 for _ in bn.tensors_of(state)),
        "floor": floor, "compute": {"target_s": args.compute_s, "matmuls_per_step": compute.iters,
                                    "threads": threads},
        "loop": summary[peer.name], "baseline": summary[baseline.name],
        **restore, "restore_way": peer.restore_way, "extra": peer.extra, "load_average": load,
    }


def _restore(peer: Peer, state: dict[str, Any], step: int, tries: int, threads: int) -> dict[str, Any]:
    """Median time of ``peer.restore(state)`` of a checkpoint of the current state, and whether
    the first one gave that state back (the state is scribbled on before it)."""
    peer.wait()
    state["step"] = step
    pending = peer.checkpoint(step, state)
    if pending is None:
        raise RuntimeError(f"{peer.name} skipped the checkpoint after wait()")
    peer.wait()
    pending.wait()
    if pending.error is not None:
        raise RuntimeError(f"{peer.name}: the last checkpoint failed: {pending.error!r}") from pending.error
    expect = [t.clone() for t in bn.tensors_of(state)]
    times = []
    verified = None
    with bn.torch_threads(threads):
        for i in range(max(1, tries)):
            for t in bn.tensors_of(state):
                t.fill_(-1.0)
            t0 = time.perf_counter()
            peer.restore(state)
            times.append(time.perf_counter() - t0)
            if i == 0:
                verified = all(torch.equal(a, b) for a, b in zip(bn.tensors_of(state), expect, strict=True))
    return {"restore_s": statistics.median(times), "restore_runs_s": times, "restore_verified": verified}


def main(peer_cls: type[Peer], argv: list[str] | None = None) -> None:
    """Run one peer and write its JSON to ``--out``; a failure is written there too, as one line."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    try:
        result = measure(peer_cls, args)
    except BaseException as exc:  # noqa: BLE001 - the row must say why, whatever it was
        traceback.print_exc()
        last = f"{type(exc).__name__}: {exc}".splitlines()
        result = {"ok": False, "name": peer_cls.name, "error": (last[0] if last else type(exc).__name__)[:300]}
    if _writes_result():
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    sys.stdout.flush()
    sys.exit(0 if result["ok"] else 1)


def _writes_result() -> bool:
    """Under a launcher with several workers only the first writes (we run one)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def copy_state(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Copy every tensor of ``src`` into the same place in ``dst`` (what ``load_state_dict`` does)."""
    with torch.no_grad():
        for d, s in zip(bn.tensors_of(dst), bn.tensors_of(src), strict=True):
            d.copy_(s)
