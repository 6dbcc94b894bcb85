"""A job store in memory (``--job-store :memory:``): the same contract as the SQLite store, and
nothing survives the process. It is the baseline the persistence benchmark compares against,
and a second implementation that keeps the ``JobStore`` protocol honest."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from server.jobs.store import (
    COUNTERS,
    STOPPABLE_STATES,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    ItemResult,
    JobPage,
    JobRecord,
    JobState,
    KeyedJob,
    NewItem,
    NewJob,
    Outcome,
    PendingItem,
    StoredResult,
    UnknownJobError,
)


@dataclass(slots=True)
class _Item:
    custom_id: str
    url: str
    model: str
    request: bytes | None
    outcome: Outcome = Outcome.PENDING
    result: bytes | None = None
    finished_at: float | None = None


class _Jobs(dict[str, "_Job"]):
    """Jobs by id, in creation order; a missing one is the store's UnknownJobError."""

    def __missing__(self, job_id: str) -> _Job:
        raise UnknownJobError(job_id)


@dataclass(slots=True)
class _Job:
    record: JobRecord
    key: str = ""
    digest: bytes = b""
    items: list[_Item] = field(default_factory=list)
    custom_ids: set[str] = field(default_factory=set)


class MemoryJobStore:
    """See ``server.jobs.store.JobStore``; one lock guards everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs = _Jobs()

    def _update(self, job: _Job, **changes: object) -> None:
        job.record = dataclasses.replace(job.record, **changes)  # type: ignore[arg-type]

    # ---- uploads ------------------------------------------------------------------------------

    def create_job(self, job: NewJob) -> None:
        record = JobRecord(job.id, job.tenant, dict(job.labels), JobState.VALIDATING, 0, 0, 0,
                           0, 0, 0, job.created_at, job.expires_at)
        with self._lock:
            self._jobs[job.id] = _Job(record)

    def add_items(self, job_id: str, items: Sequence[NewItem]) -> None:
        with self._lock:
            job = self._jobs[job_id]
            for item in items:
                f = item.failure
                job.items.append(_Item(
                    item.custom_id, item.url, item.model, item.request,
                    Outcome.PENDING if f is None else f.outcome,
                    None if f is None else f.result, None if f is None else f.finished_at,
                ))
                if item.custom_id:
                    job.custom_ids.add(item.custom_id)
            failed = sum(item.failure is not None for item in items)
            r = job.record
            self._update(job, total=r.total + len(items), failed=r.failed + failed)

    def known_custom_ids(self, job_id: str, custom_ids: Collection[str]) -> set[str]:
        with self._lock:
            return self._jobs[job_id].custom_ids & set(custom_ids)

    def commit_job(self, job_id: str, idempotency_key: str, digest: bytes, at: float) -> KeyedJob:
        with self._lock:
            job = self._jobs[job_id]
            if idempotency_key:
                holder = self._keyed(job.record.tenant, idempotency_key)
                if holder is not None:
                    del self._jobs[job_id]
                    return KeyedJob(holder.record, holder.digest)
            r = job.record
            if r.total > 0 and r.failed == r.total:
                self._update(job, state=JobState.FAILED, finished_at=at,
                             error="every request of the job failed validation")
            else:
                self._update(job, state=JobState.QUEUED)
            job.key, job.digest = idempotency_key, digest
            return KeyedJob(job.record, digest)

    def discard_job(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def _keyed(self, tenant: str, key: str) -> _Job | None:
        for job in self._jobs.values():
            if job.key == key and job.record.tenant == tenant:
                return job
        return None

    # ---- reads --------------------------------------------------------------------------------

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.record.tenant != tenant:
            return None
        return None if job.record.state is JobState.VALIDATING else job.record

    def list_jobs(self, tenant: str, limit: int, after: str) -> JobPage:
        with self._lock:
            records = [j.record for j in reversed(self._jobs.values())
                       if j.record.tenant == tenant and j.record.state is not JobState.VALIDATING]
        if after:
            ids = [r.id for r in records]
            if after not in ids:
                return JobPage()
            records = records[ids.index(after) + 1:]
        if limit and len(records) > limit:
            return JobPage(records[:limit], True)
        return JobPage(records, False)

    def find_key(self, tenant: str, idempotency_key: str) -> KeyedJob | None:
        with self._lock:
            job = self._keyed(tenant, idempotency_key)
            return None if job is None else KeyedJob(job.record, job.digest)

    def results(self, job_id: str, start: int, limit: int) -> list[StoredResult]:
        with self._lock:
            items = self._jobs[job_id].items[start:start + limit]
            return [StoredResult(start + i, it.custom_id, it.url, it.model, it.outcome,
                                 it.result, it.finished_at) for i, it in enumerate(items)]

    # ---- running ------------------------------------------------------------------------------

    def unfinished_jobs(self) -> list[JobRecord]:
        with self._lock:
            for job_id in [j for j, job in self._jobs.items()
                           if job.record.state is JobState.VALIDATING]:
                del self._jobs[job_id]
            return [j.record for j in self._jobs.values() if j.record.state in UNFINISHED_STATES]

    def pending_items(self, job_id: str, start: int, limit: int) -> list[PendingItem]:
        out: list[PendingItem] = []
        with self._lock:
            items = self._jobs[job_id].items
            for index in range(start, len(items)):
                it = items[index]
                if it.outcome is Outcome.PENDING and it.request is not None:
                    out.append(PendingItem(index, it.custom_id, it.url, it.model, it.request))
                    if len(out) == limit:
                        break
        return out

    def transition(
        self, job_id: str, from_states: Collection[JobState], to: JobState, at: float
    ) -> bool:
        with self._lock:
            job = self._jobs[job_id]
            if job.record.state not in from_states:
                return False
            started = job.record.started_at
            if to is JobState.RUNNING and started is None:
                started = at
            self._update(job, state=to, started_at=started)
            return True

    def record_results(self, results: Sequence[ItemResult]) -> set[str]:
        counts: dict[str, dict[str, int]] = {}
        started: dict[str, float] = {}  # job id -> its earliest fresh result's end
        with self._lock:
            for r in results:
                item = self._jobs[r.job_id].items[r.index]
                if item.outcome is not Outcome.PENDING:
                    continue
                item.outcome, item.result, item.finished_at = r.outcome, r.result, r.finished_at
                item.request = None
                c = counts.setdefault(r.job_id, dict.fromkeys(COUNTERS.values(), 0))
                c[COUNTERS[r.outcome]] += 1
                c["completion_tokens"] = c.get("completion_tokens", 0) + r.completion_tokens
                started[r.job_id] = min(started.get(r.job_id, r.finished_at), r.finished_at)
            done: set[str] = set()
            for job_id, c in counts.items():
                job = self._jobs[job_id]
                if c.get("completed") and job.record.state is JobState.QUEUED:
                    # a request ran even if the runner's own mark is not in yet
                    self._update(job, state=JobState.RUNNING,
                                 started_at=job.record.started_at or started[job_id])
                self._update(job, **{k: getattr(job.record, k) + v for k, v in c.items()})
                rec = job.record
                if rec.ended >= rec.total and rec.state in (JobState.QUEUED, JobState.RUNNING):
                    self._update(job, state=JobState.FINALIZING)
                    done.add(job_id)
        return done

    def close_pending(self, job_id: str, outcome: Outcome, at: float) -> None:
        with self._lock:
            job = self._jobs[job_id]
            if job.record.state not in STOPPABLE_STATES:
                return  # it ended meanwhile (its last requests finished)
            closed = 0
            for item in job.items:
                if item.outcome is Outcome.PENDING:
                    item.outcome, item.finished_at, item.request = outcome, at, None
                    closed += 1
            column = COUNTERS[outcome]
            state = JobState.CANCELLED if outcome is Outcome.CANCELLED else JobState.EXPIRED
            self._update(job, **{column: getattr(job.record, column) + closed}, state=state,
                         finished_at=at)

    def finalize(self, job_id: str, at: float) -> None:
        with self._lock:
            job = self._jobs[job_id]
            if job.record.state is JobState.FINALIZING:
                state = JobState.EXPIRED if job.record.expired else JobState.COMPLETED
                self._update(job, state=state, finished_at=at)

    def purge(self, finished_before: float, limit: int) -> int:
        with self._lock:
            old = [job_id for job_id, job in self._jobs.items()
                   if job.record.state in TERMINAL_STATES
                   and (job.record.finished_at or finished_before) < finished_before][:limit]
            for job_id in old:
                del self._jobs[job_id]
        return len(old)

    def close(self) -> None:
        pass
