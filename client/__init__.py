"""What a trainer imports: connect, snapshot, restore, hooks, RNG helpers.

    import shardguard.client as sg
    client = sg.connect()
    client.protect(optimizer)
    h = client.snapshot(step, state)
    step, state = client.restore()
"""

from shardguard.client.client import Client, SnapshotHandle, connect
from shardguard.client.errors import (
    BudgetExceededError,
    CorruptionError,
    DaemonUnavailableError,
    InsufficientPiecesError,
    NotRestorableError,
    RankClaimedError,
    RestoreError,
    ShardguardError,
    StepOrderError,
)
from shardguard.client.rng import rng_state, set_rng_state

__all__ = [
    "BudgetExceededError", "Client", "CorruptionError", "DaemonUnavailableError",
    "InsufficientPiecesError", "NotRestorableError", "RankClaimedError", "RestoreError",
    "ShardguardError", "SnapshotHandle", "StepOrderError", "connect", "rng_state",
    "set_rng_state",
]
