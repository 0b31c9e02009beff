"""Helpers shared by the benchmarks: timing medians, ratio tables, JSON results.

Benchmarks compare against peers measured in the same run (DESIGN.md §8), so
every table here is relative: each row's figure and how the baseline row
compares to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

GB = 1e9


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (median reported)")
    return parser


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: Mapping[str, Callable[[], object]], rounds: int = 5,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time of each of ``fns`` over ``rounds`` rounds that run each once in turn.

    For ratios between ways of doing the same thing on a shared machine: a noisy
    neighbour then slows every way of a round alike, instead of one way's whole run.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def print_table(
    rows: Sequence[Mapping[str, Any]],
    baseline_name: str,
    *,
    columns: Sequence[str] | None = None,
    name_key: str = "name",
    title: str | None = None,
) -> None:
    """Print ``rows`` with, for each numeric column, ``baseline / row``.

    With throughputs, the ratio reads "the baseline is N times as fast as
    this row". Missing or non-numeric cells print as ``-``.
    """
    if columns is None:
        columns = [key for key in rows[0] if key != name_key and isinstance(rows[0][key], (int, float))]
    base = next(r for r in rows if r[name_key] == baseline_name)
    width = max(len(str(r[name_key])) for r in rows)
    header = f"{'':<{width}}" + "".join(f" {col:>10} {'base/row':>8}" for col in columns)
    if title:
        print(f"\n{title}  (base = {baseline_name})")
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for col in columns:
            value, ref = row.get(col), base.get(col)
            if isinstance(value, (int, float)) and value > 0:
                ratio = f"{ref / value:6.2f}x" if isinstance(ref, (int, float)) else "-"
                cells.append(f" {value:10.2f} {ratio:>8}")
            else:
                cells.append(f" {'-':>10} {'-':>8}")
        print(f"{row[name_key]:<{width}}" + "".join(cells))


def machine() -> dict[str, Any]:
    """Where the numbers were taken, stored next to them."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "python": platform.python_version(), "platform": platform.platform()}


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus machine and time) to ``bench/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        # timezone.utc rather than datetime.UTC: the project supports 3.10.
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path


def print_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str, str]],
    *,
    title: str | None = None,
) -> None:
    """Print ``rows`` as a plain table; ``columns`` are ``(key, header, format)``, e.g.
    ``("blocked_ms", "blocked ms", "{:.1f}")``. Missing or None cells print as ``-``.

    For tables whose ratios are not "one baseline row over each row" (``print_table``).
    """
    cells = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max([len(header)] + [len(c[i]) for c in cells]) for i, (_, header, _) in enumerate(columns)]
    if title:
        print(f"\n{title}")
    line = "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, ((_, h, _), w) in enumerate(zip(columns, widths)))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(c, widths))))


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: on a shared machine, how busy it was while we measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so daemons and shared memory are cleaned up."""
    raise KeyboardInterrupt(f"signal {signum}")
