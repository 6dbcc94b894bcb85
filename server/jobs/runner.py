"""The job runner: feeds unfinished jobs' requests from the store to the scheduler, a bounded
number at a time, and sees each job through to its end (completion, cancel or expiry).

- At most ``max_in_flight`` job requests are out of the store at once (submitted to the
  scheduler, or finished and waiting for the writer); each finish tops the window up. The
  window is shared round-robin among the jobs with work, so one huge job does not hold back a
  small one submitted after it.
- A request's output is gathered on the scheduler's thread and handed to the result writer when
  it ends; the runner learns of it once it is committed, so what a reader sees is durable.
- A request the server stops while draining is not recorded: it stays pending in the store and
  runs after the next start. So does whatever was in flight when the process died.

State lives on the event loop's thread, except what the sinks touch (each flight's own output).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from backfill.v1 import inference_pb2 as pb
from server.api.models import ModelRegistry, Route
from server.jobs.config import JobsConfig
from server.jobs.convert import failed_result, request_result
from server.jobs.store import ItemResult, JobRecord, JobState, JobStore, Outcome, PendingItem
from server.jobs.writer import Finish, ResultWriter
from server.metrics import RequestMetrics
from server.scheduler.types import DrainingError, QueueFullError, SchedEvent, SchedRequest, Tier
from server.scheduler.types import Outcome as SchedOutcome
from server.tenant_metrics import TenantMetrics

log = logging.getLogger(__name__)

PAGE = 256  # pending requests read from the store at a time, per job
MAINTENANCE_S = 0.25  # how often expiry is checked
PURGE_S = 60.0  # how often finished jobs past their retention are deleted
PURGE_PAGE = 100  # jobs deleted per transaction
RETRY_S = 0.05  # after the scheduler's offline queue was full
CLOSE_WAIT_S = 10.0  # at close, for store calls under way


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A pending request read from the store and converted (or why it cannot run)."""

    item: PendingItem
    model: Route | None  # where it runs (a cascade's model settles before its result)
    request: SchedRequest | None
    error: str = ""


class _Job:
    """An unfinished job as the runner tracks it (the loop's thread only)."""

    __slots__ = ("buffer", "changed", "cursor", "ending", "exhausted", "expires_at", "id",
                 "in_flight", "remaining", "started", "stopping", "tenant")

    def __init__(self, record: JobRecord) -> None:
        self.id = record.id
        self.tenant = record.tenant
        self.remaining = record.total - record.ended  # requests that have not ended
        self.expires_at = record.expires_at
        self.started = record.state is not JobState.QUEUED
        self.cursor = 0  # requests below this index were loaded already
        self.buffer: deque[_Loaded] = deque()
        self.exhausted = False  # nothing pending at or past the cursor
        # index -> (model, scheduler request id); no id for a failure on its way to the store
        self.in_flight: dict[int, tuple[Route | None, int | None]] = {}
        self.stopping: Outcome | None = None  # CANCELLED or EXPIRED once it is being stopped
        self.ending = False  # its end is being recorded (finalize or close_pending)
        self.changed = asyncio.Event()

    @property
    def dispatchable(self) -> bool:
        return self.stopping is None and (bool(self.buffer) or not self.exhausted)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()  # waiters hold the old one, which stays set


