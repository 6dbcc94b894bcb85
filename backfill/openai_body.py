"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) as ``GenerateRequest``
messages: the one mapping, used by the HTTP surface and by batch job lines in OpenAI's format.

This module checks shapes and types and names the offending key (``body.top_p must be a
number``); value ranges are the server's validation, the same for every surface. Keys that
would change the output in ways the engine does not implement (tools, ``logit_bias``,
``response_format`` other than text) are refused by name; a few that change nothing here
(``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``) are ignored.

Beyond OpenAI's keys it takes vLLM's sampling extras (``top_k``, ``min_tokens``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``prompt_logprobs``), vLLM's
``priority``, which picks the tier: ``"online"`` / ``"offline"``, or an integer where, as in
vLLM, lower is served first (<= 0 online, > 0 offline), and Backfill's
``num_speculative_tokens`` (speculative decoding per request, as ``SamplingParams``).
"""

from __future__ import annotations

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
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "num_speculative_tokens",
)
_COMMON = frozenset({
    "model", "max_completion_tokens", "n", "stream", "stream_options", "priority",
    "prompt_logprobs", "route_hint", *SAMPLING_KEYS,
})
_CHAT = _COMMON | {"messages", "logprobs", "top_logprobs"}
_COMPLETIONS = _COMMON | {"prompt", "echo", "logprobs"}
# Keys whose only accepted values are those that change nothing here.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "best_of": (1, None),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None,),
    "function_call": (None, "none"),
}
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,  # OpenAI's newer name for the system role
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
}
_TIERS = {"online": pb.TIER_ONLINE, "offline": pb.TIER_OFFLINE}


class BodyError(ValueError):
    """A body cannot become a request; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class OpenAIBody:
    """A body as a request, plus what shapes the response rather than the generation."""

    request: pb.GenerateRequest
    url: str
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    echo: bool = False  # completions: the prompt before the completion (and its logprobs)
    logprobs: bool = False  # the response carries logprobs


def parse_body(url: str, body: Mapping[str, Any], prefix: str = "") -> OpenAIBody:
    """A decoded body for ``url`` as a request; BodyError naming ``prefix + key`` if not."""
    chat = url == CHAT_URL
    _check_keys(body, _CHAT if chat else _COMPLETIONS, prefix)
    req = pb.GenerateRequest(n=_uint(body.get("n"), prefix + "n", 2**32, default=1))
    if chat:
        fill_messages(req, body.get("messages"), prefix + "messages")
    else:
        _fill_prompt(req, body.get("prompt"), prefix + "prompt")
    if body.get("model") is not None:
        req.model = string(body["model"], prefix + "model")
    if body.get("priority") is not None:
        req.tier = _tier(body["priority"], prefix + "priority")
    if body.get("route_hint") is not None:  # Backfill's: with model "auto", small or large
        req.route_hint = string(body["route_hint"], prefix + "route_hint")
    sampling = dict(body)
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise BodyError(f"{prefix}max_tokens: give max_tokens or max_completion_tokens, "
                            "not both")
        sampling["max_tokens"] = body["max_completion_tokens"]
    fill_sampling(req.sampling, sampling, prefix)
    wants_logprobs = _fill_logprobs(req.sampling, body, chat, prefix)
    echo = _bool(body.get("echo"), prefix + "echo")
    if echo and wants_logprobs:
        req.sampling.prompt_logprobs = req.sampling.logprobs
    if body.get("prompt_logprobs") is not None:
        req.sampling.prompt_logprobs = _uint(body["prompt_logprobs"], prefix + "prompt_logprobs",
                                             2**32)
    stream = _bool(body.get("stream"), prefix + "stream")
    return OpenAIBody(req, url, stream, _include_usage(body, stream, prefix), echo,
                      wants_logprobs)


def _fill_logprobs(out: pb.SamplingParams, body: Mapping[str, Any], chat: bool,
                   prefix: str) -> bool:
    """Chat: ``logprobs`` true, ``top_logprobs`` alternatives. Completions: ``logprobs`` is
    the number of alternatives. True when the response is to carry logprobs."""
    value = body.get("logprobs")
    if chat:
        top = body.get("top_logprobs")
        if not _bool(value, prefix + "logprobs"):
            if top is not None:
                raise BodyError(f"{prefix}top_logprobs: needs logprobs set to true")
            return False
        out.logprobs = _uint(top, prefix + "top_logprobs", 2**32, default=0)
        return True
    if value is None:
        return False
    out.logprobs = _uint(value, prefix + "logprobs", 2**32)
    return True


