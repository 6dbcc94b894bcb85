"""Checks of every field of a request, before anything is tokenized or queued.

Each failure raises ``InvalidArgumentError`` whose message names the offending field the way the
proto spells it (``sampling.top_p must be in (0, 1], got 1.5``), so a client can fix its request
from the status message alone. Batch requests prefix the field with ``requests[i].``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from backfill.v1 import inference_pb2 as pb
from server.executor.base import MAX_SPECULATIVE_TOKENS, MAX_TOP_LOGPROBS

MAX_TEMPERATURE = 100.0
MAX_ID_CHARS = 256  # client_request_id, tenant: ids and labels, not payloads
MAX_STOP_STRINGS = 16
MAX_BATCH_REQUESTS = 100_000
MAX_CHOICES = 64  # GenerateRequest.n: each choice holds a batch slot
MAX_PENALTY = 2.0
_PROMPT_FIELDS = "text, chat, token_ids"
# Built once: ``EnumTypeWrapper.values()`` makes a new list on every call (once per request).
_TIERS = frozenset(pb.Tier.values())
_ROLES = frozenset(pb.Role.values()) - {pb.ROLE_UNSPECIFIED}


class InvalidArgumentError(ValueError):
    """A request field is invalid; the service answers INVALID_ARGUMENT with this message."""


def validate_generate(req: pb.GenerateRequest, *, vocab_size: int, prefix: str = "") -> None:
    """Every field of one GenerateRequest that can be checked without the tokenizer."""
    _check_prompt(req, vocab_size, prefix)
    if req.HasField("sampling"):
        _check_sampling(req.sampling, vocab_size, prefix + "sampling.")
    if req.tier not in _TIERS:
        raise InvalidArgumentError(f"{prefix}tier: unknown value {req.tier}")
    if req.HasField("ttft_deadline"):
        d = req.ttft_deadline
        if d.seconds < 0 or d.nanos < 0 or (d.seconds == 0 and d.nanos == 0):
            raise InvalidArgumentError(
                f"{prefix}ttft_deadline must be positive, got {d.seconds}s {d.nanos}ns"
            )
    if req.n > MAX_CHOICES:
        raise InvalidArgumentError(f"{prefix}n must be in [1, {MAX_CHOICES}], got {req.n}")
    check_label(req.tenant, prefix + "tenant")
    check_label(req.client_request_id, prefix + "client_request_id")


def validate_prompt_length(num_tokens: int, *, max_seq_len: int, prefix: str = "") -> None:
    """The tokenized prompt must leave room for at least one generated token."""
    if num_tokens == 0:
        raise InvalidArgumentError(f"{prefix}prompt: tokenizes to no tokens")
    if num_tokens >= max_seq_len:
        raise InvalidArgumentError(
            f"{prefix}prompt: {num_tokens} tokens leave no room to generate within the "
            f"model's max_seq_len {max_seq_len}"
        )


def validate_batch(req: pb.SubmitBatchRequest, *, vocab_size: int) -> None:
    if not req.requests:
        raise InvalidArgumentError("requests must not be empty")
    if len(req.requests) > MAX_BATCH_REQUESTS:
        raise InvalidArgumentError(
            f"requests: at most {MAX_BATCH_REQUESTS} per job, got {len(req.requests)}"
        )
    check_label(req.tenant, "tenant")
    check_label(req.idempotency_key, "idempotency_key")
    seen: set[str] = set()
    for i, item in enumerate(req.requests):
        validate_generate(item, vocab_size=vocab_size, prefix=f"requests[{i}].")
        rid = item.client_request_id
        if rid and rid in seen:
            raise InvalidArgumentError(
                f"requests[{i}].client_request_id {rid!r} is used twice in the job"
            )
        seen.add(rid)


def _check_prompt(req: pb.GenerateRequest, vocab_size: int, prefix: str) -> None:
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidArgumentError(f"{prefix}prompt: exactly one of {_PROMPT_FIELDS} must be set")
    if which == "text" and not req.text:
        raise InvalidArgumentError(f"{prefix}text must not be empty")
    if which == "chat":
        _check_chat(req.chat, prefix + "chat.")
    if which == "token_ids":
        ids = req.token_ids.ids
        if not ids:
            raise InvalidArgumentError(f"{prefix}token_ids.ids must not be empty")
        _check_ids(ids, vocab_size, prefix + "token_ids.ids")


def _check_chat(chat: pb.ChatMessages, prefix: str) -> None:
    if not chat.messages:
        raise InvalidArgumentError(f"{prefix}messages must not be empty")
    for i, message in enumerate(chat.messages):
        if message.role not in _ROLES:
            raise InvalidArgumentError(
                f"{prefix}messages[{i}].role must be ROLE_SYSTEM, ROLE_USER or "
                f"ROLE_ASSISTANT, got {message.role}"
            )


def _check_sampling(s: pb.SamplingParams, vocab_size: int, prefix: str) -> None:
    if s.HasField("temperature") and not (
        math.isfinite(s.temperature) and 0.0 <= s.temperature <= MAX_TEMPERATURE
    ):
        raise InvalidArgumentError(
            f"{prefix}temperature must be in [0, {MAX_TEMPERATURE:g}], got {s.temperature:g}"
        )
    if s.HasField("top_p") and not (math.isfinite(s.top_p) and 0.0 < s.top_p <= 1.0):
        raise InvalidArgumentError(f"{prefix}top_p must be in (0, 1], got {s.top_p:g}")
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise InvalidArgumentError(f"{prefix}max_tokens must be >= 1, got {s.max_tokens}")
    if s.HasField("min_tokens") and s.HasField("max_tokens") and s.min_tokens > s.max_tokens:
        raise InvalidArgumentError(
            f"{prefix}min_tokens ({s.min_tokens}) must not exceed max_tokens ({s.max_tokens})"
        )
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgumentError(
            f"{prefix}stop: at most {MAX_STOP_STRINGS} strings, got {len(s.stop)}"
        )
    for i, stop in enumerate(s.stop):
        if not stop:
            raise InvalidArgumentError(f"{prefix}stop[{i}] must not be empty")
    _check_ids(s.stop_token_ids, vocab_size, prefix + "stop_token_ids")
    for name in ("presence_penalty", "frequency_penalty"):
        if s.HasField(name):  # type: ignore[arg-type]
            value = getattr(s, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise InvalidArgumentError(
                    f"{prefix}{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value:g}"
                )
    if s.HasField("repetition_penalty") and not (
        math.isfinite(s.repetition_penalty) and 0.0 < s.repetition_penalty <= MAX_PENALTY
    ):
        raise InvalidArgumentError(
            f"{prefix}repetition_penalty must be in (0, {MAX_PENALTY:g}], "
            f"got {s.repetition_penalty:g}"
        )
    for name in ("logprobs", "prompt_logprobs"):
        if s.HasField(name) and getattr(s, name) > MAX_TOP_LOGPROBS:  # type: ignore[arg-type]
            raise InvalidArgumentError(
                f"{prefix}{name} must be in [0, {MAX_TOP_LOGPROBS}], got {getattr(s, name)}"
            )
    k = s.num_speculative_tokens
    if s.HasField("num_speculative_tokens") and k > MAX_SPECULATIVE_TOKENS:
        raise InvalidArgumentError(
            f"{prefix}num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}"
        )


def _check_ids(ids: Sequence[int], vocab_size: int, name: str) -> None:
    if not ids or max(ids) < vocab_size:  # the common case in one C loop; prompts can be long
        return
    for i, token in enumerate(ids):
        if token >= vocab_size:
            raise InvalidArgumentError(f"{name}[{i}]={token} is >= vocab size {vocab_size}")


def check_label(value: str, name: str) -> None:
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgumentError(
            f"{name} must be at most {MAX_ID_CHARS} characters, got {len(value)}"
        )
