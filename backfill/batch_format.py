"""The JSONL input formats of batch jobs, parsed into ``GenerateRequest`` messages.

One request per line, in either of two formats; each line is recognized on its own (a line
with ``custom_id``, ``method``, ``url`` or ``body`` is OpenAI's). Blank lines and lines starting
with ``#`` carry no request.

Backfill's format::

    {"id": "q1", "prompt": "Translate to French: cheese"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}
    {"id": "q3", "token_ids": [1, 2, 3], "max_tokens": 8, "seed": 7}

Exactly one of ``prompt`` (raw text), ``messages`` (chat, rendered by the model's template) or
``token_ids``. Optional: ``id`` (names the result; the line's request index when absent),
``model``, and the sampling fields ``max_tokens``, ``min_tokens``, ``temperature``, ``top_k``,
``top_p``, ``seed``, ``stop`` (string or list), ``stop_token_ids``, ``ignore_eos``,
``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``.

OpenAI's Batch API format (what ``vllm run-batch`` also reads)::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/completions",
     "body": {"model": "m", "prompt": "Once upon a time", "max_tokens": 16}}

The body is read as the HTTP surface reads it (``backfill/openai_body.py``: the sampling fields
above, ``max_completion_tokens``, the penalties), except that a batch result is one choice,
stored whole and offline: ``n`` must be 1, ``stream``, ``echo`` and ``logprobs`` false, and
``priority`` (if given) offline. Tools, ``logit_bias`` and ``response_format`` other than text
fail the line; ``user``, ``metadata``, ``store`` and ``service_tier`` are ignored.

Any other key fails the line, naming the key, so a typo does not pass silently. Checks of values
(ranges, vocabulary) are the server's; this module checks shapes and types.

>>> parse_line({"id": "a", "prompt": "Hi", "max_tokens": 4}).request.sampling.max_tokens
4
>>> parse_line({"custom_id": "r", "method": "POST", "url": "/v1/completions",
...             "body": {"prompt": "Hi"}}).url
'/v1/completions'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backfill.openai_body import (
    CHAT_URL,
    COMPLETIONS_URL,
    OPENAI_URLS,
    SAMPLING_KEYS,
    BodyError,
    OpenAIBody,
    fill_messages,
    fill_sampling,
    parse_body,
    string,
    token_ids,
)
from backfill.v1 import inference_pb2 as pb

__all__ = ["CHAT_URL", "COMPLETIONS_URL", "OPENAI_URLS", "LineError", "ParsedLine", "parse_line"]

_BACKFILL_KEYS = frozenset({"id", "prompt", "messages", "token_ids", "model", *SAMPLING_KEYS})
_OPENAI_KEYS = frozenset({"custom_id", "method", "url", "body"})


# A line cannot become a request; the message names the offending key.
LineError = BodyError


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """One line as a request. ``url`` is the OpenAI endpoint it named ("" for Backfill's)."""

    request: pb.GenerateRequest
    url: str = ""

    @property
    def custom_id(self) -> str:
        return self.request.client_request_id


def is_request_line(line: bytes | str) -> bool:
    """False for blank lines and ``#`` comments, which carry no request."""
    if isinstance(line, bytes):
        text = line.strip()
        return bool(text) and not text.startswith(b"#")
    return bool(line.strip()) and not line.lstrip().startswith("#")


def parse_json_line(line: bytes | str) -> ParsedLine:
    """A raw line (JSON text) as a request; LineError when it is not JSON or not a request."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    return parse_line(obj)


def parse_line(obj: Mapping[str, Any]) -> ParsedLine:
    """A decoded line in either format as a request; LineError naming the key when it is not."""
    if _OPENAI_KEYS & obj.keys():
        return _parse_openai(obj)
    return ParsedLine(_parse_backfill(obj))


def custom_id_of(obj: object) -> str:
    """The id a line gives itself, if it can be read (for the result of a line that fails)."""
    if isinstance(obj, Mapping):
        value = obj.get("custom_id", obj.get("id"))
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return ""


# ---- Backfill's format ---------------------------------------------------------------------


def _parse_backfill(obj: Mapping[str, Any]) -> pb.GenerateRequest:
    _check_keys(obj, _BACKFILL_KEYS, "")
    prompts = [k for k in ("prompt", "messages", "token_ids") if obj.get(k) is not None]
    if len(prompts) != 1:
        raise LineError("exactly one of prompt, messages, token_ids must be given")
    req = pb.GenerateRequest(tier=pb.TIER_OFFLINE)
    if "id" in obj:
        req.client_request_id = _id(obj["id"], "id")
    if "model" in obj:
        req.model = string(obj["model"], "model")
    which = prompts[0]
    if which == "prompt":
        req.text = string(obj["prompt"], "prompt")
    elif which == "messages":
        fill_messages(req, obj["messages"], "messages")
    else:
        req.token_ids.ids.extend(token_ids(obj["token_ids"], "token_ids"))
    fill_sampling(req.sampling, obj, "")
    return req


# ---- OpenAI's Batch format -----------------------------------------------------------------


def _parse_openai(obj: Mapping[str, Any]) -> ParsedLine:
    _check_keys(obj, _OPENAI_KEYS, "")
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj:
            raise LineError(f"{key} is required in an OpenAI batch line")
    custom_id = _id(obj["custom_id"], "custom_id")
    if not custom_id:
        raise LineError("custom_id must not be empty")
    if obj["method"] != "POST":
        raise LineError(f"method must be 'POST', got {obj['method']!r}")
    url = obj["url"]
    if url not in OPENAI_URLS:
        raise LineError(f"url must be one of {', '.join(OPENAI_URLS)}, got {url!r}")
    body = obj["body"]
    if not isinstance(body, Mapping):
        raise LineError("body must be a JSON object")
    parsed = parse_body(url, body, "body.")
    req = parsed.request
    _check_batch(parsed, body)
    req.tier = pb.TIER_OFFLINE
    req.client_request_id = custom_id
    return ParsedLine(req, url)


def _check_batch(parsed: OpenAIBody, body: Mapping[str, Any]) -> None:
    """What a batch line cannot ask for: its result is one choice, stored whole, offline."""
    if parsed.request.n > 1:
        raise LineError(f"body.n: {parsed.request.n} is not supported in a batch job (only 1)")
    if parsed.stream:
        raise LineError("body.stream: a batch job's results are not streamed (only false)")
    if parsed.logprobs or parsed.request.sampling.HasField("prompt_logprobs"):
        raise LineError("body.logprobs: batch job results do not carry logprobs yet")
    if parsed.echo:
        raise LineError("body.echo: not supported in a batch job (only false)")
    if parsed.request.tier == pb.TIER_ONLINE:
        raise LineError(f"body.priority: batch jobs run offline, got {body['priority']!r}")


# ---- shared pieces -------------------------------------------------------------------------


def _check_keys(obj: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise LineError(f"{prefix}unknown keys {unknown}")


def _id(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LineError(f"{name} must be a string")
    return str(value)
