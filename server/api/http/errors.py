"""Errors as OpenAI's JSON error body with the HTTP status the gRPC surface's status maps to
(server/api/errors.py): one mapping, two surfaces. Messages name the field as the HTTP body
spells it (``top_p``, not ``sampling.top_p``)."""

from __future__ import annotations

import json
import math
import re

import grpc
from starlette.responses import Response

from backfill.openai_output import error_body
from server.api.errors import Status, http_status, status_for_exception
from server.api.http.body import BodyTooLargeError
from server.quotas import QuotaExceededError

# Field names of GenerateRequest (what validation.py names) -> the OpenAI body's.
_BODY_NAMES = (
    (re.compile(r"^sampling\.max_tokens\b"), "max_tokens"),
    (re.compile(r"^sampling\.logprobs\b"), "logprobs"),
    (re.compile(r"^sampling\."), ""),
    (re.compile(r"^chat\.messages\b"), "messages"),
    (re.compile(r"^(text|token_ids\.ids|prompt)\b"), "prompt"),
)
_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*)")


def body_field_message(message: str) -> str:
    for pattern, name in _BODY_NAMES:
        if pattern.search(message):
            return pattern.sub(name, message, count=1)
    return message


def error_response(status: Status) -> Response:
    code, message = status
    http, type_ = http_status(code)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        message = body_field_message(message)
    match = _PARAM.match(message) if code is grpc.StatusCode.INVALID_ARGUMENT else None
    param = match.group(1) if match and match.group(1) not in ("line", "header") else None
    body = error_body(message, type_, code.name.lower(), param)
    return Response(json.dumps(body), status_code=http, media_type="application/json")


def exception_response(exc: BaseException) -> Response:
    if isinstance(exc, BodyTooLargeError):
        body = error_body(str(exc), "invalid_request_error", "request_too_large", None)
        return Response(json.dumps(body), status_code=413, media_type="application/json")
    response = error_response(status_for_exception(exc))
    if isinstance(exc, QuotaExceededError) and exc.retry_after_s is not None:
        response.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    return response


def invalid(message: str) -> Response:
    return error_response((grpc.StatusCode.INVALID_ARGUMENT, message))


def not_found(message: str) -> Response:
    return error_response((grpc.StatusCode.NOT_FOUND, message))
