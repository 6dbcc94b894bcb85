"""The InferenceService servicer: thin methods (validate → convert → await the engine → convert
back). Every error an RPC raises is mapped to a status in one place, ``status_for_exception``,
applied by the decorators below; no method chooses a status code itself. The decorators also
establish the caller (server/api/identity.py) before anything else, so with authentication on
no method runs for a call without valid credentials, and hand it to the method."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias, TypeVar

import grpc
from grpc.aio import AbortError

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.api.choices import Choices
from server.api.convert import (
    TIER_TO_PB,
    seconds_to_duration,
    to_generate_response,
)
from server.api.errors import UnauthenticatedError, status_for_exception, status_for_outcome
from server.api.grpc.session import BATCH_HEADER, SessionHandler
from server.api.identity import grpc_caller, tenant_for
from server.api.models import ModelRegistry, model_info
from server.api.streams import Admission
from server.executor.base import DrafterStats
from server.jobs import Jobs
from server.jobs.convert import job_to_pb
from server.metrics import RequestMetrics
from server.quotas import TenantQuotas
from server.scheduler.types import (
    DrainingError,
    SchedEvent,
    StepBudgetSnapshot,
    Tier,
    TierSnapshot,
)
from server.security.auth import Authenticator, Caller
from server.stats import ServerStats
from server.tenant_metrics import TenantMetrics

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
R = TypeVar("R")


UnaryMethod: TypeAlias = "Callable[[InferenceServicer, Any, Context, Caller], Awaitable[R]]"
StreamMethod: TypeAlias = "Callable[[InferenceServicer, Any, Context, Caller], AsyncIterator[R]]"
GrpcUnary: TypeAlias = "Callable[[InferenceServicer, Any, Context], Awaitable[R]]"
GrpcStream: TypeAlias = "Callable[[InferenceServicer, Any, Context], AsyncIterator[R]]"


# A client-streaming call refused before its client has half-closed: the rest of its input is
# read and dropped (up to these bounds) before the status goes out. grpcio's asyncio client
# otherwise reports a write that meets the closed stream as INTERNAL ("Internal error from
# Core"), overwriting the server's status, whenever the refusal overtakes its writes
# (grpc/grpc#36066), so a refused upload would look like a server fault instead of, say,
# UNAVAILABLE while draining, which the client retries elsewhere.
REFUSED_INPUT_MAX_BYTES = 64 << 20
REFUSED_INPUT_MAX_S = 5.0


def _unary(method: UnaryMethod[R], *, while_draining: bool,
           request_stream: bool = False) -> GrpcUnary[R]:
    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: Context) -> R:
        try:
            caller = self.caller(context)
            if not while_draining:
                self.check_serving()
            return await method(self, request, context, caller)
        except AbortError:
            raise
        except Exception as exc:
            if request_stream:
                await _discard_rest(request)
            await context.abort(*status_for_exception(exc))
            raise  # unreachable: abort raises

    return wrapper


async def _discard_rest(messages: AsyncIterator[Any]) -> None:
    """Reads a refused call's remaining input, within REFUSED_INPUT_MAX_BYTES/_S."""

    async def drain() -> None:
        size = 0
        async for message in messages:
            size += message.ByteSize()
            if size > REFUSED_INPUT_MAX_BYTES:
                return

    with contextlib.suppress(Exception):  # the input broke off or ran past its time: done
        await asyncio.wait_for(drain(), REFUSED_INPUT_MAX_S)


def _stream(method: StreamMethod[R], *, while_draining: bool) -> GrpcStream[R]:
    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            caller = self.caller(context)
            if not while_draining:
                self.check_serving()
            async for item in method(self, request, context, caller):
                yield item
        except AbortError:
            raise
        except Exception as exc:
            await context.abort(*status_for_exception(exc))

    return wrapper


def unary_rpc(method: UnaryMethod[R]) -> GrpcUnary[R]:
    """A method that takes new work: refused (UNAVAILABLE) while draining."""
    return _unary(method, while_draining=False)


def upload_rpc(method: UnaryMethod[R]) -> GrpcUnary[R]:
    """A client-streaming method that takes new work (see REFUSED_INPUT_MAX_BYTES)."""
    return _unary(method, while_draining=False, request_stream=True)


def stream_rpc(method: StreamMethod[R]) -> GrpcStream[R]:
    return _stream(method, while_draining=False)


def read_rpc(method: UnaryMethod[R]) -> GrpcUnary[R]:
    """A method that only reads: answered while draining too (finished batch results can be
    fetched while the server shuts down, and an operator looks at stats)."""
    return _unary(method, while_draining=True)


