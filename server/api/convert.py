"""Protobuf ↔ internal dataclasses. Nothing here holds state or policy."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from google.protobuf.duration_pb2 import Duration

from backfill.v1 import inference_pb2 as pb
from engine_builder.tokenizer import EngineTokenizer
from server.api.validation import (
    InvalidArgumentError,
    check_duration,
    validate_generate,
    validate_prompt_length,
)
from server.executor.base import Capacity, SamplingParams, TokenLogprob
from server.scheduler.types import (
    Outcome,
    SchedEvent,
    SchedRequest,
    Tier,
    Timing,
    Usage,
)

if TYPE_CHECKING:
    from server.api.models import ModelSpec

DEFAULT_MAX_TOKENS = 256
# Prompts with more text than this are tokenized on the tokenizer pool, not on the event loop
# that every stream shares; shorter ones take microseconds, less than the hand-off would.
POOL_PROMPT_CHARS = 4096
TOKENIZER_THREADS = 2

_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
_TIERS = {
    pb.TIER_UNSPECIFIED: Tier.ONLINE,
    pb.TIER_ONLINE: Tier.ONLINE,
    pb.TIER_OFFLINE: Tier.OFFLINE,
}
_FINISH = {
    Outcome.STOP: pb.FINISH_REASON_STOP,
    Outcome.LENGTH: pb.FINISH_REASON_LENGTH,
    Outcome.CANCELLED: pb.FINISH_REASON_CANCELLED,
    Outcome.DEADLINE: pb.FINISH_REASON_DEADLINE,
    Outcome.ERROR: pb.FINISH_REASON_ERROR,
    Outcome.SHUTDOWN: pb.FINISH_REASON_CANCELLED,
}
TIER_TO_PB = {Tier.ONLINE: pb.TIER_ONLINE, Tier.OFFLINE: pb.TIER_OFFLINE}


# ---- requests ----------------------------------------------------------------------------------


def to_sched_request(
    req: pb.GenerateRequest,
    model: ModelSpec,
    *,
    force_offline: bool = False,
    prefix: str = "",
    now: float | None = None,
    tenant: str | None = None,
    weight: float = 1.0,
) -> SchedRequest:
    """Validates, tokenizes and converts one request, on the calling thread. ``force_offline``
    (batch jobs) forces the OFFLINE tier and ignores the TTFT deadline; ``tenant`` (default:
    the request's own field) and ``weight`` are who it runs for and that tenant's fair share.
    Raises InvalidArgumentError naming the field."""
    cap = model.capacity
    validate_generate(req, vocab_size=cap.vocab_size, max_seq_len=cap.max_seq_len, prefix=prefix)
    prompt = prompt_token_ids(req, model.tokenizer, prefix)
    return _build(req, model, prompt, force_offline, prefix, now,
                  req.tenant if tenant is None else tenant, weight)


async def to_sched_request_async(
    req: pb.GenerateRequest,
    model: ModelSpec,
    *,
    prefix: str = "",
    tenant: str,
    weight: float = 1.0,
) -> SchedRequest:
    """``to_sched_request`` for the event loop: every check runs first, on the loop (a prompt
    over its size bound is refused before any tokenizing), and a long prompt is tokenized on
    the tokenizer pool, with the GIL released, so other streams and health checks go on."""
    cap = model.capacity
    validate_generate(req, vocab_size=cap.vocab_size, max_seq_len=cap.max_seq_len, prefix=prefix)
    now = time.monotonic()
    if not needs_tokenizer_pool(req):
        prompt = prompt_token_ids(req, model.tokenizer, prefix)
    else:
        prompt = await asyncio.get_running_loop().run_in_executor(
            _tokenizer_pool(), prompt_token_ids, req, model.tokenizer, prefix
        )
    return _build(req, model, prompt, False, prefix, now, tenant, weight)


def _build(
    req: pb.GenerateRequest,
    model: ModelSpec,
    prompt: list[int],
    force_offline: bool,
    prefix: str,
    now: float | None,
    tenant: str,
    weight: float,
) -> SchedRequest:
    cap = model.capacity
    validate_prompt_length(len(prompt), max_seq_len=cap.max_seq_len, prefix=prefix)
    sampling = to_sampling(req.sampling, room=cap.max_seq_len - len(prompt), prefix=prefix)
    check_speculation(sampling, cap, prefix)
    tier = Tier.OFFLINE if force_offline else _TIERS[req.tier]
    deadline = None
    if req.HasField("ttft_deadline") and not force_offline:
        start = time.monotonic() if now is None else now
        deadline = start + check_duration(req.ttft_deadline, prefix + "ttft_deadline", math.inf)
    return SchedRequest(
        prompt_token_ids=tuple(prompt),
        sampling=sampling,
        tier=tier,
        ttft_deadline=deadline,
        tenant=tenant,
        weight=weight,
    )


def needs_tokenizer_pool(req: pb.GenerateRequest) -> bool:
    """Whether the request's prompt is text long enough to tokenize off the event loop."""
    which = req.WhichOneof("prompt")
    if which == "text":
        return len(req.text) >= POOL_PROMPT_CHARS
    if which == "chat":
        return sum(len(m.content) for m in req.chat.messages) >= POOL_PROMPT_CHARS
    return False


_POOL: ThreadPoolExecutor | None = None


def _tokenizer_pool() -> ThreadPoolExecutor:
    """The process's tokenizer threads (made on first use; daemon-like, never shut down)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
    return _POOL


def check_speculation(sampling: SamplingParams, cap: Capacity, prefix: str = "") -> None:
    """A request may ask for at most the executor's max draft length."""
    k = sampling.num_speculative_tokens
    if k and k > cap.max_draft_len:
        how = (f"at most {cap.max_draft_len} on this model ({cap.drafter} drafter)"
               if cap.max_draft_len else "0 on this model (it takes no per-request speculation)")
        raise InvalidArgumentError(
            f"{prefix}sampling.num_speculative_tokens: {k} asked, {how}"
        )


def prompt_token_ids(req: pb.GenerateRequest, tokenizer: EngineTokenizer, prefix: str) -> list[int]:
    which = req.WhichOneof("prompt")
    if which == "token_ids":
        return list(req.token_ids.ids)
    if which == "text":
        return tokenizer.encode(req.text)
    if not tokenizer.has_chat_template:
        raise InvalidArgumentError(f"{prefix}chat: this model has no chat template; send text")
    messages = [{"role": _ROLES[m.role], "content": m.content} for m in req.chat.messages]
    add_generation_prompt = (
        req.chat.add_generation_prompt if req.chat.HasField("add_generation_prompt") else True
    )
    return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)


