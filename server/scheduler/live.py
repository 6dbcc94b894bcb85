"""Per-request state as the scheduler tracks it (a LiveRequest), and the events built from it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from server.executor.base import ExecRequest, FinishReason, TokenDelta
from server.scheduler.types import (
    EventSink,
    Outcome,
    SchedEvent,
    SchedRequest,
    Tier,
    Timing,
    Usage,
)

# How an executor finish maps to an outcome; CANCELLED becomes SHUTDOWN while stopping.
OUTCOME_OF: dict[FinishReason, Outcome] = {
    FinishReason.STOP: Outcome.STOP,
    FinishReason.LENGTH: Outcome.LENGTH,
    FinishReason.CANCELLED: Outcome.CANCELLED,
    FinishReason.ERROR: Outcome.ERROR,
}


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting in a tier queue (new, or preempted and waiting to resume)
    RUNNING = "running"  # enqueued in the executor under ``exec_id``
    FINISHED = "finished"  # its final event was emitted


@dataclass(slots=True, eq=False)
class LiveRequest:
    """One request's life in the scheduler. Owned by the scheduler thread after submit.

    Invariants: ``tokens`` is exactly what the sink has received, in order, across all runs
    (a preempted run resumes from it, so the stream has no gap or repeat); ``exec_id`` is set
    if and only if the phase is RUNNING; the final event is emitted once, when FINISHED is set.
    """

    id: int
    request: SchedRequest
    sink: EventSink
    arrival: float  # the scheduler's clock at submit
    phase: Phase = Phase.QUEUED
    tokens: list[int] = field(default_factory=list)
    exec_id: int | None = None
    admitted_at: float | None = None  # first admission (queue time ends here)
    first_token_at: float | None = None
    preemptions: int = 0
    cancel_requested: bool = False
    # False from each (re)start until the run's first delta: until then the executor may not
    # have allocated its KV blocks yet, so its stats do not show them as used.
    run_reported: bool = False
    run_tokens: int = 0  # tokens the current run streamed: 0 while it is in prefill
    cached_prompt_tokens: int | None = None  # reported by the first run
    draft_proposed: int = 0
    draft_accepted: int = 0
    speculative_steps: int = 0
    drafter: str | None = None

    @property
    def tier(self) -> Tier:
        return self.request.tier

    @property
    def num_context_tokens(self) -> int:
        """Prompt plus tokens produced so far: what a resumed run starts from."""
        return len(self.request.prompt_token_ids) + len(self.tokens)

    def count_drafts(self, delta: TokenDelta) -> None:
        """Speculative decoding's counts of one delta, added to the request's (all runs)."""
        self.draft_proposed += delta.draft_tokens_proposed
        self.draft_accepted += delta.draft_tokens_accepted
        self.speculative_steps += delta.speculative_steps
        self.drafter = delta.drafter or self.drafter

    def time_per_output_token(self, now: float) -> float | None:
        """Mean seconds between this request's tokens after the first (None below two)."""
        if self.first_token_at is None or len(self.tokens) < 2:
            return None
        return (now - self.first_token_at) / (len(self.tokens) - 1)

    def exec_request(self, exec_id: int, priority: float, overtake: bool) -> ExecRequest:
        """The executor request of the next run; resumes after the tokens already streamed."""
        return ExecRequest(
            request_id=exec_id,
            prompt_token_ids=self.request.prompt_token_ids,
            sampling=self.request.sampling,
            resume_token_ids=tuple(self.tokens),
            priority=priority,
            overtake=overtake,
        )

    def token_event(self, delta: TokenDelta) -> SchedEvent:
        return SchedEvent(
            request_id=self.id,
            token_ids=delta.token_ids,
            text=delta.text,
            logprobs=delta.logprobs,
            prompt_logprobs=delta.prompt_logprobs,
        )

    def final_event(
        self,
        outcome: Outcome,
        now: float,
        token_ids: tuple[int, ...] = (),
        text: str = "",
        error: str | None = None,
        delta: TokenDelta | None = None,
    ) -> SchedEvent:
        """``delta``: the executor's last delta, whose logprobs the event carries."""
        return SchedEvent(
            request_id=self.id,
            token_ids=token_ids,
            text=text,
            outcome=outcome,
            error=error,
            usage=self._usage(),
            timing=self._timing(now),
            logprobs=None if delta is None else delta.logprobs,
            prompt_logprobs=None if delta is None else delta.prompt_logprobs,
        )

    def _usage(self) -> Usage:
        prompt_len = len(self.request.prompt_token_ids)
        return Usage(
            prompt_tokens=prompt_len,
            completion_tokens=len(self.tokens),
            cached_prompt_tokens=min(self.cached_prompt_tokens or 0, prompt_len),
            draft_tokens_proposed=self.draft_proposed,
            draft_tokens_accepted=self.draft_accepted,
            speculative_steps=self.speculative_steps,
            drafter=self.drafter,
        )

    def _timing(self, now: float) -> Timing:
        queued_until = self.admitted_at if self.admitted_at is not None else now
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        return Timing(
            queue_seconds=queued_until - self.arrival,
            ttft_seconds=ttft,
            total_seconds=now - self.arrival,
            preemptions=self.preemptions,
        )
