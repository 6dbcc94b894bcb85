"""Plain, immutable values the SDK takes and returns (no protobuf in the public API).

>>> SamplingParams(max_tokens=16, temperature=0.0).max_tokens
16
>>> Tier("offline") is Tier.OFFLINE
True
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.errors import BackfillError


class Tier(str, enum.Enum):
    """Service class: ONLINE has a latency objective, OFFLINE fills idle batch slots."""

    ONLINE = "online"
    OFFLINE = "offline"


class FinishReason(str, enum.Enum):
    """Why generation stopped (set on the last chunk)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


class JobState(str, enum.Enum):
    """State of an offline batch job; see ``TERMINAL_JOB_STATES``."""

    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def openai_status(self) -> str:
        """The OpenAI Batch API's name of this state (queued and running are in_progress)."""
        return "in_progress" if self in (JobState.QUEUED, JobState.RUNNING) else self.value


TERMINAL_JOB_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to choose tokens; ``None`` leaves a field to the server's default.

    >>> SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=64).seed
    1
    """

    temperature: float | None = None  # 0 = greedy (the server's default)
    top_k: int | None = None  # keep the k most likely tokens; 0 disables
    top_p: float | None = None  # nucleus mass in (0, 1]
    seed: int | None = None  # same seed, same tokens, whatever the batch
    max_tokens: int | None = None  # >= 1; server default 256
    min_tokens: int | None = None  # EOS and stops ignored before this many tokens
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # stop token ids
    ignore_eos: bool | None = None  # keep generating past end-of-sequence
    # Speculative decoding: drafted tokens verified per step, at most (0: none); None leaves
    # it to the server's policy. The output is the same either way.
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("top_k", "seed", "min_tokens", "num_speculative_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message; ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be system, user or assistant, got {self.role!r}")

    @classmethod
    def coerce(cls, message: ChatMessage | Mapping[str, str]) -> ChatMessage:
        """Accepts a ChatMessage or an OpenAI-style ``{"role": ..., "content": ...}`` dict."""
        if isinstance(message, ChatMessage):
            return message
        return cls(role=str(message["role"]), content=str(message["content"]))


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the prefix cache
    draft_tokens_proposed: int = 0  # speculative decoding: drafted tokens verified
    draft_tokens_accepted: int = 0  # of which accepted
    speculative_steps: int = 0  # steps that verified drafted tokens
    drafter: str = ""  # "ngram" or "draft"; "" without speculation

    @property
    def draft_acceptance_rate(self) -> float:
        proposed = self.draft_tokens_proposed
        return self.draft_tokens_accepted / proposed if proposed else 0.0


@dataclass(frozen=True, slots=True)
class Timing:
    """Where a finished request's time went, as measured by the server (seconds)."""

    queue_s: float | None = None  # arrival to admission
    ttft_s: float | None = None  # arrival to first token
    total_s: float | None = None  # arrival to last chunk
    preemptions: int = 0

    @property
    def decode_s(self) -> float | None:
        """Time from the first token to the last."""
        if self.ttft_s is None or self.total_s is None:
            return None
        return max(0.0, self.total_s - self.ttft_s)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of output; the last one has ``finish_reason``, usage and timing."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    model: str = ""

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole finished request, as ``complete()`` returns it."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    model: str = ""


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One request of an offline batch job; exactly one of prompt, messages, token_ids is set.

    The JSONL forms (one object per line) are described in ``backfill.batch_format``.
    """

    id: str = ""  # names the result; the server uses the index when empty
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    model: str = ""

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.token_ids))
        if given != 1:
            raise ValueError("exactly one of prompt, messages, token_ids must be given")


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A batch job's state and progress counts."""

    id: str
    state: JobState
    total: int
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    completion_tokens: int = 0
    created_at: float | None = None  # seconds since the epoch
    finished_at: float | None = None
    tenant: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    expired: int = 0  # dropped when the completion window ended
    expires_at: float | None = None  # end of the completion window
    started_at: float | None = None
    error: str = ""  # why the job failed

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    @property
    def finished(self) -> int:
        """Requests that ended, whatever the outcome."""
        return self.completed + self.failed + self.cancelled + self.expired

    @property
    def request_counts(self) -> dict[str, int]:
        """The OpenAI Batch API's counts (failed there includes cancelled and expired)."""
        return {"total": self.total, "completed": self.completed,
                "failed": self.failed + self.cancelled + self.expired}


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one request of a batch job; ``error`` is set when it failed."""

    index: int
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage
    timing: Timing
    error: BackfillError | None = None
    url: str = ""  # the OpenAI endpoint its line named; "" for Backfill's format
    model: str = ""  # the model that served it
    finished_at: float | None = None  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model the server serves."""

    name: str
    backend: str
    architecture: str
    weight_quant: str
    kv_cache_dtype: str
    max_batch_size: int
    max_seq_len: int
    vocab_size: int
    has_draft: bool = False
    parameter_count: int = 0
    tpot_slo_ms: float | None = None  # the online SLOs it is served with; None: none
    ttft_slo_ms: float | None = None
    has_chat_template: bool = False  # accepts chat messages (False from older servers)
    drafter: str = ""  # speculative decoding per request: "ngram", "draft"; "": none
    max_draft_len: int = 0  # the most num_speculative_tokens may ask for


@dataclass(frozen=True, slots=True)
class TierStats:
    """Per-tier figures of a stats snapshot."""

    tier: Tier
    running: int
    queued: int
    requests_finished: int
    generated_tokens: int
    preemptions: int
    tokens_per_second: float
    # Completed requests judged against the SLOs, and how many met them.
    slo_judged: int = 0
    ttft_slo_met: int = 0
    tpot_slo_met: int = 0
    both_slo_met: int = 0

    @property
    def slo_attainment(self) -> float | None:
        """Share of judged requests that met both SLOs; None when none was judged."""
        return self.both_slo_met / self.slo_judged if self.slo_judged else None


@dataclass(frozen=True, slots=True)
class StepBudget:
    """How the TPOT SLO bounds the offline work in each step."""

    tpot_slo_ms: float | None
    ttft_slo_ms: float | None
    online_present: bool
    offline_held_back: int
    predicted_step_ms: float
    step_prediction_error: float
    steps_observed: int
    step_budget_ms: float | None = None  # the SLO times the margin steps are planned to


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of the server (``GetStats``)."""

    tiers: Mapping[Tier, TierStats]
    slots_total: int
    slots_free: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_cache_hit_ratio: float
    slot_occupancy: float
    tokens_per_second: float
    utilization: float
    cost_per_million_tokens: float
    uptime_s: float
    steps: int
    draining: bool
    step_budget: StepBudget | None = None

    @property
    def slots_busy(self) -> int:
        return self.slots_total - self.slots_free

    def tier(self, tier: Tier) -> TierStats:
        """This tier's figures (zeros when the server sent none)."""
        return self.tiers.get(tier) or TierStats(tier, 0, 0, 0, 0, 0, 0.0)