def _include_usage(body: Mapping[str, Any], stream: bool, prefix: str) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise BodyError(f"{prefix}stream_options: only with stream set to true")
    if not isinstance(options, Mapping) or set(options) - {"include_usage",
                                                           "continuous_usage_stats"}:
        raise BodyError(f"{prefix}stream_options must be an object with include_usage")
    return _bool(options.get("include_usage"), prefix + "stream_options.include_usage")


def _tier(value: Any, name: str) -> pb.Tier.ValueType:
    if isinstance(value, str) and value in _TIERS:
        return _TIERS[value]
    if isinstance(value, int) and not isinstance(value, bool):
        return pb.TIER_ONLINE if value <= 0 else pb.TIER_OFFLINE
    raise BodyError(f"{name} must be 'online', 'offline' or an integer (<= 0: online), "
                    f"got {value!r}")


def _check_keys(body: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    for key, value in body.items():
        if key in known or key in _IGNORED:
            continue
        if key == "response_format":
            if value is not None and value != {"type": "text"}:
                raise BodyError(f"{prefix}response_format: only {{'type': 'text'}} is supported")
            continue
        allowed = _NEUTRAL.get(key)
        if allowed is None:
            raise BodyError(f"{prefix}{key}: unknown or unsupported key")
        if value not in allowed:
            raise BodyError(f"{prefix}{key}: {value!r} is not supported (only {allowed[0]!r})")


def _fill_prompt(req: pb.GenerateRequest, prompt: Any, name: str) -> None:
    """A completions prompt: a string or token ids, or a list holding exactly one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        req.token_ids.ids.extend(token_ids(prompt, name))
    elif prompt is None:
        raise BodyError(f"{name} is required")
    else:
        raise BodyError(f"{name} must be a string or a list of token ids (one prompt per "
                        "request, one prompt per line)")


def fill_messages(req: pb.GenerateRequest, messages: Any, name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise BodyError(f"{name} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping):
            raise BodyError(f"{where} must be an object with role and content")
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise BodyError(
                f"{where}.role must be system, developer, user or assistant, "
                f"got {message.get('role')!r}"
            )
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise BodyError(f"{where}: unsupported keys {extra}")
        req.chat.messages.add(role=role, content=_content(message.get("content"), where))


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise BodyError(f"{where}.content[{j}]: only text parts are supported")
            texts.append(string(part.get("text"), f"{where}.content[{j}].text"))
        return "\n".join(texts)
    raise BodyError(f"{where}.content must be a string or a list of text parts")


def fill_sampling(out: pb.SamplingParams, obj: Mapping[str, Any], prefix: str) -> None:
    for key, bound in (("max_tokens", 2**32), ("min_tokens", 2**32), ("top_k", 2**32),
                       ("seed", 2**64), ("num_speculative_tokens", 2**32)):
        if obj.get(key) is not None:
            setattr(out, key, _uint(obj[key], prefix + key, bound))
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty"):
        if obj.get(key) is not None:
            setattr(out, key, _number(obj[key], prefix + key))
    stop = obj.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BodyError(f"{prefix}stop must be a string or a list of strings")
        out.stop.extend(stops)
    if obj.get("stop_token_ids") is not None:
        out.stop_token_ids.extend(token_ids(obj["stop_token_ids"], prefix + "stop_token_ids"))
    if obj.get("ignore_eos") is not None:
        out.ignore_eos = _bool(obj["ignore_eos"], prefix + "ignore_eos")


def string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BodyError(f"{name} must be a string")
    return value


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BodyError(f"{name} must be true or false")
    return value


def _uint(value: Any, name: str, bound: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise BodyError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BodyError(f"{name} must be a number, got {value!r}")
    return float(value)


def token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value
    ):
        raise BodyError(f"{name} must be a list of non-negative integers")
    return value
