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
``top_p``, ``seed``, ``stop`` (string or list), ``stop_token_ids``, ``ignore_eos``.

OpenAI's Batch API format (what ``vllm run-batch`` also reads)::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/completions",
     "body": {"model": "m", "prompt": "Once upon a time", "max_tokens": 16}}

The body takes the sampling fields above (``max_completion_tokens`` too); ``n`` must be 1 and
``stream`` false; fields that would change the output in ways this engine does not implement
(tools, logprobs, penalties, ``response_format`` other than text) fail the line, and a few that
change nothing here (``user``, ``metadata``, ``store``, ``service_tier``) are ignored.

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

from backfill.v1 import inference_pb2 as pb

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OPENAI_URLS = (CHAT_URL, COMPLETIONS_URL)

SAMPLING_KEYS = (
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
_BACKFILL_KEYS = frozenset({"id", "prompt", "messages", "token_ids", "model", *SAMPLING_KEYS})
_OPENAI_KEYS = frozenset({"custom_id", "method", "url", "body"})
_BODY_COMMON = frozenset({"model", "max_completion_tokens", *SAMPLING_KEYS})
# Keys whose only accepted value is the one that changes nothing here.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "stream": (False, None),
    "logprobs": (False, None, 0),
    "top_logprobs": (0, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None,),
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "functions": (None,),
    "function_call": (None, "none"),
    "stream_options": (None,),
}
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,  # OpenAI's newer name for the system role
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
}


class LineError(ValueError):
    """A line cannot become a request; the message names the offending key."""


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
        req.model = _str(obj["model"], "model")
    which = prompts[0]
    if which == "prompt":
        req.text = _str(obj["prompt"], "prompt")
    elif which == "messages":
        _fill_messages(req, obj["messages"], "messages")
    else:
        req.token_ids.ids.extend(_token_ids(obj["token_ids"], "token_ids"))
    _fill_sampling(req.sampling, obj, "")
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
    req = pb.GenerateRequest(tier=pb.TIER_OFFLINE, client_request_id=custom_id)
    if url == CHAT_URL:
        _check_body(body, {"messages"})
        _fill_messages(req, body.get("messages"), "body.messages")
    else:
        _check_body(body, {"prompt"})
        _fill_prompt(req, body.get("prompt"))
    if body.get("model") is not None:
        req.model = _str(body["model"], "body.model")
    sampling = dict(body)
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise LineError("body: give max_tokens or max_completion_tokens, not both")
        sampling["max_tokens"] = body["max_completion_tokens"]
    _fill_sampling(req.sampling, sampling, "body.")
    return ParsedLine(req, url)


def _check_body(body: Mapping[str, Any], prompt_keys: set[str]) -> None:
    for key, value in body.items():
        if key in _BODY_COMMON or key in prompt_keys or key in _IGNORED:
            continue
        if key == "response_format":
            if value is not None and value != {"type": "text"}:
                raise LineError("body.response_format: only {'type': 'text'} is supported")
            continue
        allowed = _DEFAULT_ONLY.get(key)
        if allowed is None:
            raise LineError(f"body.{key}: unknown or unsupported key")
        if value not in allowed:
            raise LineError(f"body.{key}: {value!r} is not supported (only {allowed[0]!r})")


def _fill_prompt(req: pb.GenerateRequest, prompt: Any) -> None:
    """A completions prompt: a string or token ids, or a list holding exactly one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        req.token_ids.ids.extend(_token_ids(prompt, "body.prompt"))
    elif prompt is None:
        raise LineError("body.prompt is required")
    else:
        raise LineError("body.prompt must be a string or a list of token ids (one prompt per line)")


# ---- shared pieces -------------------------------------------------------------------------


def _check_keys(obj: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise LineError(f"{prefix}unknown keys {unknown}")


def _fill_messages(req: pb.GenerateRequest, messages: Any, name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise LineError(f"{name} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping):
            raise LineError(f"{where} must be an object with role and content")
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise LineError(
                f"{where}.role must be system, developer, user or assistant, "
                f"got {message.get('role')!r}"
            )
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise LineError(f"{where}: unsupported keys {extra}")
        req.chat.messages.add(role=role, content=_content(message.get("content"), where))


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise LineError(f"{where}.content[{j}]: only text parts are supported")
            texts.append(_str(part.get("text"), f"{where}.content[{j}].text"))
        return "\n".join(texts)
    raise LineError(f"{where}.content must be a string or a list of text parts")


def _fill_sampling(out: pb.SamplingParams, obj: Mapping[str, Any], prefix: str) -> None:
    for key, bound in (("max_tokens", 2**32), ("min_tokens", 2**32), ("top_k", 2**32),
                       ("seed", 2**64)):
        if obj.get(key) is not None:
            setattr(out, key, _uint(obj[key], prefix + key, bound))
    for key in ("temperature", "top_p"):
        if obj.get(key) is not None:
            setattr(out, key, _number(obj[key], prefix + key))
    stop = obj.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise LineError(f"{prefix}stop must be a string or a list of strings")
        out.stop.extend(stops)
    if obj.get("stop_token_ids") is not None:
        out.stop_token_ids.extend(_token_ids(obj["stop_token_ids"], prefix + "stop_token_ids"))
    if obj.get("ignore_eos") is not None:
        if not isinstance(obj["ignore_eos"], bool):
            raise LineError(f"{prefix}ignore_eos must be true or false")
        out.ignore_eos = obj["ignore_eos"]


def _id(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LineError(f"{name} must be a string")
    return str(value)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise LineError(f"{name} must be a string")
    return value


def _uint(value: Any, name: str, bound: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise LineError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LineError(f"{name} must be a number, got {value!r}")
    return float(value)


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value
    ):
        raise LineError(f"{name} must be a list of non-negative integers")
    return value
