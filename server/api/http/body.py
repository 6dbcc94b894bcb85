"""Request bodies read with a size limit: a body over it is refused (413) as it arrives,
before it is held in memory whole."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from backfill.openai_body import BodyError


class BodyTooLargeError(BodyError):
    """The body is over the server's limit (``--max-message-mb``, as for gRPC messages)."""


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body (BodyError when it is not JSON, BodyTooLargeError when over
    ``limit`` bytes, checked against Content-Length first and then while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(_too_large(limit))
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(_too_large(limit))
        parts.append(chunk)
    try:
        return json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyError(f"body: not JSON: {exc}") from None


def _too_large(limit: int) -> str:
    return f"body: over the server's limit of {limit >> 20} MiB (--max-message-mb)"
