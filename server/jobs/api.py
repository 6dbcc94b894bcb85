"""Batch jobs as the servicer sees them: submit (whole or streamed), read, follow, cancel, list.

Every lookup is scoped by tenant: another tenant's job is NOT_FOUND, exactly like a job that
does not exist, so ids reveal nothing across tenants. Store calls run on worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration

from backfill.v1 import inference_pb2 as pb
from server.api.errors import AlreadyExistsError, NotFoundError
from server.api.models import ModelRegistry
from server.api.validation import (
    SURFACE_LABELS,
    InvalidArgumentError,
    check_duration,
    check_label,
    check_labels,
    validate_batch,
)
from server.jobs.config import JobsConfig
from server.jobs.convert import stored_to_pb
from server.jobs.runner import JobRunner
from server.jobs.store import JobPage, JobRecord, JobState, JobStore, KeyedJob, NewJob, Outcome
from server.jobs.upload import Upload
from server.quotas import TenantQuotas
from server.security.keys import UNLIMITED, TenantLimits

T = TypeVar("T")
RESULTS_PAGE = 256  # results read from the store at a time, per stream
CANCEL_SETTLE_S = 5.0  # how long CancelBatch waits for running requests to stop
MAX_WINDOW_S = 366 * 24 * 3600.0
MAX_PAGE = 100  # jobs listed per page at most (OpenAI's limit), whatever the request asks
POLL_S = 0.5  # results of a job the runner does not track are looked for this often


class Jobs:
    def __init__(
        self, store: JobStore, runner: JobRunner, models: ModelRegistry, config: JobsConfig,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self._store = store
        self._runner = runner
        self._models = models
        self._config = config
        self._quotas = quotas if quotas is not None else TenantQuotas(runner.pending)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(fn, *args)

    # ---- submitting ---------------------------------------------------------------------------

    async def submit(
        self, req: pb.SubmitBatchRequest, tenant: str, limits: TenantLimits = UNLIMITED
    ) -> JobRecord:
        """A whole job in one message for ``tenant`` (the caller's, resolved by the surface);
        an invalid request rejects the whole job, and so does one that would take the tenant
        past its ``max_queued_offline`` quota (``limits``)."""
        # The job's own checks, within the largest model's bounds; each request is checked
        # against its own model's as it is stored.
        caps = [m.spec.capacity for m in self._models]
        validate_batch(req, vocab_size=max(c.vocab_size for c in caps),
                       max_seq_len=max(c.max_seq_len for c in caps))
        window = self._window(req.completion_window if req.HasField("completion_window")
                              else None)
        digest = _digest(req)
        if req.idempotency_key and (seen := await self._keyed(tenant, req.idempotency_key)):
            return _same_or_conflict(seen, digest, req.idempotency_key)
        self._quotas.check_job(tenant, limits, len(req.requests))
        job = self._new_job(tenant, dict(req.labels), window)

        async def fill() -> bytes:
            upload = Upload(self._store, self._models, job.id)
            await self._call(upload.add_requests, req.requests)
            return digest

        return await self._ingest(job, req.idempotency_key, fill)

    async def upload(
        self, messages: AsyncIterator[pb.UploadBatchRequest], owner: Callable[[str, str], str],
        limits: TenantLimits = UNLIMITED,
    ) -> JobRecord:
        """A job streamed as a header and JSONL pieces; invalid lines fail one by one.
        ``owner(claimed, field)`` is the tenant the job belongs to, given the header's
        ``tenant`` (the surface decides: the claim, or the caller's identity). A job that would
        take the tenant past its ``max_queued_offline`` quota is refused (before the input when
        the tenant is at it already, else once the input is counted)."""
        header = await _header(messages)
        tenant = owner(header.tenant, "header.tenant")
        check_label(header.idempotency_key, "header.idempotency_key")
        check_labels(header.labels, "header.labels", surface_labels=SURFACE_LABELS)
        if header.model:
            self._models.resolve(header.model, "header.")
        window = self._window(header.completion_window
                              if header.HasField("completion_window") else None)
        digest = hashlib.sha256(_header_digest(header))
        key = header.idempotency_key
        if key and (seen := await self._keyed(tenant, key)):
            async for data in _data(messages):
                digest.update(data)
            return _same_or_conflict(seen, digest.digest(), key)
        self._quotas.check_job(tenant, limits, 1)
        job = self._new_job(tenant, dict(header.labels), window)

        async def fill() -> bytes:
            upload = Upload(self._store, self._models, job.id, header.model)
            async for data in _data(messages):
                digest.update(data)
                await self._call(upload.add_data, data)
            await self._call(upload.finish)
            if upload.num_requests == 0:
                raise InvalidArgumentError("data: the upload holds no requests")
            self._quotas.check_job(tenant, limits, upload.num_requests - upload.num_failed)
            return digest.digest()

        return await self._ingest(job, key, fill)

    async def _ingest(
        self, job: NewJob, key: str, fill: Callable[[], Awaitable[bytes]]
    ) -> JobRecord:
        """Creates the job, fills it (``fill`` returns the digest of what it added) and
        commits it; a submit that fails or breaks off leaves nothing behind."""
        await self._call(self._store.create_job, job)
        try:
            digest = await fill()
            keyed = await self._call(self._store.commit_job, job.id, key, digest, time.time())
        except BaseException:
            await asyncio.shield(self._call(self._store.discard_job, job.id))
            raise
        if keyed.job.id != job.id:  # a concurrent submit with the same key won
            return _same_or_conflict(keyed, digest, key)
        self._runner.adopt(keyed.job)
        return keyed.job

    def _window(self, duration: Duration | None) -> float:
        if duration is None:
            return self._config.completion_window_s
        return check_duration(duration, "completion_window", MAX_WINDOW_S)

    def _new_job(self, tenant: str, labels: dict[str, str], window_s: float) -> NewJob:
        now = time.time()
        return NewJob(uuid.uuid4().hex, tenant, labels, now, now + window_s)

    async def _keyed(self, tenant: str, key: str) -> KeyedJob | None:
        return await self._call(self._store.find_key, tenant, key)

    # ---- reading ------------------------------------------------------------------------------

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        check_label(job_id, "id")
        job = await self._call(self._store.get_job, tenant, job_id)
        if job is None:
            raise NotFoundError(f"id: no batch job {job_id!r}")
        return job

    async def list_jobs(self, tenant: str, limit: int, after: str) -> JobPage:
        """A page of the tenant's jobs: ``limit`` of them (0, or more than MAX_PAGE: MAX_PAGE),
        so a listing stays far below any client's message size limit."""
        check_label(after, "after")
        if limit < 0:
            raise InvalidArgumentError(f"limit must be >= 0, got {limit}")
        page = MAX_PAGE if limit == 0 else min(limit, MAX_PAGE)
        return await self._call(self._store.list_jobs, tenant, page, after)

    async def results(self, tenant: str, job_id: str, start: int) -> AsyncIterator[pb.BatchResult]:
        """Results from index ``start`` on, in order, as they are committed; ends once the job
        has ended."""
        job = await self.get(tenant, job_id)
        index = start
        while index < job.total:
            changed = self._runner.tracks(job_id)  # taken before reading: no missed wake-up
            page = await self._call(self._store.results, job_id, index, RESULTS_PAGE)
            ready = list(itertools.takewhile(lambda r: r.outcome is not Outcome.PENDING, page))
            for stored in ready:
                yield stored_to_pb(stored)
            index += len(ready)
            if ready and len(ready) == len(page):
                continue
            if changed is not None:
                await changed.wait()
            else:  # not running here now (e.g. draining): look again later
                await asyncio.sleep(POLL_S)
        # The job's end state is recorded just after its last result: the stream ends with the
        # job, so a read after it sees COMPLETED (or EXPIRED...), never FINALIZING.
        while (changed := self._runner.tracks(job_id)) is not None:
            await changed.wait()

    # ---- cancelling ---------------------------------------------------------------------------

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Stops the job's running requests and drops its pending ones; waits a little for the
        running ones to stop, so the counts returned are usually settled."""
        job = await self.get(tenant, job_id)
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            moved = await self._call(self._store.transition, job_id,
                                     {JobState.QUEUED, JobState.RUNNING}, JobState.CANCELLING,
                                     time.time())
            if moved:
                self._runner.stop(job_id, Outcome.CANCELLED)
        deadline = time.monotonic() + CANCEL_SETTLE_S
        while (changed := self._runner.tracks(job_id)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                break
        return await self.get(tenant, job_id)

    # ---- shutting down ------------------------------------------------------------------------

    async def unfinished(self) -> list[tuple[str, int]]:
        """(job id, requests left) of every job with requests left in the store."""
        out = []
        for tenant, job_id in self._runner.unfinished():
            job = await self._call(self._store.get_job, tenant, job_id)
            if job is not None:
                out.append((job_id, job.total - job.ended))
        return out

    async def close(self) -> None:
        await self._call(self._store.close)


async def _header(messages: AsyncIterator[pb.UploadBatchRequest]) -> pb.UploadBatchHeader:
    try:
        first = await messages.__anext__()
    except StopAsyncIteration:
        raise InvalidArgumentError("header: the upload is empty; send a header first") from None
    if first.WhichOneof("kind") != "header":
        raise InvalidArgumentError("header: the first message of an upload must be its header")
    return first.header


async def _data(messages: AsyncIterator[pb.UploadBatchRequest]) -> AsyncIterator[bytes]:
    async for message in messages:
        if message.WhichOneof("kind") != "data":
            raise InvalidArgumentError("header: only data may follow the header of an upload")
        yield message.data


def _same_or_conflict(seen: KeyedJob, digest: bytes, key: str) -> JobRecord:
    if seen.digest != digest:
        raise AlreadyExistsError(
            f"idempotency_key {key!r} was used for another batch (job {seen.job.id}) with "
            "different requests"
        )
    return seen.job


def _digest(req: pb.SubmitBatchRequest) -> bytes:
    """What a submit asked for, its idempotency key aside (deterministic serialization)."""
    body = pb.SubmitBatchRequest()
    body.CopyFrom(req)
    body.ClearField("idempotency_key")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


def _header_digest(header: pb.UploadBatchHeader) -> bytes:
    body = pb.UploadBatchHeader()
    body.CopyFrom(header)
    body.ClearField("idempotency_key")
    return body.SerializeToString(deterministic=True)
