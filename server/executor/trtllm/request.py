"""Our boundary types -> TensorRT-LLM executor requests, and its finish reasons -> ours.

Every function takes the bindings module (``tensorrt_llm.bindings.executor``) as ``b`` so that
nothing here imports ``tensorrt_llm``; tests pass a fake with the same names.

Stop handling is split on purpose:
- stop *ids* (``stop_token_ids`` and any EOS ids after the first) go to the engine as
  single-token ``stop_words``: it stops in the same iteration and frees the slot at once;
- stop *strings* are matched on our side after detokenization (``stream``): a string
  has many tokenizations ("\\n\\n" is one token or two), so token-sequence stop words would
  miss some, and our match also cuts the text exactly before the stop string.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, FinishReason, SamplingParams

# No end token: what TensorRT-LLM's own LLM API sends for ignore_eos
# (tensorrt_llm/executor/worker.py: ``end_id=-1 if sampling_params.ignore_eos``).
NO_END_ID = -1


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """End/pad ids and engine bounds a request is checked and mapped against."""

    eos_token_ids: tuple[int, ...]  # the first is the engine's end_id
    vocab_size: int
    max_seq_len: int

    @property
    def end_id(self) -> int:
        return self.eos_token_ids[0]


def token_policy(manifest: Manifest) -> TokenPolicy:
    return TokenPolicy(eos_token_ids=manifest.tokenizer.eos_token_ids,
                       vocab_size=manifest.architecture.vocab_size,
                       max_seq_len=manifest.limits.max_seq_len)


@dataclass(frozen=True, slots=True)
class Remaining:
    """What is left of a request after the tokens it already has (resumed or generated)."""

    context: tuple[int, ...]  # prompt + tokens so far: the engine's input
    max_tokens: int  # tokens still allowed
    min_tokens: int  # tokens still required before EOS/stop ids count


def remaining(request: ExecRequest, generated: tuple[int, ...] = ()) -> Remaining:
    """The request's state after resume tokens and ``generated`` (draft-target steps)."""
    done = request.resume_token_ids + generated
    p = request.sampling
    return Remaining(context=request.prompt_token_ids + done,
                     max_tokens=p.max_tokens - len(done),
                     min_tokens=max(0, p.min_tokens - len(done)))


def validate(request: ExecRequest, policy: TokenPolicy) -> None:
    """ValueError for a request the engine cannot run (the protocol's enqueue contract)."""
    if not request.prompt_token_ids:
        raise ValueError(f"request {request.request_id}: empty prompt")
    context = request.prompt_token_ids + request.resume_token_ids
    bad = [t for t in context if not 0 <= t < policy.vocab_size]
    if bad:
        raise ValueError(f"request {request.request_id}: token id {bad[0]} is outside the "
                         f"vocabulary (size {policy.vocab_size})")
    if len(context) >= policy.max_seq_len:
        raise ValueError(f"request {request.request_id}: {len(context)} context tokens leave no "
                         f"room in max_seq_len {policy.max_seq_len}")
    if len(request.resume_token_ids) >= request.sampling.max_tokens:
        raise ValueError(f"request {request.request_id}: resume tokens already reach max_tokens")
    # OutputConfig(return_log_probs) gives the chosen tokens' logprobs only, and
    # return_context_logits the prompt's whole logits: no top alternatives per position.
    # Refused by name rather than answered without them.
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(request.sampling, name) is not None:
            raise ValueError(f"sampling.{name}: not supported by the TensorRT-LLM executor")


def sampling_config(b: Any, params: SamplingParams, min_tokens: int, *,
                    seed: int | None = None) -> Any:
    """SamplingConfig for one request, every sampling knob explicit.

    Unset, TensorRT-LLM takes topK=0 and topP=0.0 (``layers/defaultDecodingParams.h``) and its
    sampling layers turn k=0, p=0 into k=1 (``regularizeTopKTopP``): a request with only a
    temperature would decode greedily. So sampling sends top_k=0 (off) and top_p=1.0 (off)
    as values, and greedy is top_k=1. Unset, the seed is 0 for every request, so each request
    gets one of its own (``seed`` overrides, for draft-target steps of one sequence).
    """
    greedy = params.temperature == 0.0
    if seed is None:
        seed = params.seed if params.seed is not None else random.getrandbits(63)
    return b.SamplingConfig(
        1,
        top_k=1 if greedy else params.top_k,
        top_p=None if greedy else params.top_p,
        temperature=None if greedy else params.temperature,
        seed=seed,
        min_tokens=min_tokens or None,
        # SamplingConfig's penalties: the same semantics as the CPU engine's (repetition over
        # prompt and output; presence and frequency over the output).
        repetition_penalty=None if params.repetition_penalty == 1.0 else params.repetition_penalty,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def stop_words(params: SamplingParams, policy: TokenPolicy) -> list[list[int]] | None:
    """Single-token stop sequences: stop ids, plus the EOS ids the engine's end_id misses."""
    extra_eos = () if params.ignore_eos else policy.eos_token_ids[1:]
    ids = dict.fromkeys((*params.stop_token_ids, *extra_eos))  # ordered, deduplicated
    return [[i] for i in ids] or None


def build_request(b: Any, request: ExecRequest, left: Remaining, policy: TokenPolicy, *,
                  streaming: bool, max_tokens: int | None = None,
                  draft_tokens: tuple[int, ...] | None = None,
                  sampling: Any = None) -> Any:
    """A ``Request``: input = context, output excludes the input, perf metrics on (for the
    per-request KV reuse count), priority passed through (constructor-only in the bindings)."""
    params = request.sampling
    draft_config = None
    if draft_tokens:
        draft_config = b.ExternalDraftTokensConfig(list(draft_tokens))
    return b.Request(
        list(left.context),
        max_tokens if max_tokens is not None else left.max_tokens,
        streaming=streaming,
        sampling_config=sampling or sampling_config(b, params, left.min_tokens),
        output_config=b.OutputConfig(exclude_input_from_output=True, return_perf_metrics=True),
        end_id=NO_END_ID if params.ignore_eos else policy.end_id,
        # No pad token in the manifest; the end id is the usual stand-in and never surfaces.
        pad_id=policy.end_id,
        stop_words=stop_words(params, policy),
        external_draft_tokens_config=draft_config,
        priority=min(1.0, max(0.0, request.priority)),
    )


def finish_reason(b: Any, reason: Any) -> tuple[FinishReason, str | None]:
    """Our finish for the engine's final reason (and an error text where it is one)."""
    fr = b.FinishReason
    if reason in (fr.END_ID, fr.STOP_WORDS):
        return FinishReason.STOP, None
    if reason == fr.LENGTH:
        return FinishReason.LENGTH, None
    if reason == fr.CANCELLED:
        return FinishReason.CANCELLED, None
    if reason == fr.TIMED_OUT:
        return FinishReason.ERROR, "the engine timed the request out"
    return FinishReason.ERROR, f"final response without a finish reason ({reason})"


def reused_tokens(result: Any, tokens_per_block: int) -> int | None:
    """Prompt tokens served from reused KV blocks, when the engine reported perf metrics."""
    metrics = getattr(result, "request_perf_metrics", None)
    if metrics is None:
        return None
    return int(metrics.kv_cache_metrics.num_reused_blocks) * tokens_per_block