def read_stream_rpc(method: StreamMethod[R]) -> GrpcStream[R]:
    return _stream(method, while_draining=True)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        models: ModelRegistry,
        jobs: Jobs,
        metrics: RequestMetrics,
        stats: Mapping[str, Callable[[], ServerStats]],
        *,
        auth: Authenticator,
        quotas: TenantQuotas,
        tenants: TenantMetrics,
    ) -> None:
        self._models = models
        self._jobs = jobs
        self._metrics = metrics
        self._stats = stats
        self._auth = auth
        self._quotas = quotas
        self._tenants = tenants
        self.draining = False

    def check_serving(self) -> None:
        if self.draining:
            raise DrainingError()

    def caller(self, context: Context) -> Caller:
        try:
            return grpc_caller(self._auth, context)
        except UnauthenticatedError as exc:
            self._tenants.auth_failure("grpc", exc.refusal.value)
            raise

    def _admission(self, caller: Caller) -> Admission:
        return Admission(self._metrics, self._tenants, self._quotas, caller.limits)

    # ---- generation ------------------------------------------------------------------------

    @stream_rpc
    async def Generate(
        self, request: pb.GenerateRequest, context: Context, caller: Caller
    ) -> AsyncIterator[pb.GenerateResponse]:
        target = self._models.resolve(request.model)
        tenant = tenant_for(caller, request.tenant, "tenant")
        prepared = await target.prepare_async(request, tenant=tenant,
                                              weight=caller.limits.weight)
        route = prepared.route
        choices = Choices.submit(route, prepared.request, request.n, self._admission(caller))
        cid, named = request.client_request_id, False
        try:
            while (ready := await choices.next()) is not None:
                for index, event in ready:
                    # The first chunk names the model that served (a route settles its model
                    # before its first event).
                    name, named = ("", True) if named else (route.name, True)
                    status = status_for_outcome(event)
                    if status is None:
                        yield to_generate_response(
                            event, client_request_id=cid, model=name, index=index
                        )
                    else:
                        if event.token_ids:
                            yield _tokens_only(event, cid, name, index)
                        await context.abort(*status)
        finally:
            # The client went away (the task is cancelled), a choice failed, or the handler
            # failed mid-stream: free every slot and KV block the request still holds.
            if not choices.finished:
                choices.cancel()

    @stream_rpc
    async def Session(
        self, request_iterator: AsyncIterable[pb.SessionRequest], context: Context, caller: Caller
    ) -> AsyncIterator[pb.SessionResponse]:
        await context.send_initial_metadata((BATCH_HEADER,))
        handler = SessionHandler(self._models, self._admission(caller), caller, self._auth,
                                 functools.partial(self.caller, context))
        async for response in handler.run(request_iterator):
            yield response

    # ---- batch jobs ------------------------------------------------------------------------

    # Another tenant's job is NOT_FOUND, exactly like a job that does not exist (the store is
    # asked for this tenant's job only), so job ids reveal nothing across tenants.

    @unary_rpc
    async def SubmitBatch(
        self, request: pb.SubmitBatchRequest, context: Context, caller: Caller
    ) -> pb.BatchJob:
        tenant = tenant_for(caller, request.tenant, "tenant")
        return job_to_pb(await self._jobs.submit(request, tenant, caller.limits))

    @upload_rpc
    async def UploadBatch(
        self, request_iterator: AsyncIterator[pb.UploadBatchRequest], context: Context,
        caller: Caller,
    ) -> pb.BatchJob:
        owner = functools.partial(tenant_for, caller)
        return job_to_pb(await self._jobs.upload(request_iterator, owner, caller.limits))

    @read_rpc
    async def GetBatch(
        self, request: pb.GetBatchRequest, context: Context, caller: Caller
    ) -> pb.BatchJob:
        tenant = tenant_for(caller, request.tenant, "tenant")
        return job_to_pb(await self._jobs.get(tenant, request.id))

    @read_stream_rpc
    async def StreamBatchResults(
        self, request: pb.StreamBatchResultsRequest, context: Context, caller: Caller
    ) -> AsyncIterator[pb.BatchResult]:
        tenant = tenant_for(caller, request.tenant, "tenant")
        async for result in self._jobs.results(tenant, request.id, request.start_index):
            yield result

    @unary_rpc
    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: Context, caller: Caller
    ) -> pb.BatchJob:
        tenant = tenant_for(caller, request.tenant, "tenant")
        return job_to_pb(await self._jobs.cancel(tenant, request.id))

    @read_rpc
    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: Context, caller: Caller
    ) -> pb.ListBatchesResponse:
        tenant = tenant_for(caller, request.tenant, "tenant")
        page = await self._jobs.list_jobs(tenant, request.limit, request.after)
        return pb.ListBatchesResponse(jobs=[job_to_pb(j) for j in page.jobs],
                                      has_more=page.has_more)

    # ---- models and stats ------------------------------------------------------------------

    @unary_rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context, caller: Caller
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self._models])

    @read_rpc
    async def GetStats(
        self, request: pb.GetStatsRequest, context: Context, caller: Caller
    ) -> pb.GetStatsResponse:
        # Answered while draining too: that is when an operator most wants to look.
        if request.model:
            self._models.get(request.model)  # INVALID_ARGUMENT naming an unknown model
        per_model = {name: to_stats_response(stats(), name) for name, stats in self._stats.items()}
        out = pb.GetStatsResponse()
        out.CopyFrom(per_model[request.model or self._models.default.name])
        out.models.extend(pb.ModelStats(model=name, stats=r) for name, r in per_model.items())
        return out


def _tokens_only(event: SchedEvent, cid: str, model: str, index: int) -> pb.GenerateResponse:
    """The tokens a failing final event still carries, sent before the error status."""
    return pb.GenerateResponse(
        token_ids=event.token_ids, text=event.text, model=model, client_request_id=cid,
        index=index,
    )


def to_stats_response(s: ServerStats, model: str = "") -> pb.GetStatsResponse:
    sched, ex = s.scheduler, s.executor
    return pb.GetStatsResponse(
        model=model,
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
        step_budget_ms=b.step_budget_ms or 0.0,
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