def to_sampling(s: pb.SamplingParams, *, room: int, prefix: str = "") -> SamplingParams:
    """Unset fields take the defaults; max_tokens is capped by what the sequence has room for."""
    max_tokens = min(s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS, room)
    min_tokens = s.min_tokens if s.HasField("min_tokens") else 0
    if min_tokens > max_tokens:
        raise InvalidArgumentError(
            f"{prefix}sampling.min_tokens ({min_tokens}) exceeds the {max_tokens} tokens "
            "this request can generate"
        )
    return SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos if s.HasField("ignore_eos") else False,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        num_speculative_tokens=(
            s.num_speculative_tokens if s.HasField("num_speculative_tokens") else None
        ),
    )


# ---- responses ---------------------------------------------------------------------------------


def to_generate_response(
    event: SchedEvent, *, client_request_id: str, model: str = "", index: int = 0
) -> pb.GenerateResponse:
    """One chunk; ``model`` is set by the caller on the first chunk only."""
    out = pb.GenerateResponse()
    fill_generate_response(
        out, event, client_request_id=client_request_id, model=model, index=index
    )
    return out


def fill_generate_response(
    out: pb.GenerateResponse,
    event: SchedEvent,
    *,
    client_request_id: str,
    model: str = "",
    index: int = 0,
) -> None:
    """Writes one chunk into ``out`` (an empty message, e.g. a SessionResponse's chunk).

    Filling sub-messages in place rather than building and copying them (``CopyFrom``,
    ``Duration`` objects) makes a final chunk about 3x cheaper: this runs once per message
    the server sends, on the event loop that every request shares.
    """
    if event.token_ids:
        out.token_ids.extend(event.token_ids)
    if event.text:
        out.text = event.text
    if model:
        out.model = model
    if client_request_id:
        out.client_request_id = client_request_id
    if event.outcome is not None:
        out.finish_reason = _FINISH[event.outcome]
    if event.usage is not None:
        fill_usage(out.usage, event.usage)
    if event.timing is not None:
        fill_timing(out.timing, event.timing)
    if index:
        out.index = index
    if event.logprobs:
        fill_logprobs(out.logprobs, event.logprobs)
    if event.prompt_logprobs is not None:
        fill_logprobs(out.prompt_logprobs, event.prompt_logprobs)


def fill_logprobs(out: Any, logprobs: list[TokenLogprob]) -> None:
    """Appends to a repeated TokenLogprob field."""
    for lp in logprobs:
        item = out.add(token_id=lp.token_id, logprob=lp.logprob)
        for token_id, logprob in lp.top:
            item.top.add(token_id=token_id, logprob=logprob)


def fill_usage(out: pb.Usage, u: Usage) -> None:
    out.prompt_tokens = u.prompt_tokens
    out.completion_tokens = u.completion_tokens
    out.cached_prompt_tokens = u.cached_prompt_tokens
    out.draft_tokens_proposed = u.draft_tokens_proposed
    out.draft_tokens_accepted = u.draft_tokens_accepted
    if u.speculative_steps:
        out.speculative_steps = u.speculative_steps
        out.draft_acceptance_rate = u.draft_acceptance_rate
        out.mean_accepted_length = u.mean_accepted_length
    if u.drafter:
        out.drafter = u.drafter


def fill_timing(out: pb.Timing, t: Timing) -> None:
    # Writing a field marks each sub-message present, zero values included (as CopyFrom did).
    out.queue_time.FromNanoseconds(round(t.queue_seconds * 1e9))
    out.total_time.FromNanoseconds(round(t.total_seconds * 1e9))
    out.preemptions = t.preemptions
    if t.ttft_seconds is not None:
        out.ttft.FromNanoseconds(round(t.ttft_seconds * 1e9))


def to_pb_usage(u: Usage) -> pb.Usage:
    out = pb.Usage()
    fill_usage(out, u)
    return out


def to_pb_timing(t: Timing) -> pb.Timing:
    out = pb.Timing(
        queue_time=seconds_to_duration(t.queue_seconds),
        total_time=seconds_to_duration(t.total_seconds),
        preemptions=t.preemptions,
    )
    if t.ttft_seconds is not None:
        out.ttft.CopyFrom(seconds_to_duration(t.ttft_seconds))
    return out


def seconds_to_duration(seconds: float) -> Duration:
    out = Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def finish_reason(outcome: Outcome) -> pb.FinishReason.ValueType:
    return _FINISH[outcome]
