"""Errors a trainer may catch: the shared wire errors, re-exported."""

from shardguard.proto.errors import (  # noqa: F401  (re-exported)
    BudgetExceededError,
    ClockSkewError,
    ConfigMismatchError,
    CorruptionError,
    DaemonUnavailableError,
    InsufficientPiecesError,
    IntoMismatchError,
    InvalidRequestError,
    JobNameError,
    LeaseError,
    ManifestError,
    NotRestorableError,
    RankClaimedError,
    RestoreError,
    RestoreTimeoutError,
    ShardguardError,
    SlotStateError,
    StepOrderError,
    UnknownJobError,
    UnsafePathError,
)
