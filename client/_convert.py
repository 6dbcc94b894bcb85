"""Conversions between the SDK's dataclasses and the ``backfill.v1`` protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from backfill.v1 import inference_pb2 as pb
from client.errors import error_from_status
from client.types import (
    BatchJob,
    BatchRequest,
    BatchResult,
    ChatMessage,
    Chunk,
    FinishReason,
    JobState,
    ModelInfo,
    SamplingParams,
    Stats,
    StepBudget,
    Tier,
    TierStats,
    Timing,
    Usage,
)

_TIER_TO_PB = {Tier.ONLINE: pb.TIER_ONLINE, Tier.OFFLINE: pb.TIER_OFFLINE}
_TIER_FROM_PB = {pb.TIER_ONLINE: Tier.ONLINE, pb.TIER_OFFLINE: Tier.OFFLINE}
_ROLE_TO_PB = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_FINISH_FROM_PB = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    pb.FINISH_REASON_DEADLINE: FinishReason.DEADLINE,
    pb.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_JOB_STATE_FROM_PB = {
    pb.BATCH_STATE_VALIDATING: JobState.VALIDATING,
    pb.BATCH_STATE_QUEUED: JobState.QUEUED,
    pb.BATCH_STATE_RUNNING: JobState.RUNNING,
    pb.BATCH_STATE_FINALIZING: JobState.FINALIZING,
    pb.BATCH_STATE_COMPLETED: JobState.COMPLETED,
    pb.BATCH_STATE_FAILED: JobState.FAILED,
    pb.BATCH_STATE_EXPIRED: JobState.EXPIRED,
    pb.BATCH_STATE_CANCELLING: JobState.CANCELLING,
    pb.BATCH_STATE_CANCELLED: JobState.CANCELLED,
}

Messages = Sequence[ChatMessage | Mapping[str, str]]


def sampling_to_pb(sampling: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids))
    for name in ("temperature", "top_k", "top_p", "seed", "max_tokens", "min_tokens", "ignore_eos",
                 "num_speculative_tokens"):
        value = getattr(sampling, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def request_to_pb(
    *,
    prompt: str | None,
    messages: Messages | None,
    token_ids: Sequence[int] | None,
    sampling: SamplingParams,
    tier: Tier | str = Tier.ONLINE,
    deadline: float | None = None,
    tenant: str = "",
    model: str = "",
    request_id: str = "",
    route_hint: str = "",
) -> pb.GenerateRequest:
    """Builds a GenerateRequest; exactly one of prompt, messages, token_ids must be given."""
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages=, token_ids=")
    req = pb.GenerateRequest(
        model=model,
        route_hint=route_hint,
        sampling=sampling_to_pb(sampling),
        tier=_TIER_TO_PB[Tier(tier)],
        tenant=tenant,
        client_request_id=request_id,
    )
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        assert messages is not None
        for message in map(ChatMessage.coerce, messages):
            req.chat.messages.add(role=_ROLE_TO_PB[message.role], content=message.content)
    if deadline is not None:
        if deadline <= 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline}")
        req.ttft_deadline.FromNanoseconds(int(deadline * 1e9))
    return req


def batch_request_to_pb(request: BatchRequest) -> pb.GenerateRequest:
    return request_to_pb(
        prompt=request.prompt,
        messages=request.messages,
        token_ids=request.token_ids,
        sampling=request.sampling,
        tier=Tier.OFFLINE,
        model=request.model,
        request_id=request.id,
    )


_ROLE_FROM_PB = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}


def batch_request_from_pb(req: pb.GenerateRequest) -> BatchRequest:
    """The SDK's form of a parsed JSONL line (ValueError for out-of-range sampling values)."""
    s = req.sampling
    sampling = SamplingParams(
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        **{name: getattr(s, name)
           for name in ("temperature", "top_k", "top_p", "seed", "max_tokens", "min_tokens",
                        "ignore_eos")
           if s.HasField(name)},
    )
    which = req.WhichOneof("prompt")
    return BatchRequest(
        id=req.client_request_id,
        prompt=req.text if which == "text" else None,
        messages=tuple(ChatMessage(_ROLE_FROM_PB[m.role], m.content) for m in req.chat.messages)
        if which == "chat" else None,
        token_ids=tuple(req.token_ids.ids) if which == "token_ids" else None,
        sampling=sampling,
        model=req.model,
    )


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def usage_from_pb(u: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
        draft_tokens_proposed=u.draft_tokens_proposed,
        draft_tokens_accepted=u.draft_tokens_accepted,
        speculative_steps=u.speculative_steps,
        drafter=u.drafter,
    )


def timing_from_pb(t: pb.Timing) -> Timing:
    return Timing(
        queue_s=_seconds(t.queue_time) if t.HasField("queue_time") else None,
        ttft_s=_seconds(t.ttft) if t.HasField("ttft") else None,
        total_s=_seconds(t.total_time) if t.HasField("total_time") else None,
        preemptions=t.preemptions,
    )


