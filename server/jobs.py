"""Offline batch jobs, held in memory.

A job is a list of requests submitted together on the OFFLINE tier. Every job's state lives on
the event loop's thread: the scheduler's sinks hop over with ``call_soon_threadsafe``, so no lock
is needed and readers (GetBatch, StreamBatchResults) see consistent counts.

Results keep their submission index and client_request_id. Cancelling drops unfinished work
and keeps finished results; a dropped request still gets a result (finish_reason CANCELLED),
so a result stream always has exactly ``total`` entries, in submission order.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from backfill.v1 import inference_pb2 as pb
from server.convert import (
    AlreadyExistsError,
    ModelRegistry,
    NotFoundError,
    ServedModel,
    finish_reason,
    status_for_outcome,
    to_pb_status,
    to_pb_timing,
    to_pb_usage,
    to_sched_request,
)
from server.metrics import RequestMetrics
from server.scheduler.types import Outcome, SchedEvent, SchedRequest, Tier
from server.validation import validate_batch

_SUCCESS = frozenset({Outcome.STOP, Outcome.LENGTH})


@dataclass(frozen=True, slots=True)
class JobItem:
    """One converted request of a job."""

    index: int
    client_request_id: str
    model: ServedModel
    request: SchedRequest


class _Partial:
    """Output of one running request, accumulated until its final event."""

    __slots__ = ("text", "token_ids")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text: list[str] = []


class BatchJob:
    """A job's state; touched only on the event loop's thread."""

    def __init__(self, job_id: str, items: Sequence[JobItem], tenant: str, labels: dict[str, str]):
        self.id = job_id
        self.items = tuple(items)
        self.tenant = tenant
        self.labels = dict(labels)
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.started = False
        self.cancelled_by_client = False
        self.num_completed = self.num_failed = self.num_cancelled = 0
        self.completion_tokens = 0
        self.request_ids: list[int | None] = [None] * len(items)
        self.results: list[pb.BatchResult | None] = [None] * len(items)
        self._partials = [_Partial() for _ in items]
        self._changed = asyncio.Event()

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def state(self) -> pb.BatchState.ValueType:
        if self.cancelled_by_client:
            return pb.BATCH_STATE_CANCELLED
        if self.done:
            return pb.BATCH_STATE_COMPLETED
        return pb.BATCH_STATE_RUNNING if self.started else pb.BATCH_STATE_QUEUED

    def on_event(self, index: int, event: SchedEvent) -> None:
        partial = self._partials[index]
        if event.token_ids:
            self.started = True
            partial.token_ids.extend(event.token_ids)
            partial.text.append(event.text)
            self.completion_tokens += len(event.token_ids)
        if event.outcome is not None:
            self._finish(index, event, event.outcome)
        self._notify()

    def _finish(self, index: int, event: SchedEvent, outcome: Outcome) -> None:
        partial = self._partials[index]
        result = pb.BatchResult(
            index=index,
            client_request_id=self.items[index].client_request_id,
            text="".join(partial.text),
            token_ids=partial.token_ids,
            finish_reason=finish_reason(outcome),
        )
        if event.usage is not None:
            result.usage.CopyFrom(to_pb_usage(event.usage))
        if event.timing is not None:
            result.timing.CopyFrom(to_pb_timing(event.timing))
        status = status_for_outcome(event)
        if status is not None:
            result.error.CopyFrom(to_pb_status(status))
        self.results[index] = result
        self._partials[index] = _Partial()  # the text now lives in the result
        if outcome in _SUCCESS:
            self.num_completed += 1
        elif outcome is Outcome.CANCELLED and self.cancelled_by_client:
            self.num_cancelled += 1
        else:
            self.num_failed += 1
        if self.num_completed + self.num_failed + self.num_cancelled == self.total:
            self.finished_at = time.time()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old one, which stays set

    async def changed(self) -> None:
        await self._changed.wait()

    def unfinished_request_ids(self) -> list[int]:
        return [
            rid
            for rid, result in zip(self.request_ids, self.results, strict=True)
            if rid is not None and result is None
        ]

    def to_pb(self) -> pb.BatchJob:
        out = pb.BatchJob(
            id=self.id,
            state=self.state,
            total=self.total,
            completed=self.num_completed,
            failed=self.num_failed,
            cancelled=self.num_cancelled,
            completion_tokens=self.completion_tokens,
            created_at=_timestamp(self.created_at),
            tenant=self.tenant,
            labels=self.labels,
        )
        if self.finished_at is not None:
            out.finished_at.CopyFrom(_timestamp(self.finished_at))
        return out


class JobStore:
    """Every job of this server, newest first; submits their requests to the scheduler."""

    def __init__(
        self, models: ModelRegistry, metrics: RequestMetrics, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._models = models
        self._metrics = metrics
        self._loop = loop
        self._jobs: dict[str, BatchJob] = {}
        self._owner: dict[int, str] = {}  # scheduler request id -> job id
        # (tenant, idempotency key) -> (job id, digest of what was submitted under it)
        self._by_key: dict[tuple[str, str], tuple[str, bytes]] = {}

    def submit(self, req: pb.SubmitBatchRequest) -> BatchJob:
        """Validates every request first, so a bad one rejects the whole job before anything
        runs; then submits all of them (QueueFullError takes back the ones already queued)."""
        default = self._models.resolve("")
        validate_batch(req, vocab_size=default.spec.capacity.vocab_size)
        key = (req.tenant, req.idempotency_key)
        digest = _digest(req) if req.idempotency_key else b""
        if req.idempotency_key and (seen := self._by_key.get(key)) is not None:
            job_id, first = seen
            if first != digest:
                raise AlreadyExistsError(
                    f"idempotency_key {req.idempotency_key!r} was used for another batch "
                    f"(job {job_id}) with different requests"
                )
            return self._jobs[job_id]
        items = [self._convert(i, r) for i, r in enumerate(req.requests)]
        job = BatchJob(uuid.uuid4().hex, items, req.tenant, dict(req.labels))
        try:
            for item in items:
                job.request_ids[item.index] = self._submit(job, item)
        except Exception:
            for queued, rid in zip(items, job.request_ids, strict=True):
                if rid is not None:
                    queued.model.scheduler.cancel(rid)
            raise
        self._jobs[job.id] = job
        if req.idempotency_key:
            self._by_key[key] = (job.id, digest)
        for rid in job.request_ids:
            assert rid is not None
            self._owner[rid] = job.id
        return job

    def get(self, job_id: str) -> BatchJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"id: no batch job {job_id!r}")
        return job

    def list(self) -> list[BatchJob]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    async def cancel(self, job_id: str, settle_s: float = 5.0) -> BatchJob:
        """Cancels the unfinished requests and waits (up to settle_s) for their finals, so the
        counts returned are settled."""
        job = self.get(job_id)
        if job.done:
            return job
        job.cancelled_by_client = True
        for index, rid in enumerate(job.request_ids):
            if rid is not None and job.results[index] is None:
                job.items[index].model.scheduler.cancel(rid)
        deadline = self._loop.time() + settle_s
        while not job.done and self._loop.time() < deadline:
            try:
                await asyncio.wait_for(job.changed(), deadline - self._loop.time())
            except asyncio.TimeoutError:
                break
        return job

    async def results(self, job_id: str, start_index: int) -> AsyncIterator[pb.BatchResult]:
        """Results from start_index on, in submission order, following the job until it ends."""
        job = self.get(job_id)
        for index in range(start_index, job.total):
            while (result := job.results[index]) is None:
                await job.changed()
            yield result

    def owners(self, request_ids: Iterable[int]) -> dict[str, int]:
        """How many of request_ids each job owns (for the drain report)."""
        counts: dict[str, int] = {}
        for rid in request_ids:
            job_id = self._owner.get(rid)
            if job_id is not None:
                counts[job_id] = counts.get(job_id, 0) + 1
        return counts

    def _convert(self, index: int, req: pb.GenerateRequest) -> JobItem:
        prefix = f"requests[{index}]."
        model = self._models.resolve(req.model, prefix)
        request = to_sched_request(req, model.spec, force_offline=True, prefix=prefix)
        return JobItem(index, req.client_request_id or str(index), model, request)

    def _submit(self, job: BatchJob, item: JobItem) -> int:
        meter = self._metrics.meter(Tier.OFFLINE)
        loop, index = self._loop, item.index

        def sink(event: SchedEvent) -> None:  # the scheduler's thread
            meter.observe(event)
            loop.call_soon_threadsafe(job.on_event, index, event)

        try:
            return item.model.scheduler.submit(item.request, sink)
        except Exception:
            self._metrics.rejected(Tier.OFFLINE)
            raise


def _timestamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _digest(req: pb.SubmitBatchRequest) -> bytes:
    """What a submit asked for, its idempotency key aside (deterministic serialization)."""
    body = pb.SubmitBatchRequest()
    body.CopyFrom(req)
    body.ClearField("idempotency_key")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()
