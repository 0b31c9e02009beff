"""The CUDA path, measured (``make gpu``): device-to-host copies and the stall per step.

    python bench/bench_gpu.py [--quick] [--require-cuda]

1. **Copy bandwidth.** A ``--gib`` GiB state of bf16/fp32 tensors on the GPU is
   snapshotted into the daemon's arena (registered with cudaHostRegister, copied
   on a side stream) and, in the same rounds, copied with ``Tensor.copy_`` into
   a pinned host buffer (``torch.empty(pin_memory=True)``: cudaMemcpyAsync to
   page-locked memory, the floor). Reported: GB/s of each, and the snapshot's
   share of the floor; median of interleaved rounds.
2. **Step time.** A small GPT (examples/gpt.py; ``--layers``, ``--d-model``)
   trains with AdamW on synthetic tokens, once with a snapshot every step and
   once without, in alternating blocks of steps; reported: the median step
   time of each and the ratio (the stall a snapshot adds to a step).

Without CUDA it prints why and writes ``{"skipped": ...}`` (``--require-cuda``:
exit status 2 instead, so that ``make gpu`` cannot pass on a machine without a GPU).
Results: ``bench/results/gpu.json``.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _common import base_parser, load_average, print_rows, write_results  # noqa: E402
from bench_node import bench_daemon  # noqa: E402

import shardguard.client as sg  # noqa: E402

SHM_PREFIX = "shardguard-bench-gpu"


def gpu_state(total_bytes: int) -> dict[str, torch.Tensor]:
    """LLM-like leaves: a few large bf16 matrices, fp32 optimizer-sized ones, small ones."""
    out: dict[str, torch.Tensor] = {}
    left, i = total_bytes, 0
    while left > 0:
        n = min(left, 64 << 20)
        dtype = torch.bfloat16 if i % 3 else torch.float32
        out[f"t{i}"] = torch.randn(max(1, n // dtype.itemsize), device="cuda").to(dtype)
        left -= n
        i += 1
    out["small"] = torch.randn(1000, device="cuda")
    return out


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def copy_bandwidth(sock: str, gib: float, rounds: int) -> dict[str, Any]:
    state = gpu_state(int(gib * (1 << 30)))
    size = nbytes(state)
    pinned = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for k, t in state.items()}
    client = sg.connect(sock, "bench-gpu-copy")
    times: dict[str, list[float]] = {"pinned memcpy": [], "shardguard snapshot": []}
    try:
        for r in range(rounds + 1):  # round 0 warms up (registration, first plan)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k, t in state.items():
                pinned[k].copy_(t, non_blocking=True)
            torch.cuda.synchronize()
            t_pinned = time.perf_counter() - t0
            t0 = time.perf_counter()
            h = client.snapshot(r, state)
            h.wait()  # copied on the side stream and sealed with the daemon
            t_sg = time.perf_counter() - t0
            if r:
                times["pinned memcpy"].append(t_pinned)
                times["shardguard snapshot"].append(t_sg)
    finally:
        client.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["pinned memcpy"]
    rows = [{"name": k, "gbps": size / v / 1e9, "vs_floor": floor / v} for k, v in med.items()]
    return {"bytes": size, "rounds": rounds, "median_s": med, "rows": rows}


def step_overhead(sock: str, layers: int, d_model: int, steps: int, blocks: int
                  ) -> dict[str, Any]:
    import gpt

    torch.manual_seed(0)
    cfg = gpt.GPTConfig(vocab_size=256, block_size=256, n_layer=layers,
                        n_head=max(1, d_model // 64), d_model=d_model, dropout=0.0)
    model = gpt.GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    client = sg.connect(sock, "bench-gpu-step")
    client.protect(opt)
    data = torch.randint(0, 256, (16, 257), device="cuda")
    step_no = 0
    times: dict[str, list[float]] = {"no snapshot": [], "snapshot every step": []}

    def one(snapshot: bool) -> float:
        nonlocal step_no
        t0 = time.perf_counter()
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if snapshot:
            client.snapshot(step_no, {"model": model.state_dict(), "optim": opt.state_dict(),
                                      "step": step_no})
        torch.cuda.synchronize()
        step_no += 1
        return time.perf_counter() - t0

    try:
        for _ in range(3):
            one(True)
        for b in range(blocks):
            for snap in ((False, True) if b % 2 == 0 else (True, False)):
                key = "snapshot every step" if snap else "no snapshot"
                times[key] += [one(snap) for _ in range(steps)]
        client.wait()
    finally:
        client.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "layers": layers, "d_model": d_model,
            "steps_each": steps * blocks, "median_step_s": med,
            "overhead": med["snapshot every step"] / med["no snapshot"]}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--require-cuda", action="store_true")
    p.add_argument("--gib", type=float, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        why = "torch.cuda.is_available() is false on this machine"
        print(f"bench_gpu: skipped: {why}")
        if args.require_cuda:
            return 2
        write_results("gpu", {"skipped": why})
        return 0
    gib = args.gib or (0.25 if args.quick else 2.0)
    layers = args.layers or (2 if args.quick else 8)
    d_model = args.d_model or (256 if args.quick else 1024)
    rounds = args.repeat or (3 if args.quick else 7)
    load0 = load_average()
    with tempfile.TemporaryDirectory() as tmp, bench_daemon(tmp, SHM_PREFIX) as (sock, _):
        copy = copy_bandwidth(sock, gib, rounds)
        step = step_overhead(sock, layers, d_model, steps=10 if args.quick else 30,
                             blocks=2 if args.quick else 4)
    print_rows(copy["rows"], [("name", "device -> host", "{}"), ("gbps", "GB/s", "{:.1f}"),
                              ("vs_floor", "of pinned", "{:.2f}x")],
               title=f"copy of {copy['bytes'] / 2**30:.2f} GiB of GPU tensors "
                     f"({torch.cuda.get_device_name()}), median of {rounds} rounds")
    rows = [{"name": k, "ms": v * 1e3} for k, v in step["median_step_s"].items()]
    print_rows(rows, [("name", "GPT step", "{}"), ("ms", "median ms", "{:.2f}")],
               title=f"step time, {step['params'] / 1e6:.0f}M-parameter GPT, "
                     f"{step['steps_each']} steps each")
    print(f"snapshot every step: {step['overhead']:.3f}x the step time without")
    print(f"load average start {load0} end {load_average()}")
    write_results("gpu", {"device": torch.cuda.get_device_name(), "copy": copy, "step": step,
                          "load_average": {"start": load0, "end": load_average()}})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
