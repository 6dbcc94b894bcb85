"""Checks of every field of a request, before anything is tokenized or queued.

Each failure raises ``InvalidArgumentError`` whose message names the offending field the way the
proto spells it (``sampling.top_p must be in (0, 1], got 1.5``), so a client can fix its request
from the status message alone. Batch requests prefix the field with ``requests[i].``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from google.protobuf.duration_pb2 import Duration

from backfill.v1 import inference_pb2 as pb
from server.executor.base import MAX_SPECULATIVE_TOKENS, MAX_TOP_LOGPROBS

MAX_TEMPERATURE = 100.0
MAX_ID_CHARS = 256  # client_request_id, tenant, model, job ids, keys: ids, not payloads
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # one stop string
MAX_STOP_TOKEN_IDS = 256
MAX_CHAT_MESSAGES = 4096
MAX_BATCH_REQUESTS = 100_000
MAX_CHOICES = 64  # GenerateRequest.n: each choice holds a batch slot
MAX_PENALTY = 2.0
MAX_TTFT_DEADLINE_S = 24 * 3600
# A prompt's text may hold at most this many UTF-8 bytes per token of the model's
# max_seq_len: checked before tokenizing, so an oversized prompt costs nothing. Byte-level BPE
# tokens average 3-5 bytes of text; a prompt past 32 per token could not fit anyway.
MAX_PROMPT_BYTES_PER_TOKEN = 32
# A job's labels (OpenAI's metadata limits): they are returned with every job, so a listing
# of a full page stays far below gRPC's default 4 MiB message limit.
MAX_LABELS = 16
MAX_LABEL_KEY_CHARS = 64
MAX_LABEL_VALUE_CHARS = 512
# Labels a surface adds for itself (the HTTP surface's endpoint and input file of a batch).
SURFACE_LABELS = 2
_PROMPT_FIELDS = "text, chat, token_ids"
# Built once: ``EnumTypeWrapper.values()`` makes a new list on every call (once per request).
_TIERS = frozenset(pb.Tier.values())
_ROLES = frozenset(pb.Role.values()) - {pb.ROLE_UNSPECIFIED}


class InvalidArgumentError(ValueError):
    """A request field is invalid; the service answers INVALID_ARGUMENT with this message."""


def validate_generate(
    req: pb.GenerateRequest, *, vocab_size: int, max_seq_len: int, prefix: str = ""
) -> None:
    """Every field of one GenerateRequest that can be checked without the tokenizer."""
    _check_prompt(req, vocab_size, max_seq_len, prefix)
    if req.HasField("sampling"):
        _check_sampling(req.sampling, vocab_size, prefix + "sampling.")
    if req.tier not in _TIERS:
        raise InvalidArgumentError(f"{prefix}tier: unknown value {req.tier}")
    if req.HasField("ttft_deadline"):
        check_duration(req.ttft_deadline, prefix + "ttft_deadline", MAX_TTFT_DEADLINE_S)
    if req.n > MAX_CHOICES:
        raise InvalidArgumentError(f"{prefix}n must be in [1, {MAX_CHOICES}], got {req.n}")
    check_label(req.model, prefix + "model")
    check_label(req.tenant, prefix + "tenant")
    check_label(req.client_request_id, prefix + "client_request_id")


def check_duration(d: Duration, name: str, max_seconds: float) -> float:
    """A positive duration of at most max_seconds, in seconds; checked on the raw fields, so
    out-of-range values are refused instead of overflowing a conversion."""
    if not 0 <= d.nanos < 1_000_000_000 or d.seconds < 0 or (d.seconds == 0 and d.nanos == 0):
        raise InvalidArgumentError(
            f"{name} must be positive (seconds >= 0, nanos in [0, 999999999]), "
            f"got {d.seconds}s {d.nanos}ns"
        )
    seconds = d.seconds + d.nanos / 1e9
    if seconds > max_seconds:
        raise InvalidArgumentError(
            f"{name} must be at most {max_seconds:.0f} seconds, got {d.seconds}s"
        )
    return seconds


def validate_prompt_length(num_tokens: int, *, max_seq_len: int, prefix: str = "") -> None:
    """The tokenized prompt must leave room for at least one generated token."""
    if num_tokens == 0:
        raise InvalidArgumentError(f"{prefix}prompt: tokenizes to no tokens")
    if num_tokens >= max_seq_len:
        raise InvalidArgumentError(
            f"{prefix}prompt: {num_tokens} tokens leave no room to generate within the "
            f"model's max_seq_len {max_seq_len}"
        )


def validate_batch(req: pb.SubmitBatchRequest, *, vocab_size: int, max_seq_len: int) -> None:
    if not req.requests:
        raise InvalidArgumentError("requests must not be empty")
    if len(req.requests) > MAX_BATCH_REQUESTS:
        raise InvalidArgumentError(
            f"requests: at most {MAX_BATCH_REQUESTS} per job, got {len(req.requests)}"
        )
    check_label(req.tenant, "tenant")
    check_label(req.idempotency_key, "idempotency_key")
    check_labels(req.labels, "labels")
    seen: set[str] = set()
    for i, item in enumerate(req.requests):
        validate_generate(
            item, vocab_size=vocab_size, max_seq_len=max_seq_len, prefix=f"requests[{i}]."
        )
        rid = item.client_request_id
        if rid and rid in seen:
            raise InvalidArgumentError(
                f"requests[{i}].client_request_id {rid!r} is used twice in the job"
            )
        seen.add(rid)


def _check_prompt(
    req: pb.GenerateRequest, vocab_size: int, max_seq_len: int, prefix: str
) -> None:
    max_bytes = max_seq_len * MAX_PROMPT_BYTES_PER_TOKEN
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidArgumentError(f"{prefix}prompt: exactly one of {_PROMPT_FIELDS} must be set")
    if which == "text":
        if not req.text:
            raise InvalidArgumentError(f"{prefix}text must not be empty")
        _check_text_size(req.text, max_bytes, prefix + "text")
    if which == "chat":
        _check_chat(req.chat, max_bytes, prefix + "chat.")
    if which == "token_ids":
        ids = req.token_ids.ids
        if not ids:
            raise InvalidArgumentError(f"{prefix}token_ids.ids must not be empty")
        validate_prompt_length(len(ids), max_seq_len=max_seq_len, prefix=prefix)  # scan after
        _check_ids(ids, vocab_size, prefix + "token_ids.ids")


def _check_chat(chat: pb.ChatMessages, max_bytes: int, prefix: str) -> None:
    if not chat.messages:
        raise InvalidArgumentError(f"{prefix}messages must not be empty")
    if len(chat.messages) > MAX_CHAT_MESSAGES:
        raise InvalidArgumentError(
            f"{prefix}messages: at most {MAX_CHAT_MESSAGES}, got {len(chat.messages)}"
        )
    _check_text_size("".join(m.content for m in chat.messages), max_bytes,
                     prefix + "messages[].content")
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
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidArgumentError(
                f"{prefix}stop[{i}] must be at most {MAX_STOP_CHARS} characters, got {len(stop)}"
            )
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgumentError(
            f"{prefix}stop_token_ids: at most {MAX_STOP_TOKEN_IDS}, got {len(s.stop_token_ids)}"
        )
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


def _check_text_size(text: str, max_bytes: int, name: str) -> None:
    """Refuses text of more than max_bytes UTF-8 bytes; encodes it only when its length in
    characters (1 to 4 bytes each) leaves the answer open."""
    if len(text) * 4 <= max_bytes:
        return
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidArgumentError(
            f"{name}: the prompt is over {max_bytes} bytes of text ({MAX_PROMPT_BYTES_PER_TOKEN} "
            f"per token of the model's max_seq_len {max_bytes // MAX_PROMPT_BYTES_PER_TOKEN})"
        )


def check_label(value: str, name: str) -> None:
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgumentError(
            f"{name} must be at most {MAX_ID_CHARS} characters, got {len(value)}"
        )


def check_labels(labels: Mapping[str, str], name: str, surface_labels: int = 0) -> None:
    """A job's labels: at most MAX_LABELS pairs (plus ``surface_labels`` a surface adds for
    itself), keys and values of bounded length."""
    if len(labels) > MAX_LABELS + surface_labels:
        raise InvalidArgumentError(f"{name}: at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not 0 < len(key) <= MAX_LABEL_KEY_CHARS:
            raise InvalidArgumentError(
                f"{name}: a key must have 1 to {MAX_LABEL_KEY_CHARS} characters, got {len(key)}"
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgumentError(
                f"{name}[{key!r}] must be at most {MAX_LABEL_VALUE_CHARS} characters, "
                f"got {len(value)}"
            )
