"""Offline batch requests: the JSONL file format and conversions of results to JSON.

One JSON object per line (blank lines and lines starting with ``#`` are skipped)::

    {"id": "q1", "prompt": "Translate to French: cheese"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64,
     "temperature": 0.7}
    {"id": "q3", "token_ids": [1, 2, 3], "max_tokens": 8, "seed": 7}

Exactly one of ``prompt`` (raw text), ``messages`` (chat, rendered by the model's template) or
``token_ids`` is required. Optional: ``id`` (names the result; the line's index when absent),
``model``, and the sampling fields ``max_tokens``, ``min_tokens``, ``temperature``, ``top_k``,
``top_p``, ``seed``, ``stop`` (string or list), ``stop_token_ids``, ``ignore_eos``. Any other
key is an error, so a typo does not pass silently.

>>> parse_request({"id": "a", "prompt": "Hi", "max_tokens": 4}).sampling.max_tokens
4
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Union

from client.types import BatchRequest, BatchResult, ChatMessage, SamplingParams

RequestLike = Union[BatchRequest, str, Mapping[str, Any]]  # noqa: UP007 (runtime alias, 3.10)

_SAMPLING_KEYS = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)
_KNOWN_KEYS = frozenset({"id", "prompt", "messages", "token_ids", "model", *_SAMPLING_KEYS})


def parse_request(obj: Mapping[str, Any], index: int = 0) -> BatchRequest:
    """One JSONL object to a BatchRequest; raises ValueError naming the problem."""
    unknown = sorted(set(obj) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"request {index}: unknown keys {unknown}")
    sampling_args = {key: obj[key] for key in _SAMPLING_KEYS if key in obj}
    if isinstance(sampling_args.get("stop"), str):
        sampling_args["stop"] = (sampling_args["stop"],)
    for key in ("stop", "stop_token_ids"):
        if key in sampling_args:
            sampling_args[key] = tuple(sampling_args[key])
    messages = obj.get("messages")
    token_ids = obj.get("token_ids")
    try:
        return BatchRequest(
            id=str(obj.get("id", index)),
            prompt=obj.get("prompt"),
            messages=None if messages is None else tuple(map(ChatMessage.coerce, messages)),
            token_ids=None if token_ids is None else tuple(int(t) for t in token_ids),
            sampling=SamplingParams(**sampling_args),
            model=str(obj.get("model", "")),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"request {index}: {exc}") from exc


def coerce_requests(requests: Iterable[RequestLike]) -> list[BatchRequest]:
    """BatchRequests from BatchRequests, JSONL-shaped dicts or plain prompt strings."""
    out: list[BatchRequest] = []
    for index, request in enumerate(requests):
        if isinstance(request, BatchRequest):
            out.append(request)
        elif isinstance(request, str):
            out.append(BatchRequest(id=str(index), prompt=request))
        else:
            out.append(parse_request(request, index))
    return out


def load_jsonl(path: str | os.PathLike[str]) -> list[BatchRequest]:
    """Reads a JSONL file of requests (format above)."""
    requests: list[BatchRequest] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            try:
                requests.append(parse_request(obj, len(requests)))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from exc
    return requests


def result_to_json(result: BatchResult) -> dict[str, Any]:
    """A result as one JSONL-ready object (the shape ``batch results`` prints)."""
    out: dict[str, Any] = {
        "index": result.index,
        "id": result.request_id,
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason.value if result.finish_reason else None,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "cached_prompt_tokens": result.usage.cached_prompt_tokens,
        },
    }
    if result.error is not None:
        out["error"] = {"code": result.error.code.name, "message": result.error.details}
    return out
