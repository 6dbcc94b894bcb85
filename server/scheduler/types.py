"""Boundary types of the backfill scheduler: what the service submits and what it gets back.

The scheduler never imports gRPC; the service converts these to and from protobuf.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.executor.base import SamplingParams, TokenLogprob


class Tier(enum.Enum):
    """Service class. ONLINE has a latency objective; OFFLINE fills what is left."""

    ONLINE = "online"
    OFFLINE = "offline"


class Outcome(enum.Enum):
    """How a request ended; exactly one final event carries it."""

    STOP = "stop"  # EOS, stop id or stop string
    LENGTH = "length"  # max_tokens or max sequence length
    CANCELLED = "cancelled"  # cancelled by the client (or its stream broke)
    DEADLINE = "deadline"  # TTFT deadline passed before it was admitted
    ERROR = "error"  # the executor failed it; ``SchedEvent.error`` says why
    SHUTDOWN = "shutdown"  # the server stopped before it finished (drain)


# Not frozen: made per request on the serving path, where frozen __init__ cost ~7x (see
# TokenDelta). Treat as immutable.
@dataclass(slots=True)
class SchedRequest:
    """One request as the scheduler sees it."""

    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    tier: Tier
    # Absolute time (the scheduler's clock, time.monotonic by default) by which the first
    # token must be produced; None for no deadline. Queued requests past it are dropped.
    ttft_deadline: float | None = None
    tenant: str = ""  # who it runs for: the offline tier shares capacity fairly among tenants
    weight: float = 1.0  # the tenant's share of the offline tier relative to others (> 0)


# Not frozen: made per request on the serving path, where frozen __init__ cost ~7x (see
# TokenDelta). Treat as immutable.
@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    speculative_steps: int = 0  # steps that verified drafted tokens of this request
    drafter: str | None = None  # who drafted them ("ngram", "draft"); None: no speculation

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted over proposed drafted tokens (0 without speculation)."""
        proposed = self.draft_tokens_proposed
        return self.draft_tokens_accepted / proposed if proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Drafted tokens accepted per speculative step (0 without speculation)."""
        steps = self.speculative_steps
        return self.draft_tokens_accepted / steps if steps else 0.0


# Not frozen: made per request on the serving path, where frozen __init__ cost ~7x (see
# TokenDelta). Treat as immutable.
@dataclass(slots=True)
class Timing:
    queue_seconds: float  # arrival to first admission
    ttft_seconds: float | None  # arrival to first token; None if no token came
    total_seconds: float  # arrival to the final event
    preemptions: int


# Not frozen, on purpose (one per token of every stream; see TokenDelta). Treat as immutable.
@dataclass(slots=True)
class SchedEvent:
    """Output of one request. Non-final events carry tokens; the final one carries outcome,
    usage and timing (and may carry the last tokens too)."""

    request_id: int
    token_ids: tuple[int, ...]
    text: str
    outcome: Outcome | None = None  # set on the final event only
    error: str | None = None
    usage: Usage | None = None  # final event only
    timing: Timing | None = None  # final event only
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token, when asked for

    @property
    def is_final(self) -> bool:
        return self.outcome is not None


# Called from the scheduler's thread; must not block (the service hands events to asyncio).
EventSink = Callable[[SchedEvent], None]


class Submitter(Protocol):
    """What takes requests: a ``BackfillScheduler``, or a router's cascade over two of them.
    Every accepted request (``submit`` returned an id) gets exactly one final event."""

    def submit(self, request: SchedRequest, sink: EventSink) -> int: ...

    def cancel(self, request_id: int) -> None: ...


class QueueFullError(Exception):
    """The tier's queue is at its bound; the service answers RESOURCE_EXHAUSTED."""


class DrainingError(Exception):
    """The scheduler is draining and accepts no new work; the service answers UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    running: int
    queued: int
    finished: int  # since start, any outcome
    generated_tokens: int  # since start
    preemptions: int  # since start
    # SLO attainment, since start, of requests that completed (STOP or LENGTH) while the
    # scheduler had SLOs configured: how many were judged, and how many met each SLO.
    slo_judged: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    both_met: int = 0


@dataclass(frozen=True, slots=True)
class StepBudgetSnapshot:
    """The TPOT budget's state (server/scheduler/slo.py)."""

    tpot_slo_ms: float | None  # None: no budget, offline fills every step
    ttft_slo_ms: float | None
    step_budget_ms: float | None  # what steps are planned to now: the SLO times a margin
    online_present: bool  # the last plan bounded offline work
    offline_held_back: int  # offline sequences the last plan paused or capped
    predicted_step_ms: float  # the last planned step's predicted time
    prediction_error: float  # median relative error of step predictions (NaN: none yet)
    steps_observed: int  # executor steps the step-cost model has seen


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """Scheduler figures for GetStats and /metrics."""

    online: TierSnapshot
    offline: TierSnapshot
    slots_total: int
    passes: int
    draining: bool
    step_budget: StepBudgetSnapshot | None = None
