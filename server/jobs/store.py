"""The job store's contract: what the job runner and the service need from a place that keeps
jobs, their requests and their results across restarts.

``SQLiteJobStore`` (embedded, the default) and ``MemoryJobStore`` (nothing survives; the
baseline of the persistence benchmark) implement it. A networked database for several replicas
sharing one queue would implement the same methods; what it would add is claiming: each replica
takes pending requests with ``SELECT … FOR UPDATE SKIP LOCKED`` and marks them as its own with
a lease, instead of relying on being the only process that feeds from the store.

Invariants every implementation keeps:
- A request's outcome is written once: ``record_results`` ignores a result for a request that
  already has one, so a request is never counted or reported twice.
- A job's counters (completed, failed, cancelled, expired, completion tokens) change in the same
  transaction as the results they count.
- Methods are called from worker threads (never the event loop), any number at once.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.api.errors import NotFoundError


class JobState(enum.Enum):
    VALIDATING = "validating"  # the upload is still arriving; invisible to readers
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"  # every request ended; the job's end is being recorded
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"  # no request could run (every line was invalid)
    EXPIRED = "expired"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED}
)
# States from which a job can be cancelled or expired.
STOPPABLE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
# States of a job that still has work for the runner (requests to run or a phase to finish).
UNFINISHED_STATES = frozenset(
    {JobState.QUEUED, JobState.RUNNING, JobState.FINALIZING, JobState.CANCELLING}
)


class Outcome(enum.IntEnum):
    """How one request of a job ended (stored as its integer)."""

    PENDING = 0
    COMPLETED = 1
    FAILED = 2
    CANCELLED = 3
    EXPIRED = 4


# The job counter (a JobRecord field) each way of ending adds to.
COUNTERS = {
    Outcome.COMPLETED: "completed",
    Outcome.FAILED: "failed",
    Outcome.CANCELLED: "cancelled",
    Outcome.EXPIRED: "expired",
}


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    tenant: str
    labels: Mapping[str, str]
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as stored."""

    id: str
    tenant: str
    labels: Mapping[str, str]
    state: JobState
    total: int
    completed: int
    failed: int
    cancelled: int
    expired: int
    completion_tokens: int
    created_at: float
    expires_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""  # why the job FAILED

    @property
    def ended(self) -> int:
        return self.completed + self.failed + self.cancelled + self.expired

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class ItemResult:
    """A finished request: its outcome and its serialized ``BatchResult``."""

    job_id: str
    index: int
    outcome: Outcome
    result: bytes
    completion_tokens: int
    finished_at: float


@dataclass(frozen=True, slots=True)
class NewItem:
    """One request of an upload. ``request`` is a serialized ``GenerateRequest``; a line that
    failed validation has no request and its ``failure`` instead."""

    index: int
    custom_id: str  # "" when the line gave none (its index names it)
    url: str  # the OpenAI endpoint the line named; "" for Backfill's format
    model: str
    request: bytes | None
    failure: ItemResult | None = None


@dataclass(frozen=True, slots=True)
class PendingItem:
    """A request still to run."""

    index: int
    custom_id: str
    url: str
    model: str
    request: bytes


@dataclass(frozen=True, slots=True)
class StoredResult:
    """One request as results are read: ``result`` is None while it is pending, and for a
    request cancelled or expired before it ran."""

    index: int
    custom_id: str
    url: str
    model: str
    outcome: Outcome
    result: bytes | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class KeyedJob:
    """The job an idempotency key names, and the digest of what was submitted under it."""

    job: JobRecord
    digest: bytes


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[JobRecord] = field(default_factory=list)
    has_more: bool = False


class UnknownJobError(NotFoundError):
    """A store call named a job the store does not hold (e.g. deleted after its retention)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"id: no batch job {job_id!r}")


class JobStoreInUseError(RuntimeError):
    """Another server already serves this job store (two would run its jobs twice)."""


class JobStore(Protocol):
    # ---- uploads ------------------------------------------------------------------------------
    def create_job(self, job: NewJob) -> None:
        """A new job in VALIDATING, with no requests yet."""

    def add_items(self, job_id: str, items: Sequence[NewItem]) -> None:
        """Appends requests to a VALIDATING job (failed ones count as failed at once)."""

    def known_custom_ids(self, job_id: str, custom_ids: Collection[str]) -> set[str]:
        """Which of custom_ids the job's requests already use."""

    def commit_job(self, job_id: str, idempotency_key: str, digest: bytes, at: float) -> KeyedJob:
        """Ends the upload: the job becomes QUEUED (FAILED when every request failed, with
        ``error`` set). When another job of the tenant took the key first, this one is discarded
        and that one is returned."""

    def discard_job(self, job_id: str) -> None:
        """Deletes a job and everything of it (an upload that broke off)."""

    # ---- reads --------------------------------------------------------------------------------
    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job, or None (another tenant's job, or one still VALIDATING, is None)."""

    def list_jobs(self, tenant: str, limit: int, after: str) -> JobPage:
        """The tenant's jobs newest first, after the job ``after`` ("" = from the newest);
        limit 0 = all."""

    def find_key(self, tenant: str, idempotency_key: str) -> KeyedJob | None: ...

    def results(self, job_id: str, start: int, limit: int) -> list[StoredResult]:
        """Requests from index ``start`` on, in index order, pending ones included."""

    # ---- running ------------------------------------------------------------------------------
    def unfinished_jobs(self) -> list[JobRecord]:
        """At start: deletes uploads that never finished; returns every job with work left."""

    def pending_items(self, job_id: str, start: int, limit: int) -> list[PendingItem]:
        """Up to ``limit`` pending requests from index ``start`` on, in index order."""

    def transition(
        self, job_id: str, from_states: Collection[JobState], to: JobState, at: float
    ) -> bool:
        """Moves the job to ``to`` if it is in one of from_states (RUNNING records ``at`` as
        started_at); False when it was not."""

    def record_results(self, results: Sequence[ItemResult]) -> set[str]:
        """Writes results in one transaction, releasing their requests' inputs; a QUEUED job
        with a completed result becomes RUNNING. Returns the jobs whose every request has now
        ended (they move from QUEUED or RUNNING to FINALIZING)."""

    def close_pending(self, job_id: str, outcome: Outcome, at: float) -> None:
        """Ends every pending request with outcome (CANCELLED or EXPIRED), and the job with the
        matching state."""

    def finalize(self, job_id: str, at: float) -> None:
        """FINALIZING → COMPLETED, or EXPIRED when requests of it expired (the job expired
        while its last running requests were being stopped)."""

    def purge(self, finished_before: float, limit: int) -> int:
        """Deletes up to ``limit`` jobs that ended before the given time; returns how many."""

    def close(self) -> None: ...
