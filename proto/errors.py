"""Typed errors shared by both sides, and their mapping to gRPC status codes.

The daemon raises these; the gRPC layer sends the class name in trailing
metadata (``sg-error``) with the status code from :data:`STATUS_OF`; the client
turns the pair back into the same class. This is the one place that maps
errors to status codes.
"""

from __future__ import annotations

import grpc


class ShardguardError(Exception):
    """Base class of every shardguard error."""


class InvalidRequestError(ShardguardError, ValueError):
    """A request field is malformed or out of range."""


class UnknownJobError(ShardguardError, LookupError):
    """The job (or the job's rank) is not registered with this daemon."""


class StepOrderError(InvalidRequestError):
    """A step does not move forward from the newest restorable step."""


class SupersededError(StepOrderError):
    """A piece of a step whose source sealed that step again (a relaunch resumed before
    it): the older offer or send is void, and the newer one is the step's."""


class BudgetExceededError(ShardguardError, MemoryError):
    """The request would take the daemon past its memory budget."""


class NoSpaceError(BudgetExceededError):
    """The shared-memory directory (or the file system of the tier) is full (ENOSPC)."""


class RankClaimedError(ShardguardError):
    """Another live client already holds this (job, rank)."""


class LeaseError(ShardguardError, PermissionError):
    """The caller's lease token does not match the (job, rank)'s holder."""


class SlotStateError(ShardguardError):
    """The slot is not in the state the request needs."""


class ManifestError(ShardguardError, ValueError):
    """A manifest cannot be parsed or does not fit its slot."""


class ArenaFormatError(ShardguardError, ValueError):
    """An arena header is malformed (bad magic, version or checksum)."""


class CorruptionError(ShardguardError):
    """Stored bytes fail their checksum."""


class NotRestorableError(ShardguardError, LookupError):
    """The requested step is not restorable."""


class RestoreError(ShardguardError):
    """A restore failed on this rank or on another rank of the job."""


class InsufficientPiecesError(RestoreError):
    """More pieces of a stripe are lost than its parity can recover."""


class PeerUnavailableError(ShardguardError, ConnectionError):
    """A peer daemon cannot be reached."""


class DaemonUnavailableError(ShardguardError, ConnectionError):
    """The local daemon cannot be reached."""


class RestoreTimeoutError(ShardguardError, TimeoutError):
    """A restore did not complete within its deadline."""


class CodecError(ShardguardError):
    """The erasure codec or its native library failed."""


class ConfigError(ShardguardError, ValueError):
    """A configuration value is invalid."""


class ConfigMismatchError(ConfigError):
    """The nodes of a job disagree on what must match (code, peer secret, node list, TLS)."""


class ClockSkewError(ConfigError):
    """The clocks of a job's nodes differ by more than peer tokens tolerate."""


class JobNameError(ConfigError):
    """No job name, or one that could name several unrelated runs (torchrun's default)."""


class AuthenticationError(ShardguardError, PermissionError):
    """A peer message without a valid token made with the job's secret (DESIGN.md §6)."""


class UnsafePathError(ShardguardError, PermissionError):
    """A path that another user owns or can replace (a directory, a socket, a file at one of
    the daemon's names, a symlink): not trusted, never followed or written through."""


class IntoMismatchError(RestoreError, ValueError):
    """``restore(into=...)``: a tensor, array or key of ``into`` has no equal in the snapshot."""


STATUS_OF: dict[type[ShardguardError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    StepOrderError: grpc.StatusCode.FAILED_PRECONDITION,
    SupersededError: grpc.StatusCode.FAILED_PRECONDITION,
    ManifestError: grpc.StatusCode.INVALID_ARGUMENT,
    ArenaFormatError: grpc.StatusCode.DATA_LOSS,
    UnknownJobError: grpc.StatusCode.NOT_FOUND,
    NotRestorableError: grpc.StatusCode.NOT_FOUND,
    BudgetExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NoSpaceError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RankClaimedError: grpc.StatusCode.ALREADY_EXISTS,
    LeaseError: grpc.StatusCode.PERMISSION_DENIED,
    SlotStateError: grpc.StatusCode.FAILED_PRECONDITION,
    CorruptionError: grpc.StatusCode.DATA_LOSS,
    InsufficientPiecesError: grpc.StatusCode.DATA_LOSS,
    RestoreError: grpc.StatusCode.ABORTED,
    PeerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    RestoreTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CodecError: grpc.StatusCode.INTERNAL,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    JobNameError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    ClockSkewError: grpc.StatusCode.FAILED_PRECONDITION,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    UnsafePathError: grpc.StatusCode.PERMISSION_DENIED,
}

ERROR_METADATA_KEY = "sg-error"

_BY_NAME: dict[str, type[ShardguardError]] = {
    cls.__name__: cls for cls in [ShardguardError, *STATUS_OF, DaemonUnavailableError]
}


def status_of(exc: ShardguardError) -> grpc.StatusCode:
    """The gRPC status code that carries ``exc`` (most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.UNKNOWN


def error_from_rpc(err: grpc.RpcError) -> ShardguardError:
    """Turn a failed call back into the typed error the daemon raised."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    name = ""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            name = value
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return DaemonUnavailableError(f"daemon unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RestoreTimeoutError(f"deadline exceeded: {details}")
    return ShardguardError(f"{code}: {details}")
