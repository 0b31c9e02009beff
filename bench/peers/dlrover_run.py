"""``dlrover-run`` (DLRover 0.6.1's launcher, ``dlrover.trainer.torch.elastic_run``) with the shim it needs on torch 2.13.

Usage: the arguments of ``dlrover-run``, e.g. ``python dlrover_run.py --standalone --nproc_per_node=1 script.py``.
"""

from __future__ import annotations

import sys
from typing import Any

import dlrover.trainer.torch.elastic_run as elastic_run
from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler


class _SubprocessHandler(SubprocessHandler):
    """Shim: torch 2.13's ``SubprocessHandler`` takes a required ``numa_options`` argument, and
    DLRover 0.6.1 starts its local master with the six arguments of older torch
    (``elastic_run._launch_dlrover_local_master``: TypeError, missing 'numa_options')."""

    def __init__(self, *args: Any, numa_options: Any = None) -> None:
        if len(args) == 6:
            args = (*args, numa_options)
        super().__init__(*args)


elastic_run.SubprocessHandler = _SubprocessHandler

if __name__ == "__main__":
    sys.exit(elastic_run.main())
