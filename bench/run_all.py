"""Run every ``bench/bench_*.py`` in turn, each in its own process (``make bench``).

Usage: ``python bench/run_all.py [--quick] [NAME ...]`` where a NAME picks the
benchmarks whose file name contains it (``node`` runs ``bench_node.py``).
``--quick`` is passed on. Exits non-zero if any benchmark failed; an interrupt
is passed to the running benchmark, which cleans up after itself, and stops the
rest.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
INTERRUPT_GRACE_S = 60.0
_child: subprocess.Popen[bytes] | None = None


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM reaches only us (Ctrl-C reaches the whole process group): pass it on, then stop."""
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt(f"signal {signum}")


def run(cmd: list[str]) -> int:
    """The command's exit status; when interrupted, wait for the benchmark's own cleanup first."""
    global _child
    proc = _child = subprocess.Popen(cmd, cwd=BENCH_DIR.parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed to every benchmark")
    parser.add_argument("names", nargs="*", help="run only benchmarks whose file name contains one of these")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminated)
    scripts = sorted(p for p in BENCH_DIR.glob("bench_*.py") if not args.names or any(n in p.stem for n in args.names))
    if not scripts:
        parser.error(f"no benchmark matches {args.names}")
    results: list[tuple[str, int, float]] = []
    for script in scripts:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {script.name} {'--quick' if args.quick else ''}".rstrip(), flush=True)
        t0 = time.monotonic()
        try:
            rc = run(cmd)
        except KeyboardInterrupt:
            print(f"\ninterrupted during {script.name}", file=sys.stderr)
            return 130
        results.append((script.name, rc, time.monotonic() - t0))
    print("\n=== summary")
    for name, rc, seconds in results:
        print(f"{name:<24} {'ok' if rc == 0 else f'FAILED (exit {rc})':<18} {seconds:7.0f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
