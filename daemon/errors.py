"""Errors raised by the daemon: the shared wire errors, re-exported."""

from shardguard.proto.errors import (  # noqa: F401  (re-exported)
    ArenaFormatError,
    AuthenticationError,
    BudgetExceededError,
    CodecError,
    ConfigError,
    ConfigMismatchError,
    CorruptionError,
    InsufficientPiecesError,
    InvalidRequestError,
    LeaseError,
    ManifestError,
    NotRestorableError,
    PeerUnavailableError,
    RankClaimedError,
    RestoreError,
    ShardguardError,
    SlotStateError,
    StepOrderError,
    UnknownJobError,
    UnsafePathError,
)
