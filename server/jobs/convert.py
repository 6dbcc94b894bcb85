"""Job records ↔ protobuf: what GetBatch and StreamBatchResults send, and the serialized
``BatchResult`` the store keeps per finished request."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from backfill.v1 import inference_pb2 as pb
from server.api.convert import fill_timing, fill_usage, finish_reason
from server.api.errors import status_for_outcome
from server.jobs.store import ItemResult, JobRecord, JobState, Outcome, StoredResult
from server.scheduler.types import Outcome as SchedOutcome
from server.scheduler.types import SchedEvent

STATE_TO_PB = {
    JobState.VALIDATING: pb.BATCH_STATE_VALIDATING,
    JobState.QUEUED: pb.BATCH_STATE_QUEUED,
    JobState.RUNNING: pb.BATCH_STATE_RUNNING,
    JobState.FINALIZING: pb.BATCH_STATE_FINALIZING,
    JobState.CANCELLING: pb.BATCH_STATE_CANCELLING,
    JobState.COMPLETED: pb.BATCH_STATE_COMPLETED,
    JobState.FAILED: pb.BATCH_STATE_FAILED,
    JobState.EXPIRED: pb.BATCH_STATE_EXPIRED,
    JobState.CANCELLED: pb.BATCH_STATE_CANCELLED,
}
_SUCCESS = frozenset({SchedOutcome.STOP, SchedOutcome.LENGTH})
# Requests that ended without running: the status their result carries.
_DROPPED = {
    Outcome.CANCELLED: (grpc.StatusCode.CANCELLED, "cancelled: the job was cancelled"),
    Outcome.EXPIRED: (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "expired: the job's completion window ended before this request ran",
    ),
}


def timestamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def job_to_pb(job: JobRecord) -> pb.BatchJob:
    out = pb.BatchJob(
        id=job.id,
        state=STATE_TO_PB[job.state],
        total=job.total,
        completed=job.completed,
        failed=job.failed,
        cancelled=job.cancelled,
        expired=job.expired,
        completion_tokens=job.completion_tokens,
        created_at=timestamp(job.created_at),
        expires_at=timestamp(job.expires_at),
        tenant=job.tenant,
        labels=dict(job.labels),
        error=job.error,
    )
    if job.started_at is not None:
        out.started_at.CopyFrom(timestamp(job.started_at))
    if job.finished_at is not None:
        out.finished_at.CopyFrom(timestamp(job.finished_at))
    return out


def stored_to_pb(stored: StoredResult) -> pb.BatchResult:
    """A finished request as sent; one that never ran gets a result carrying why."""
    out = pb.BatchResult()
    if stored.result is not None:
        out.ParseFromString(stored.result)
        return out
    out.index = stored.index
    out.client_request_id = stored.custom_id or str(stored.index)
    out.url = stored.url
    out.model = stored.model
    out.finish_reason = pb.FINISH_REASON_CANCELLED
    code, message = _DROPPED.get(stored.outcome, (grpc.StatusCode.UNKNOWN, "no result"))
    out.error.code, out.error.message = code.value[0], message
    if stored.finished_at is not None:
        out.finished_at.CopyFrom(timestamp(stored.finished_at))
    return out


def request_result(
    *,
    job_id: str,
    index: int,
    custom_id: str,
    url: str,
    model: str,
    event: SchedEvent,
    token_ids: list[int],
    text: str,
    stopped_as: Outcome,
    at: float,
) -> ItemResult:
    """The stored result of a request that ran: ``event`` is its final event, token_ids and text
    everything it produced. ``stopped_as`` is how a CANCELLED request counts (the job was
    cancelled, or it expired)."""
    assert event.outcome is not None
    out = pb.BatchResult(
        index=index, client_request_id=custom_id or str(index), url=url, model=model,
        text=text, token_ids=token_ids, finished_at=timestamp(at),
    )
    out.finish_reason = finish_reason(event.outcome)
    if event.usage is not None:
        fill_usage(out.usage, event.usage)
    if event.timing is not None:
        fill_timing(out.timing, event.timing)
    if event.outcome in _SUCCESS:
        outcome = Outcome.COMPLETED
    else:
        outcome = stopped_as if event.outcome is SchedOutcome.CANCELLED else Outcome.FAILED
        code, message = _DROPPED.get(outcome) or status_for_outcome(event) or (
            grpc.StatusCode.UNKNOWN, "failed")
        out.error.code, out.error.message = code.value[0], message
    return ItemResult(job_id, index, outcome, out.SerializeToString(), len(token_ids), at)


def failed_result(
    *,
    job_id: str,
    index: int,
    custom_id: str,
    url: str,
    model: str,
    code: grpc.StatusCode,
    message: str,
    at: float,
) -> ItemResult:
    """The stored result of a request that could not run (an invalid line, an engine that
    refuses it)."""
    out = pb.BatchResult(
        index=index, client_request_id=custom_id or str(index), url=url, model=model,
        finish_reason=pb.FINISH_REASON_ERROR, finished_at=timestamp(at),
        error=pb.Status(code=code.value[0], message=message),
    )
    return ItemResult(job_id, index, Outcome.FAILED, out.SerializeToString(), 0, at)
