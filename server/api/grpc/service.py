"""The InferenceService servicer: thin methods (validate → convert → await the engine → convert
back). Every error an RPC raises is mapped to a status in one place, ``status_for_exception``,
applied by the two decorators below; no method chooses a status code itself."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from grpc.aio import AbortError

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.api.choices import Choices
from server.api.convert import (
    TIER_TO_PB,
    ModelRegistry,
    model_info,
    seconds_to_duration,
    to_generate_response,
    to_sched_request,
)
from server.api.errors import status_for_exception, status_for_outcome
from server.api.grpc.session import BATCH_HEADER, SessionHandler
from server.executor.base import DrafterStats
from server.jobs import Jobs
from server.jobs.convert import job_to_pb
from server.metrics import RequestMetrics
from server.scheduler.types import (
    DrainingError,
    SchedEvent,
    StepBudgetSnapshot,
    Tier,
    TierSnapshot,
)
from server.stats import ServerStats

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
R = TypeVar("R")


UnaryMethod: TypeAlias = "Callable[[InferenceServicer, Any, Context], Awaitable[R]]"
StreamMethod: TypeAlias = "Callable[[InferenceServicer, Any, Context], AsyncIterator[R]]"


def _unary(method: UnaryMethod[R], *, while_draining: bool) -> UnaryMethod[R]:
    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: Context) -> R:
        try:
            if not while_draining:
                self.check_serving()
            return await method(self, request, context)
        except AbortError:
            raise
        except Exception as exc:
            await context.abort(*status_for_exception(exc))
            raise  # unreachable: abort raises

    return wrapper


def _stream(method: StreamMethod[R], *, while_draining: bool) -> StreamMethod[R]:
    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            if not while_draining:
                self.check_serving()
            async for item in method(self, request, context):
                yield item
        except AbortError:
            raise
        except Exception as exc:
            await context.abort(*status_for_exception(exc))

    return wrapper


def unary_rpc(method: UnaryMethod[R]) -> UnaryMethod[R]:
    """A method that takes new work: refused (UNAVAILABLE) while draining."""
    return _unary(method, while_draining=False)


def stream_rpc(method: StreamMethod[R]) -> StreamMethod[R]:
    return _stream(method, while_draining=False)


def read_rpc(method: UnaryMethod[R]) -> UnaryMethod[R]:
    """A method that only reads: answered while draining too (finished batch results can be
    fetched while the server shuts down)."""
    return _unary(method, while_draining=True)


def read_stream_rpc(method: StreamMethod[R]) -> StreamMethod[R]:
    return _stream(method, while_draining=True)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        models: ModelRegistry,
        jobs: Jobs,
        metrics: RequestMetrics,
        stats: Callable[[], ServerStats],
    ) -> None:
        self._models = models
        self._jobs = jobs
        self._metrics = metrics
        self._stats = stats
        self.draining = False

    def check_serving(self) -> None:
        if self.draining:
            raise DrainingError()

    # ---- generation ------------------------------------------------------------------------

    @stream_rpc
    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        model = self._models.resolve(request.model)
        sched_request = to_sched_request(request, model.spec)
        choices = Choices.submit(model.scheduler, sched_request, request.n, self._metrics)
        cid, name = request.client_request_id, model.name
        try:
            while (ready := await choices.next()) is not None:
                for index, event in ready:
                    status = status_for_outcome(event)
                    if status is None:
                        yield to_generate_response(
                            event, client_request_id=cid, model=name, index=index
                        )
                    else:
                        if event.token_ids:
                            yield _tokens_only(event, cid, name, index)
                        await context.abort(*status)
                    name = ""
        finally:
            # The client went away (the task is cancelled), a choice failed, or the handler
            # failed mid-stream: free every slot and KV block the request still holds.
            if not choices.finished:
                choices.cancel(model.scheduler)

    @stream_rpc
    async def Session(
        self, request_iterator: AsyncIterable[pb.SessionRequest], context: Context
    ) -> AsyncIterator[pb.SessionResponse]:
        await context.send_initial_metadata((BATCH_HEADER,))
        async for response in SessionHandler(self._models, self._metrics).run(request_iterator):
            yield response

    # ---- batch jobs ------------------------------------------------------------------------

    @unary_rpc
    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Context) -> pb.BatchJob:
        return job_to_pb(await self._jobs.submit(request))

    @unary_rpc
    async def UploadBatch(
        self, request_iterator: AsyncIterator[pb.UploadBatchRequest], context: Context
    ) -> pb.BatchJob:
        return job_to_pb(await self._jobs.upload(request_iterator))

    @read_rpc
    async def GetBatch(self, request: pb.GetBatchRequest, context: Context) -> pb.BatchJob:
        return job_to_pb(await self._jobs.get(request.tenant, request.id))

    @read_stream_rpc
    async def StreamBatchResults(
        self, request: pb.StreamBatchResultsRequest, context: Context
    ) -> AsyncIterator[pb.BatchResult]:
        async for result in self._jobs.results(request.tenant, request.id, request.start_index):
            yield result

    @unary_rpc
    async def CancelBatch(self, request: pb.CancelBatchRequest, context: Context) -> pb.BatchJob:
        return job_to_pb(await self._jobs.cancel(request.tenant, request.id))

    @read_rpc
    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: Context
    ) -> pb.ListBatchesResponse:
        page = await self._jobs.list_jobs(request.tenant, request.limit, request.after)
        return pb.ListBatchesResponse(jobs=[job_to_pb(j) for j in page.jobs],
                                      has_more=page.has_more)

    # ---- models and stats ------------------------------------------------------------------

    @unary_rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self._models])

    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.GetStatsResponse:
        # Answered while draining too: that is when an operator most wants to look.
        try:
            return to_stats_response(self._stats())
        except Exception as exc:
            await context.abort(*status_for_exception(exc))
            raise


def _tokens_only(event: SchedEvent, cid: str, model: str, index: int) -> pb.GenerateResponse:
    """The tokens a failing final event still carries, sent before the error status."""
    return pb.GenerateResponse(
        token_ids=event.token_ids, text=event.text, model=model, client_request_id=cid,
        index=index,
    )


def to_stats_response(s: ServerStats) -> pb.GetStatsResponse:
    sched, ex = s.scheduler, s.executor
    return pb.GetStatsResponse(
        tiers=[
            _tier_stats(Tier.ONLINE, sched.online, s.online_tokens_per_second),
            _tier_stats(Tier.OFFLINE, sched.offline, s.offline_tokens_per_second),
        ],
        slots_total=s.slots_total,
        slots_free=s.slots_free,
        kv_blocks_total=ex.kv_blocks_total,
        kv_blocks_used=ex.kv_blocks_used,
        kv_blocks_cached=ex.kv_blocks_cached,
        prefix_cache_hit_ratio=s.prefix_cache_hit_ratio,
        slot_occupancy=s.slot_occupancy,
        tokens_per_second=s.tokens_per_second,
        utilization=s.utilization,
        cost_per_million_tokens=s.cost_per_million_tokens,
        uptime=seconds_to_duration(s.uptime_seconds),
        steps=ex.steps,
        draining=sched.draining,
        step_budget=_step_budget(sched.step_budget),
        drafters=[_drafter_stats(d) for d in ex.drafters],
    )


def _drafter_stats(d: DrafterStats) -> pb.DrafterStats:
    return pb.DrafterStats(
        drafter=d.drafter,
        draft_tokens_proposed=d.proposed,
        draft_tokens_accepted=d.accepted,
        speculative_steps=d.steps,
        acceptance_rate=d.acceptance_rate,
        mean_accepted_length=d.mean_accepted_length,
        draft_seconds=d.seconds,
    )


def _step_budget(b: StepBudgetSnapshot | None) -> pb.StepBudget | None:
    if b is None:
        return None
    return pb.StepBudget(
        tpot_slo_ms=b.tpot_slo_ms or 0.0,
        ttft_slo_ms=b.ttft_slo_ms or 0.0,
        online_present=b.online_present,
        offline_held_back=b.offline_held_back,
        predicted_step_ms=b.predicted_step_ms,
        step_prediction_error=0.0 if math.isnan(b.prediction_error) else b.prediction_error,
        steps_observed=b.steps_observed,
    )


def _tier_stats(tier: Tier, t: TierSnapshot, tokens_per_second: float) -> pb.TierStats:
    return pb.TierStats(
        tier=TIER_TO_PB[tier],
        running=t.running,
        queued=t.queued,
        requests_finished=t.finished,
        generated_tokens=t.generated_tokens,
        preemptions=t.preemptions,
        tokens_per_second=tokens_per_second,
        slo_judged=t.slo_judged,
        ttft_slo_met=t.ttft_met,
        tpot_slo_met=t.tpot_met,
        both_slo_met=t.both_met,
    )