def chunk_from_pb(resp: pb.GenerateResponse, request_id: str) -> Chunk:
    finish = _FINISH_FROM_PB.get(resp.finish_reason)
    return Chunk(
        request_id=request_id,
        token_ids=tuple(resp.token_ids),
        text=resp.text,
        finish_reason=finish,
        usage=usage_from_pb(resp.usage) if finish is not None else None,
        timing=timing_from_pb(resp.timing) if finish is not None else None,
        model=resp.model,
    )


def _timestamp(ts: timestamp_pb2.Timestamp, present: bool) -> float | None:
    return ts.seconds + ts.nanos / 1e9 if present else None


def job_from_pb(job: pb.BatchJob) -> BatchJob:
    return BatchJob(
        id=job.id,
        state=_JOB_STATE_FROM_PB.get(job.state, JobState.QUEUED),
        total=job.total,
        completed=job.completed,
        failed=job.failed,
        cancelled=job.cancelled,
        completion_tokens=job.completion_tokens,
        created_at=_timestamp(job.created_at, job.HasField("created_at")),
        finished_at=_timestamp(job.finished_at, job.HasField("finished_at")),
        tenant=job.tenant,
        labels=dict(job.labels),
        expired=job.expired,
        expires_at=_timestamp(job.expires_at, job.HasField("expires_at")),
        started_at=_timestamp(job.started_at, job.HasField("started_at")),
        error=job.error,
    )


def result_from_pb(result: pb.BatchResult) -> BatchResult:
    has_error = result.HasField("error") and result.error.code != 0
    return BatchResult(
        index=result.index,
        request_id=result.client_request_id,
        text=result.text,
        token_ids=tuple(result.token_ids),
        finish_reason=_FINISH_FROM_PB.get(result.finish_reason),
        usage=usage_from_pb(result.usage),
        timing=timing_from_pb(result.timing),
        error=error_from_status(result.error.code, result.error.message) if has_error else None,
        url=result.url,
        model=result.model,
        finished_at=_timestamp(result.finished_at, result.HasField("finished_at")),
    )


def model_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        backend=m.backend,
        architecture=m.architecture,
        weight_quant=m.weight_quant,
        kv_cache_dtype=m.kv_cache_dtype,
        max_batch_size=m.max_batch_size,
        max_seq_len=m.max_seq_len,
        vocab_size=m.vocab_size,
        has_draft=m.has_draft,
        parameter_count=m.parameter_count,
        tpot_slo_ms=m.tpot_slo_ms or None,
        ttft_slo_ms=m.ttft_slo_ms or None,
        has_chat_template=m.has_chat_template,
        drafter=m.drafter,
        max_draft_len=m.max_draft_len,
    )


def stats_from_pb(s: pb.GetStatsResponse) -> Stats:
    tiers = {
        _TIER_FROM_PB[t.tier]: TierStats(
            tier=_TIER_FROM_PB[t.tier],
            running=t.running,
            queued=t.queued,
            requests_finished=t.requests_finished,
            generated_tokens=t.generated_tokens,
            preemptions=t.preemptions,
            tokens_per_second=t.tokens_per_second,
            slo_judged=t.slo_judged,
            ttft_slo_met=t.ttft_slo_met,
            tpot_slo_met=t.tpot_slo_met,
            both_slo_met=t.both_slo_met,
        )
        for t in s.tiers
        if t.tier in _TIER_FROM_PB
    }
    return Stats(
        tiers=tiers,
        slots_total=s.slots_total,
        slots_free=s.slots_free,
        kv_blocks_total=s.kv_blocks_total,
        kv_blocks_used=s.kv_blocks_used,
        kv_blocks_cached=s.kv_blocks_cached,
        prefix_cache_hit_ratio=s.prefix_cache_hit_ratio,
        slot_occupancy=s.slot_occupancy,
        tokens_per_second=s.tokens_per_second,
        utilization=s.utilization,
        cost_per_million_tokens=s.cost_per_million_tokens,
        uptime_s=_seconds(s.uptime),
        steps=s.steps,
        draining=s.draining,
        step_budget=_step_budget(s.step_budget) if s.HasField("step_budget") else None,
    )


def _step_budget(b: pb.StepBudget) -> StepBudget:
    return StepBudget(
        tpot_slo_ms=b.tpot_slo_ms or None,
        ttft_slo_ms=b.ttft_slo_ms or None,
        online_present=b.online_present,
        offline_held_back=b.offline_held_back,
        predicted_step_ms=b.predicted_step_ms,
        step_prediction_error=b.step_prediction_error,
        steps_observed=b.steps_observed,
        step_budget_ms=b.step_budget_ms or None,
    )
