"""What a trainer imports: connect, snapshot, restore, hooks, RNG helpers.

    import shardguard.client as sg
    client = sg.connect()
    client.protect(optimizer)
    h = client.snapshot(step, state)
    step, state = client.restore()

DCP (``torch.distributed.checkpoint``) into shardguard, resharding on load:
``ShardguardWriter``/``ShardguardReader`` (``shardguard.client.dcp``).

A DistributedDataParallel wrapper's gradient bucket order, for a bit-exact resume:
``ddp_state``/``load_ddp_state`` (``shardguard.client.ddp``).
"""

import shardguard.proto  # noqa: F401, I001 - first: gRPC's fork default (proto/__init__.py)
from shardguard.client.client import Client, SnapshotHandle, connect
from shardguard.client.dcp import (
    ShardguardReader,
    ShardguardWriter,
    connect_dcp,
    drop_job,
    newest_job,
    sharded_state_dict_from_local,
    sharded_state_dict_to_local,
)
from shardguard.client.ddp import DdpResumeWarning, ddp_state, load_ddp_state
from shardguard.client.errors import *  # noqa: F403 - every error a trainer may catch
from shardguard.client.rng import rng_state, set_rng_state

__all__ = [
    "BudgetExceededError", "Client", "ClockSkewError", "ConfigMismatchError", "CorruptionError", "DaemonUnavailableError",
    "InsufficientPiecesError", "IntoMismatchError", "JobNameError", "NoSpaceError", "NotRestorableError", "RankClaimedError", "RestoreError",
    "ShardguardError", "ShardguardReader", "ShardguardWriter", "SnapshotHandle",
    "StepOrderError", "UnsafePathError", "connect", "connect_dcp", "drop_job", "newest_job", "rng_state",
    "set_rng_state", "sharded_state_dict_from_local", "sharded_state_dict_to_local",
    "DdpResumeWarning", "ddp_state", "load_ddp_state",
]
