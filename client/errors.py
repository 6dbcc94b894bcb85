"""Errors raised by the Backfill client: one base class, one subclass per gRPC status code.

Every error the SDK raises is a :class:`BackfillError`; :func:`error_from_status` is the one
place that maps a status code to its subclass, whether the code came from a failed RPC or from
a per-request error on a ``Session`` stream.

>>> err = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "online queue full")
>>> isinstance(err, ResourceExhausted), err.code.name, str(err)
(True, 'RESOURCE_EXHAUSTED', 'RESOURCE_EXHAUSTED: online queue full')
"""

from __future__ import annotations

import re

import grpc


class BackfillError(Exception):
    """Base of every SDK error; ``code`` is the gRPC status code, ``details`` the server's text."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}" if details else self.code.name)

    @property
    def retryable(self) -> bool:
        """True when the request never reached the engine, so sending it again is safe."""
        return False


class InvalidArgument(BackfillError):
    """The request is malformed (bad field, prompt too long, unknown model)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BackfillError):
    """No such model or batch job."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(BackfillError):
    """The tier's queue is full; try later or lower the load."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MessageTooLarge(ResourceExhausted):
    """A message is over the gRPC size limit of the side that refused it (the server's
    ``--max-message-mb`` or the client's ``max_message_mb``); nothing was run."""


# grpc core's words for a message over a limit, e.g. "SERVER: Received message larger than max
# (N vs. M)"; the prefix names the side whose limit refused it.
_GRPC_TOO_LARGE = re.compile(
    r"(?:(CLIENT|SERVER): )?(Received|Sent) message larger than max \((\d+) vs\. (\d+)\)"
)


def message_too_large(size: int, limit: int, *, client_side: bool) -> MessageTooLarge:
    """The error for a message of ``size`` bytes over ``limit``; ``client_side``: this
    client's own limit refused it (else the server's)."""
    whose = "this client's limit" if client_side else "the server's limit"
    knob = "max_message_mb" if client_side else "--max-message-mb"
    return MessageTooLarge(
        f"a message of {_mib(size)} is over {whose} of {_mib(limit)} ({knob}): send less per "
        "message (split the batch), or raise the server's --max-message-mb and the client's "
        "max_message_mb (CLI --max-message-mb) together"
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n % (1 << 20) else f"{n >> 20} MiB"


class DeadlineExceeded(BackfillError):
    """The TTFT deadline (or the client's timeout) passed first."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(BackfillError):
    """The request was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unavailable(BackfillError):
    """The server is unreachable or draining."""

    code = grpc.StatusCode.UNAVAILABLE

    @property
    def retryable(self) -> bool:
        return True


class AlreadyExists(BackfillError):
    """An idempotency key was reused for a different batch job."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(BackfillError):
    """The operation does not fit the object's state (e.g. results of a cancelled job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(BackfillError):
    """The server does not offer this method."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(BackfillError):
    """Missing or wrong credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BackfillError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(BackfillError):
    """The server or the engine failed."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[BackfillError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unavailable,
        AlreadyExists,
        FailedPrecondition,
        Unimplemented,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgument
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal
_TOO_LARGE_CODE = grpc.StatusCode.RESOURCE_EXHAUSTED
_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(code: grpc.StatusCode | int, details: str = "") -> BackfillError:
    """Maps a gRPC status code (enum or its integer value) to its :class:`BackfillError`.

    Codes without a dedicated class (UNKNOWN, ABORTED, ...) give a plain ``BackfillError``
    carrying the code.
    """
    status = code if isinstance(code, grpc.StatusCode) else _BY_VALUE.get(code)
    if status is None:
        return BackfillError(f"status {code}: {details}")
    too_large = _GRPC_TOO_LARGE.search(details) if status is _TOO_LARGE_CODE else None
    if too_large is not None:
        side, verb, size, limit = too_large.groups()
        client_side = side == "CLIENT" if side else verb == "Sent"
        return message_too_large(int(size), int(limit), client_side=client_side)
    cls = _BY_CODE.get(status)
    if cls is None:
        return BackfillError(details, code=status)
    return cls(details, code=status)


def error_from_rpc(exc: grpc.RpcError) -> BackfillError:
    """The :class:`BackfillError` for a failed RPC (``grpc.aio.AioRpcError`` or a sync one)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_from_status(code or grpc.StatusCode.UNKNOWN, details or "")