class _Flight:
    """One job request in the scheduler: gathers its output on the scheduler's thread."""

    __slots__ = ("job", "loaded", "observe", "tenants", "text", "token_ids", "writer")

    def __init__(self, job: _Job, loaded: _Loaded, writer: ResultWriter, metrics: RequestMetrics,
                 tenants: TenantMetrics):
        self.job = job
        self.loaded = loaded
        self.writer = writer
        assert loaded.model is not None
        self.observe = metrics.meter(Tier.OFFLINE, loaded.model).observe
        self.tenants = tenants
        self.token_ids: list[int] = []
        self.text: list[str] = []

    def sink(self, event: SchedEvent) -> None:
        self.observe(event)
        if event.token_ids:
            self.token_ids.extend(event.token_ids)
            self.text.append(event.text)
        if event.outcome is not None:
            prompt = 0 if event.usage is None else event.usage.prompt_tokens
            model = self.loaded.model.name if self.loaded.model is not None else ""
            self.tenants.finished(self.job.tenant, model, Tier.OFFLINE, event.outcome, prompt,
                                  len(self.token_ids))
            make = functools.partial(self._result, event)
            self.writer.put(Finish(self.job.id, self.loaded.item.index, make))

    def _result(self, event: SchedEvent) -> ItemResult | None:
        if event.outcome is SchedOutcome.SHUTDOWN:
            return None  # stays pending: it runs again after the next start
        item, model = self.loaded.item, self.loaded.model
        return request_result(
            job_id=self.job.id, index=item.index, custom_id=item.custom_id, url=item.url,
            model=model.name if model is not None else item.model, event=event,
            token_ids=self.token_ids, text="".join(self.text),
            stopped_as=self.job.stopping or Outcome.CANCELLED, at=time.time(),
        )


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        models: ModelRegistry,
        metrics: RequestMetrics,
        config: JobsConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        tenants: TenantMetrics | None = None,
        weight: Callable[[str], float] = lambda tenant: 1.0,
    ) -> None:
        """``weight(tenant)``: the tenant's share of the offline tier (its requests carry it
        to the scheduler's fair queue)."""
        self._store = store
        self._models = models
        self._metrics = metrics
        self._tenants = tenants if tenants is not None else TenantMetrics(None)
        self._weight = weight
        self._config = config
        self._loop = loop
        self._writer = ResultWriter(store, self._on_commit, config.flush_s)
        self._jobs: dict[str, _Job] = {}
        self._pending: Counter[str] = Counter()  # tenant -> its jobs' requests not ended
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._feeding = True
        self._turn = 0  # round-robin offset among jobs
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # one-off store calls (finalize, close...)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Picks up every unfinished job of the store (after a restart or a crash) and deletes
        the finished ones past their retention."""
        for record in await asyncio.to_thread(self._store.unfinished_jobs):
            self.adopt(record)
        # Jobs past their retention are never readable again once the server is up.
        await self._purge(time.time() - self._config.retention_s)
        self._loops = [asyncio.ensure_future(self._feed_forever()),
                       asyncio.ensure_future(self._maintain_forever())]

    def stop_feeding(self) -> None:
        """Draining: nothing more goes to the scheduler; the rest stays in the store."""
        self._feeding = False
        self._wake.set()

    async def close(self) -> None:
        """Writes what finished, then stops (after the scheduler has stopped)."""
        self.stop_feeding()
        for task in self._loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self._writer.close)
        if self._tasks:  # store calls under way finish before the store closes
            await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)

    async def flush(self) -> None:
        """Waits until every finished request so far is committed."""
        await asyncio.to_thread(self._writer.flush)

    # ---- jobs ---------------------------------------------------------------------------------

    def adopt(self, record: JobRecord) -> None:
        """Starts tracking a job that has work left (a new one, or one found at start)."""
        if record.state is JobState.FINALIZING:
            self._spawn(self._finalize(record.id))
            return
        if record.state not in (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING):
            return
        job = self._jobs[record.id] = _Job(record)
        self._pending[job.tenant] += job.remaining
        if record.state is JobState.CANCELLING:
            self.stop(job.id, Outcome.CANCELLED)
        elif time.time() >= job.expires_at:  # it expired while the server was down
            self.stop(job.id, Outcome.EXPIRED)
        self._wake.set()

    def tracks(self, job_id: str) -> asyncio.Event | None:
        """The event set at the job's next change; None when the runner is done with it."""
        job = self._jobs.get(job_id)
        return None if job is None else job.changed

    def stop(self, job_id: str, outcome: Outcome) -> None:
        """Cancels or expires a job: its running requests are cancelled, and once they have
        ended its pending ones are closed with ``outcome``."""
        job = self._jobs.get(job_id)
        if job is None or job.stopping is not None or job.ending:
            return
        job.stopping = outcome
        job.buffer.clear()
        job.exhausted = True
        for model, request_id in job.in_flight.values():
            if model is not None and request_id is not None:
                model.scheduler.cancel(request_id)
        self._maybe_close(job)

    def pending(self, tenant: str) -> int:
        """The tenant's batch job requests that have not ended (its offline quota's share)."""
        return self._pending.get(tenant, 0)

    def unfinished(self) -> list[tuple[str, str]]:
        """(tenant, job id) of every job with requests left."""
        return [(job.tenant, job.id) for job in self._jobs.values()]

    # ---- feeding ------------------------------------------------------------------------------

    async def _feed_forever(self) -> None:
        while self._feeding:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._top_up()
            except Exception:
                log.exception("feeding batch jobs to the scheduler failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _top_up(self) -> None:
        limit = self._config.max_in_flight
        while self._feeding and self._in_flight < limit:
            jobs = [job for job in self._jobs.values() if job.dispatchable]
            if not jobs:
                return
            self._turn = (self._turn + 1) % len(jobs)
            share = max(1, (limit - self._in_flight) // len(jobs))
            for job in jobs[self._turn:] + jobs[:self._turn]:
                if not job.buffer and not job.exhausted:
                    await self._load(job, share)
                if not self._submit(job, share) or self._in_flight >= limit:
                    return

    async def _load(self, job: _Job, want: int) -> None:
        limit = min(PAGE, max(want, 16))
        loaded = await asyncio.to_thread(self._read_pending, job.id, job.tenant, job.cursor,
                                         limit)
        if job.stopping is not None:
            return
        if len(loaded) < limit:
            job.exhausted = True
        if loaded:
            job.cursor = loaded[-1].item.index + 1
            job.buffer.extend(loaded)

    def _read_pending(self, job_id: str, tenant: str, start: int,
                      limit: int) -> list[_Loaded]:
        """A worker thread: reads pending requests and converts them for the scheduler, as
        requests of the job's tenant."""
        out = []
        for item in self._store.pending_items(job_id, start, limit):
            try:
                target = self._models.resolve(item.model)
                request = pb.GenerateRequest.FromString(item.request)
                prepared = target.prepare(request, force_offline=True, tenant=tenant,
                                          weight=self._weight(tenant))
                out.append(_Loaded(item, prepared.route, prepared.request))
            except ValueError as exc:
                out.append(_Loaded(item, None, None, str(exc)))
        return out

    def _submit(self, job: _Job, count: int) -> bool:
        """Submits up to count of the job's loaded requests; False when the scheduler takes no
        more for now (its offline queue is full, or it is draining)."""
        while job.buffer and count > 0 and job.stopping is None:
            loaded = job.buffer[0]
            index = loaded.item.index
            if loaded.request is None or loaded.model is None:
                self._fail(job, loaded.item, loaded.error)
            else:
                flight = _Flight(job, loaded, self._writer, self._metrics, self._tenants)
                try:
                    request_id = loaded.model.scheduler.submit(loaded.request, flight.sink)
                except QueueFullError:
                    self._loop.call_later(RETRY_S, self._wake.set)
                    return False
                except DrainingError:
                    self._feeding = False
                    return False
                except ValueError as exc:  # the engine can never run it
                    self._fail(job, loaded.item, str(exc))
                else:
                    job.in_flight[index] = (loaded.model, request_id)
                    self._mark_started(job)
            job.buffer.popleft()
            self._in_flight += 1
            count -= 1
        return True

    def _fail(self, job: _Job, item: PendingItem, message: str) -> None:
        job.in_flight[item.index] = (None, None)
        make = functools.partial(
            failed_result, job_id=job.id, index=item.index, custom_id=item.custom_id,
            url=item.url, model=item.model, code=grpc.StatusCode.INVALID_ARGUMENT,
            message=message, at=time.time(),
        )
        self._writer.put(Finish(job.id, item.index, make))

    def _mark_started(self, job: _Job) -> None:
        if not job.started:
            job.started = True
            self._spawn(asyncio.to_thread(
                self._store.transition, job.id, {JobState.QUEUED}, JobState.RUNNING, time.time()
            ))

    # ---- results and endings ------------------------------------------------------------------

    def _on_commit(self, batch: Sequence[Finish], finished: set[str]) -> None:
        """The writer's thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(self._committed, batch, finished)

    def _committed(self, batch: Sequence[Finish], finished: set[str]) -> None:
        touched: dict[str, _Job] = {}
        for finish in batch:
            self._in_flight -= 1
            job = self._jobs.get(finish.job_id)
            if job is not None:
                job.in_flight.pop(finish.index, None)
                job.remaining -= 1
                self._pending[job.tenant] -= 1
                touched[job.id] = job
        for job_id in finished:  # first: a job whose every request ended is not closed
            if (job := self._jobs.get(job_id)) is not None:
                job.ending = True
            self._spawn(self._finalize(job_id))
        for job in touched.values():
            job.notify()
            self._maybe_close(job)
        self._wake.set()

    def _maybe_close(self, job: _Job) -> None:
        if job.stopping is not None and not job.in_flight and not job.ending:
            job.ending = True
            self._spawn(self._close(job, job.stopping))

    # A failed store call is logged by _done and retried at the next start, which finds the job
    # unfinished; forgetting it here anyway frees whoever waits on the job now.
    async def _close(self, job: _Job, outcome: Outcome) -> None:
        try:
            await asyncio.to_thread(self._store.close_pending, job.id, outcome, time.time())
        finally:
            self._forget(job.id)

    async def _finalize(self, job_id: str) -> None:
        try:
            await asyncio.to_thread(self._store.finalize, job_id, time.time())
        finally:
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._pending[job.tenant] -= job.remaining
            if self._pending[job.tenant] <= 0:
                del self._pending[job.tenant]
            job.notify()

    # ---- expiry and retention -----------------------------------------------------------------

    async def _maintain_forever(self) -> None:
        next_purge = time.time() + PURGE_S  # start() has just purged
        while True:
            await asyncio.sleep(MAINTENANCE_S)
            now = time.time()
            for job in list(self._jobs.values()):
                if job.stopping is None and now >= job.expires_at:
                    log.info("batch job %s expired; its finished results are kept", job.id)
                    self.stop(job.id, Outcome.EXPIRED)
            if now >= next_purge:
                next_purge = now + PURGE_S
                await self._purge(now - self._config.retention_s)

    async def _purge(self, finished_before: float) -> None:
        """Deletes the jobs past their retention, a page per transaction."""
        try:
            while await asyncio.to_thread(self._store.purge, finished_before, PURGE_PAGE):
                pass
        except Exception:
            log.exception("deleting batch jobs past their retention failed")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a batch job task failed", exc_info=task.exception())
