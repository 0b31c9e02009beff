"""The gRPC boundary of both services: the project's errors become gRPC statuses here, once.

:func:`handler` wraps every method: a :class:`ShardguardError` is answered with the
status :data:`~shardguard.proto.errors.STATUS_OF` maps its class to and the class name
in trailing metadata (the client turns the pair back into the class); ENOSPC in the
shm directory becomes :class:`NoSpaceError` and the job's stall cause; anything else is
logged and answered INTERNAL, and the daemon keeps serving. :class:`DecodeGuard`
refuses requests that do not parse, typed, before anything else sees them.
"""

from __future__ import annotations

import errno
import functools
import logging
from importlib import metadata
from typing import Any, Callable, TypeVar

import grpc

from shardguard.daemon.base.stalls import Cause, Stalls
from shardguard.daemon.errors import InvalidRequestError, NoSpaceError, SupersededError
from shardguard.proto.errors import ERROR_METADATA_KEY, ShardguardError, status_of

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def handler(fn: F) -> F:
    """Map the project's errors to gRPC statuses (the one place that does).

    The service's ``stalls`` (when it has one) learns of a full shm directory.
    """
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            try:
                return fn(self, request, context)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The shm directory is full (a neighbour's files, a small tmpfs): typed,
                # named as the stall cause; what was stored before stays intact.
                full = NoSpaceError(f"{fn.__name__}: no space left in the shared-memory "
                                    f"directory ({exc.filename or 'shm'}): {exc.strerror}")
                stalls: Stalls | None = getattr(self, "stalls", None)
                job = getattr(request, "job", "")
                if stalls is not None and job:
                    stalls.record(job, Cause.NO_SPACE, str(full))
                raise full from None
        except ShardguardError as exc:
            # A void offer of an older seal is the normal end of a relaunch's overlap.
            level = logging.INFO if isinstance(exc, SupersededError) else logging.WARNING
            logger.log(level, "%s refused: %s: %s", fn.__name__, type(exc).__name__, exc,
                       extra=_log_context(request))
            context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
            context.abort(status_of(exc), str(exc))
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one request
            logger.exception("%s failed", fn.__name__, extra=_log_context(request))
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    return wrapper  # type: ignore[return-value]


def _log_context(request: Any) -> dict[str, Any]:
    """The job, step and rank a request names (and the calling node of a peer call)."""
    out = {key: getattr(request, key) for key in ("job", "step", "rank")
           if getattr(request, key, "") not in ("", -1)}  # -1: no step (the restorable one)
    if getattr(request, "node", None) is not None:
        out["peer"] = request.node
    return out


def version() -> str:
    try:
        return metadata.version("shardguard")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _Undecodable:
    """What a request that does not parse becomes, so that the handler can refuse it typed."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class DecodeGuard(grpc.ServerInterceptor):
    """Requests that do not parse get InvalidRequestError (typed), not grpc's own error.

    Outermost interceptor: it parses the request itself and answers before any
    other interceptor or handler (authentication included) sees it.
    """

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, inner, method = handler.request_deserializer, handler.unary_unary, details.method

        def tolerant(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's fault
                return _Undecodable(exc)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                exc = InvalidRequestError(f"{method}: the request does not parse "
                                          f"({type(request.exc).__name__})")
                logger.warning("refused: %s", exc)
                context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
                context.abort(status_of(exc), str(exc))
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=tolerant,
            response_serializer=handler.response_serializer)
