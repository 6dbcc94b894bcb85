"""The one mapping from internal errors and outcomes to gRPC status codes, and from those to
HTTP statuses: both surfaces answer the same failure the same way."""

from __future__ import annotations

import grpc

from backfill.v1 import inference_pb2 as pb
from server.api.validation import InvalidArgumentError
from server.quotas import QuotaExceededError
from server.scheduler.types import DrainingError, Outcome, QueueFullError, SchedEvent
from server.security.auth import Refusal


class NotFoundError(LookupError):
    """A named object (a batch job) does not exist; the service answers NOT_FOUND."""


class AlreadyExistsError(Exception):
    """A key names an object that differs from the request (an idempotency key reused for
    other requests); the service answers ALREADY_EXISTS."""


class UnauthenticatedError(Exception):
    """Missing or invalid credentials; the service answers UNAUTHENTICATED."""

    def __init__(self, message: str, refusal: Refusal) -> None:
        super().__init__(message)
        self.refusal = refusal


class PermissionDeniedError(Exception):
    """Valid credentials acting outside their tenant; the service answers PERMISSION_DENIED."""


# ---- errors and outcomes → status -------------------------------------------------------------

Status = tuple[grpc.StatusCode, str]


def status_for_exception(exc: BaseException) -> Status:
    """The one mapping from internal errors to gRPC status codes."""
    if isinstance(exc, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QuotaExceededError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "queue full"
    if isinstance(exc, DrainingError):
        return grpc.StatusCode.UNAVAILABLE, "draining: the server is shutting down"
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AlreadyExistsError):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, ValueError):
        # The scheduler's "the engine can never run this" (e.g. prompt too long).
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def status_for_outcome(event: SchedEvent) -> Status | None:
    """The error status a final event ends its request with; None for a normal finish."""
    outcome = event.outcome
    if outcome in (None, Outcome.STOP, Outcome.LENGTH):
        return None
    if outcome is Outcome.CANCELLED:
        return grpc.StatusCode.CANCELLED, "cancelled"
    if outcome is Outcome.DEADLINE:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "ttft_deadline passed before the first token"
    if outcome is Outcome.SHUTDOWN:
        return grpc.StatusCode.UNAVAILABLE, "draining: the server stopped before it finished"
    return grpc.StatusCode.INTERNAL, event.error or "the engine failed this request"


def to_pb_status(status: Status) -> pb.Status:
    code, message = status
    return pb.Status(code=code.value[0], message=message)


# gRPC status → (HTTP status, OpenAI error type). 429 and 503 are what OpenAI's clients retry.
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
}


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    """The HTTP status and OpenAI error ``type`` of a gRPC status code."""
    return _HTTP.get(code, (500, "server_error"))
