"""shardguard itself: ``client.snapshot()`` every step against a real node daemon that bench_peers.py
started (``--option socket=...``), ``client.protect(optimizer)``; complete when sealed in the
daemon's shared memory; restored with ``restore(into=state)``. Runs in the project's venv."""

from __future__ import annotations

from typing import Any

import _harness as h
import bench_node as bn


class Shardguard(h.BenchNodePeer):
    name = "shardguard snapshot"
    restore_way = "restore(into=state), checksums verified"

    def __init__(self, args: Any, state: dict[str, Any]) -> None:
        super().__init__(args, state)
        self.inner = bn.Shardguard(args.options["socket"], args.options["job"])

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.client.restore(into=state)

    def daemon_pid(self) -> int | None:
        return int(self.args.options["daemon_pid"])

    def close(self) -> None:
        self.inner.close()


if __name__ == "__main__":
    h.main(Shardguard)
