"""The executor protocol: the seam between scheduling and compute.

Shaped like TensorRT-LLM's ``bindings.executor.Executor`` so that the GPU adapter stays thin:
``enqueue`` / ``cancel`` / ``poll`` / ``stats`` / ``capacity`` / ``shutdown``. Executors know
nothing about tiers: the scheduler decides what runs, an executor runs what it is given,
as fast as it can, and reports token deltas and finishes.

Preemption by recompute is expressed with ``ExecRequest.resume_token_ids``: the scheduler
cancels a running sequence and later enqueues it again with the tokens it already produced.
The executor treats them as context (found in the prefix cache) but counts them as already
generated, so max/min tokens, stop strings and detokenization continue the same stream
without a gap or a repeat.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from engine_builder.step_cost import StepSample


class FinishReason(enum.Enum):
    """Why a sequence stopped (mirrors TensorRT-LLM's FinishReason plus ERROR)."""

    STOP = "stop"  # end-of-sequence token, a stop id or a stop string
    LENGTH = "length"  # max_tokens or the engine's max sequence length
    CANCELLED = "cancelled"  # cancel() was called
    ERROR = "error"  # the engine failed this request; ``TokenDelta.error`` says why


MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (vLLM's default cap)
MAX_SPECULATIVE_TOKENS = 16  # drafted tokens a request may ask to verify per step


# Not frozen: made per request on the serving path, where frozen __init__ cost ~7x (see
# TokenDelta). Treat as immutable.
@dataclass(slots=True)
class SamplingParams:
    """How one request picks its tokens. Validated at construction (ValueError)."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = None  # None: the executor draws one
    max_tokens: int = 256  # generated tokens, resumed ones included
    min_tokens: int = 0  # EOS and stops are ignored before this many tokens
    stop: tuple[str, ...] = ()  # output ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()  # output ends at such a token (not emitted as text)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from each token the output holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides (multiplies if < 0) logits of prompt+output ids
    logprobs: int | None = None  # top alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # the same for prompt tokens after the first
    # Speculative decoding: drafted tokens verified per step, at most (0: none). None leaves
    # it to the server's policy. The output is the same either way (greedy: token for token;
    # sampled: the same distribution, and the same tokens for a given seed with the n-gram
    # drafter); it changes only how many tokens a step yields.
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
        k = self.num_speculative_tokens
        if k is not None and not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}"
            )

    @property
    def penalized(self) -> bool:
        """Any penalty changes the logits (the sampler skips the work otherwise)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


# Not frozen: made per request on the serving path, where frozen __init__ cost ~7x (see
# TokenDelta). Treat as immutable.
@dataclass(slots=True)
class ExecRequest:
    """One sequence to run. ``request_id`` is chosen by the caller and unique among live ones."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Tokens this request already generated before a preemption; see the module docstring.
    resume_token_ids: tuple[int, ...] = ()
    # Float in [0, 1], higher first (TensorRT-LLM's Request.priority). The scheduler sets it
    # from the tier; engines order their own queue by it.
    priority: float = 0.5
    # The scheduler's word that this request's prefill should not wait for the step in
    # flight: an executor that can (the CPU one) runs it between that step's layers and
    # streams its first token before the step ends. Others ignore it.
    overtake: bool = False


# Not frozen: one per generated token of the requests that ask (see TokenDelta).
@dataclass(slots=True)
class TokenLogprob:
    """A token's log-probability under the model, with the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


# Not frozen, on purpose: one is made per request per step, and a frozen dataclass's __init__
# (object.__setattr__ per field) took 1.8 us against 0.27 us here. Treat it as immutable.
@dataclass(slots=True)
class TokenDelta:
    """New output of one request since the last poll; ``finish`` set on its last delta."""

    request_id: int
    token_ids: tuple[int, ...]  # new tokens (a stop token id is included here, not in text)
    text: str  # new text; never splits a UTF-8 character; stop strings cut out
    finish: FinishReason | None = None
    error: str | None = None  # set with FinishReason.ERROR
    # Set on the first delta of a run (0 when nothing was cached) and on the last delta.
    cached_prompt_tokens: int | None = None
    draft_tokens_proposed: int = 0  # speculative decoding, counted per delta
    draft_tokens_accepted: int = 0
    speculative_steps: int = 0  # steps that verified at least one drafted token of it
    drafter: str | None = None  # the drafter that proposed them (DrafterStats.drafter)
    # One per token_ids entry when the request asked for logprobs; None otherwise.
    logprobs: list[TokenLogprob] | None = None
    # Prompt tokens after the first, when asked for: on the delta of the first generated token.
    prompt_logprobs: list[TokenLogprob] | None = None

    def then(self, later: TokenDelta) -> TokenDelta:
        """This delta and the next one of the same request, as one (for an outbox that
        coalesces what a slow reader has not taken yet)."""
        cached = self.cached_prompt_tokens
        return TokenDelta(
            request_id=self.request_id,
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            finish=later.finish,
            error=later.error,
            cached_prompt_tokens=cached if later.cached_prompt_tokens is None
            else later.cached_prompt_tokens,
            draft_tokens_proposed=self.draft_tokens_proposed + later.draft_tokens_proposed,
            draft_tokens_accepted=self.draft_tokens_accepted + later.draft_tokens_accepted,
            speculative_steps=self.speculative_steps + later.speculative_steps,
            drafter=later.drafter or self.drafter,
            logprobs=_concat(self.logprobs, later.logprobs),
            prompt_logprobs=_concat(self.prompt_logprobs, later.prompt_logprobs),
        )


def _concat(
    a: list[TokenLogprob] | None, b: list[TokenLogprob] | None
) -> list[TokenLogprob] | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the engine can hold; the scheduler admits against it."""

    max_slots: int  # sequences in one batch
    num_kv_blocks: int  # KV-cache blocks in the pool
    tokens_per_block: int
    max_tokens_per_step: int  # prefill + decode tokens in one iteration
    max_seq_len: int  # prompt + generated tokens of one sequence
    vocab_size: int
    # Drafted tokens a sequence may verify per step when the scheduler asks (StepPlan); 0: the
    # executor takes no speculation from plans (it may still speculate on its own, as
    # TensorRT-LLM's drafters do).
    max_draft_len: int = 0
    drafter: str | None = None  # the drafter plans speculate with ("ngram", "draft")

    def blocks_for(self, num_tokens: int) -> int:
        """KV blocks a sequence of num_tokens needs."""
        return -(-num_tokens // self.tokens_per_block)


@dataclass(frozen=True, slots=True)
class DrafterStats:
    """Speculative decoding by one drafter, cumulative since start."""

    drafter: str  # "ngram" (prompt lookup) or "draft" (a draft model)
    proposed: int  # drafted tokens verified by the target
    accepted: int  # of which the target accepted
    steps: int  # sequence steps that verified a draft (one per sequence per step)
    seconds: float  # spent drafting, outside the target's steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Drafted tokens accepted per verifying step (the step's own token not counted)."""
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def seconds_per_token(self) -> float:
        """Drafting time per proposed token (0 before any)."""
        return self.seconds / self.proposed if self.proposed else 0.0


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """A snapshot; counters are cumulative since start."""

    active: int  # sequences holding a slot
    queued: int  # enqueued, not yet holding a slot
    kv_blocks_total: int
    kv_blocks_used: int  # referenced by a live sequence
    kv_blocks_free: int  # neither used nor cached
    kv_blocks_cached: int  # unreferenced, kept for prefix reuse (evictable)
    steps: int  # iterations run
    last_step_latency_s: float
    last_step_tokens: int  # tokens computed in the last iteration (prefill + decode)
    prompt_tokens: int  # prompt tokens seen
    cached_prompt_tokens: int  # of which served from the prefix cache
    generated_tokens: int
    busy_seconds: float = 0.0  # wall time spent inside steps
    context_requests: int = 0  # sequences still in prefill (Triton's "context" requests)
    preemptions: int = 0  # sequences the executor itself pushed back for lack of KV blocks
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    drafters: tuple[DrafterStats, ...] = ()  # per drafter, for executors that report it


@runtime_checkable
class Executor(Protocol):
    """What the scheduler drives. Thread-safe: enqueue/cancel/poll may come from any thread."""

    @property
    def capacity(self) -> Capacity: ...

    def enqueue(self, request: ExecRequest) -> None:
        """Queues a sequence. Raises ValueError for a request the engine cannot run
        (empty prompt, prompt too long, token id out of vocabulary, an id that is still live)
        and after shutdown. A request whose resumed tokens already reach its max_tokens never
        emits a token (refused, or ended at once with LENGTH). An id is free again once its
        final delta is out."""

    def cancel(self, request_id: int) -> None:
        """Stops a queued or running sequence and frees its slot and KV blocks; it ends with
        a final delta carrying FinishReason.CANCELLED. Unknown or finished ids are a no-op."""

    def poll(self, timeout: float) -> list[TokenDelta]:
        """Deltas ready now, waiting up to timeout seconds for at least one."""

    def stats(self) -> ExecutorStats: ...

    def shutdown(self) -> None:
        """Stops the loop; live sequences end with CANCELLED (their final deltas still come
        from poll). Idempotent; cancel and stats stay harmless afterwards."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Standing per-sequence limits that a scheduler hands an executor: at most
    ``token_caps[id]`` tokens of request ``id`` in any one step, until the next plan replaces
    this one. A cap of 0 pauses the sequence: it keeps its slot and KV blocks (nothing to
    recompute) but sits steps out. Requests not listed are not limited. ``draft_lens[id]``:
    drafted tokens request ``id`` verifies per step, at most, while it decodes (speculative
    decoding; within its cap, which then counts the drafted tokens too); not listed: none.
    ``overtake_interval_s``: a sequence whose prefill overtook the step in flight (see
    ``ExecRequest.overtake``) gets its next tokens from steps nested in that one whenever its
    last token is this old; None: it waits for the step to end. The plan is data; the
    executor applies it mechanically and never decides what is more important."""

    token_caps: Mapping[int, int] = field(default_factory=dict)
    draft_lens: Mapping[int, int] = field(default_factory=dict)
    overtake_interval_s: float | None = None

    def cap(self, request_id: int) -> int | None:
        return self.token_caps.get(request_id)

    def draft_len(self, request_id: int) -> int:
        return self.draft_lens.get(request_id, 0)

    @property
    def paused(self) -> int:
        return sum(1 for cap in self.token_caps.values() if cap == 0)


def check_fits(request: ExecRequest, capacity: Capacity) -> None:
    """ValueError unless an engine of ``capacity`` can run the request: a prompt, and a
    context (prompt and resumed tokens) that leaves room to generate and that the KV pool
    holds."""
    if not request.prompt_token_ids:
        raise ValueError("empty prompt")
    context = len(request.prompt_token_ids) + len(request.resume_token_ids)
    if context + 1 > capacity.max_seq_len:
        raise ValueError(
            f"prompt of {context} tokens leaves no room to generate "
            f"(max_seq_len {capacity.max_seq_len})"
        )
    if capacity.blocks_for(context + 1) > capacity.num_kv_blocks:
        raise ValueError(f"prompt of {context} tokens exceeds the KV-cache pool")


@runtime_checkable
class PlanFollower(Protocol):
    """An executor that takes step plans (the CPU executor). Others (TensorRT-LLM) plan their
    own steps; the scheduler then controls them by admission alone."""

    def set_plan(self, plan: StepPlan) -> None:
        """Applies from the next step on. Thread-safe."""


@runtime_checkable
class StepReporter(Protocol):
    """An executor that reports what each step carried and how long it took, so the step-cost
    model can correct itself while the server runs."""

    def take_step_samples(self) -> list[StepSample]:
        """Steps finished since the last call, oldest first. Thread-safe."""
