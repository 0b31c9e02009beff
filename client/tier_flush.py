"""The persistent tier's flusher: a process the daemon starts per flush (the daemon never
imports torch), which writes the ranks it staged as DCP checkpoints.

    python -m shardguard.client.tier_flush --dest DIR --fd FD --bytes N --job J --step S \\
        --world W --ranks '[{"rank": r, "off": o, "data_bytes": .., "manifest_offset": ..,
                             "manifest_bytes": ..}, ..]'

``FD`` is the daemon's staging buffer (a memfd holding each rank's slot bytes at ``off``),
mapped copy-on-write: nothing here can change it. Each rank goes to ``DIR/rank-<r>/``
(``tier.write_rank``: DCP's FileSystemWriter, then every file and directory fsynced).
Exit status 0 means every rank is durable; anything else, that the flush failed. The
process exits at once when its stdin closes (the daemon died), so that an orphan never
writes on, and runs at a lower CPU priority than training.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys
import threading
import time

#: Test fault points (the daemon passes one on, see daemon/tier.py): ``mid-write``
#: SIGKILLs this process once the first rank is written; ``slow-write`` sleeps first.
FAULTS = ("mid-write", "slow-write")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardguard.client.tier_flush")
    p.add_argument("--dest", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--ranks", required=True)
    p.add_argument("--test-fault", choices=FAULTS, default=None)
    args = p.parse_args(argv)
    _exit_with_parent()
    os.umask(0o077)
    try:
        os.nice(10)
    except OSError:
        pass

    # Imported after the watchdog is up: torch takes a while to import.
    import numpy as np
    import torch

    from shardguard.client import tier
    from shardguard.proto.tier import rank_dir

    torch.set_num_threads(1)
    if args.test_fault == "slow-write":
        time.sleep(SLOW_WRITE_S)
    mm = mmap.mmap(args.fd, args.bytes, access=mmap.ACCESS_COPY)
    u8 = torch.frombuffer(mm, dtype=torch.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    for i, r in enumerate(json.loads(args.ranks)):
        rank = int(r["rank"])
        tier.write_rank(rank_dir(args.dest, rank), u8, arr, int(r["off"]),
                        int(r["data_bytes"]), int(r["manifest_offset"]),
                        int(r["manifest_bytes"]), job=args.job, rank=rank, step=args.step,
                        world=args.world)
        if args.test_fault == "mid-write" and i == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    os._exit(status)  # everything is fsynced; skip tearing down torch and the watchdog
