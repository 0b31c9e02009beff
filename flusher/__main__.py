"""The flusher process: writes the ranks the daemon staged for one flush, then exits.

    python -m shardguard.flusher --dest DIR --fd FD --bytes N --job J --step S \\
        --world W --ranks '[{"rank": r, "off": o, "data_bytes": .., "manifest_offset": ..,
                             "manifest_bytes": ..}, ..]' [--test-fault POINT]

``FD`` is the daemon's staging buffer (a memfd holding each rank's slot bytes at ``off``),
mapped copy-on-write: nothing here can change it. Each rank goes to ``DIR/rank-<r>/``
(:func:`shardguard.flusher.write.write_rank`: DCP's FileSystemWriter, then every file and
directory fsynced). Exit status 0 means every rank is durable; anything else, that the
flush failed. The process exits at once when its stdin closes (the daemon died), so that
an orphan never writes on, and runs at a lower CPU priority than training.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading

from shardguard.proto import faults

#: Test fault points (``shardguard.proto.faults``), armed by the daemon's
#: ``SHARDGUARD_TEST_TIER_FAULT`` and passed on as ``--test-fault POINT``: ``mid-write``
#: SIGKILLs this process once the first rank is written; ``slow-write`` waits
#: ``SLOW_WRITE_S`` before writing.
ACTION_OF = {"mid-write": "kill", "slow-write": "slow"}
SLOW_WRITE_S = 3.0


def _exit_with_parent() -> None:
    """The daemon holds our stdin open until we exit: end of file means it is gone."""
    def watch() -> None:
        # os.read, not sys.stdin: a thread blocked in a buffered reader aborts the
        # interpreter's shutdown.
        try:
            while os.read(0, 4096):
                pass
        finally:
            os._exit(70)

    threading.Thread(target=watch, name="sg-flush-watch", daemon=True).start()


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardguard.flusher")
    p.add_argument("--dest", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--ranks", required=True)
    p.add_argument("--test-fault", choices=tuple(ACTION_OF), action="append", default=[])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    _exit_with_parent()
    os.umask(0o077)
    try:
        os.nice(10)
    except OSError:
        pass
    armed = faults.Faults([faults.Fault(p, args.step, action=ACTION_OF[p])
                           for p in args.test_fault], slow_s=SLOW_WRITE_S)

    # Imported once the watchdog is up (not at the top): torch takes a while to import,
    # and an orphan must not outlive the daemon meanwhile.
    import numpy as np
    import torch

    from shardguard.flusher.write import write_rank
    from shardguard.proto.tier import rank_dir

    torch.set_num_threads(1)
    armed.point("slow-write", args.step)
    mm = mmap.mmap(args.fd, args.bytes, access=mmap.ACCESS_COPY)
    u8 = torch.frombuffer(mm, dtype=torch.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    for r in json.loads(args.ranks):
        rank = int(r["rank"])
        write_rank(rank_dir(args.dest, rank), u8, arr, int(r["off"]), int(r["data_bytes"]),
                   int(r["manifest_offset"]), int(r["manifest_bytes"]), job=args.job,
                   rank=rank, step=args.step, world=args.world)
        armed.point("mid-write", args.step)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    os._exit(status)  # everything is fsynced; skip tearing down torch and the watchdog
