"""/v1/files and /v1/batches over the durable job store (server/jobs): a batch is a job whose
input is an uploaded file, run on the OFFLINE tier; its output and error files are read from
the job's results as they are written."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from backfill.openai_body import OPENAI_URLS
from backfill.openai_output import BatchItem, UsageCounts, batch_result_line
from backfill.v1 import inference_pb2 as pb
from server.api.http.auth import caller_of, request_tenant
from server.api.http.body import read_json
from server.api.http.errors import exception_response, invalid, not_found
from server.api.http.files import FileRecord, FileStore
from server.api.identity import tenant_for
from server.api.validation import check_label, check_labels
from server.jobs import Jobs
from server.jobs.store import JobRecord, JobState

# Labels the batch keeps about itself (hidden from its metadata).
ENDPOINT_LABEL = "openai.endpoint"
INPUT_LABEL = "openai.input_file_id"
_OUTPUT, _ERRORS = "file-out-", "file-err-"
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_STATUS = {
    JobState.VALIDATING: "validating",
    JobState.QUEUED: "in_progress",
    JobState.RUNNING: "in_progress",
    JobState.FINALIZING: "finalizing",
    JobState.CANCELLING: "cancelling",
    JobState.COMPLETED: "completed",
    JobState.FAILED: "failed",
    JobState.EXPIRED: "expired",
    JobState.CANCELLED: "cancelled",
}
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class Batches:
    def __init__(self, jobs: Jobs, files: FileStore, max_body_bytes: int) -> None:
        self._jobs = jobs
        self._files = files
        self._max_body = max_body_bytes

    # ---- files ------------------------------------------------------------------------------

    async def upload_file(self, request: Request) -> Response:
        try:
            tenant = request_tenant(request)
            async with request.form() as form:
                upload, purpose = form.get("file"), form.get("purpose")
                if upload is None or isinstance(upload, str):
                    return invalid("file: a multipart file field is required")
                if purpose != "batch":
                    return invalid(f"purpose: only 'batch' is supported, got {purpose!r}")
                check_label(upload.filename or "", "file.filename")
                source = upload.file
                record = await asyncio.to_thread(
                    self._files.create, tenant, upload.filename or "upload.jsonl", "batch",
                    iter(lambda: source.read(1 << 20), b""),
                )
        except Exception as exc:
            return exception_response(exc)
        return _json(record.to_json())

    async def list_files(self, request: Request) -> Response:
        try:
            records = await asyncio.to_thread(self._files.list, request_tenant(request))
        except Exception as exc:
            return exception_response(exc)
        return _json({"object": "list", "data": [r.to_json() for r in records],
                      "has_more": False})

    async def get_file(self, request: Request) -> Response:
        try:
            record = await self._file(request)
        except Exception as exc:
            return exception_response(exc)
        if record is None:
            return await self._batch_file(request, content=False)
        return _json(record.to_json())

    async def file_content(self, request: Request) -> Response:
        try:
            record = await self._file(request)
        except Exception as exc:
            return exception_response(exc)
        if record is None:
            return await self._batch_file(request, content=True)
        return StreamingResponse(_in_thread(self._files.read(record)),
                                 media_type="application/jsonl")

    async def delete_file(self, request: Request) -> Response:
        try:
            record = await self._file(request)
        except Exception as exc:
            return exception_response(exc)
        if record is None:
            return not_found(f"file_id: no file {request.path_params['file_id']!r}")
        await asyncio.to_thread(self._files.delete, record)
        return _json({"id": record.id, "object": "file", "deleted": True})

    async def _file(self, request: Request) -> FileRecord | None:
        tenant = request_tenant(request)
        return await asyncio.to_thread(self._files.get, tenant, request.path_params["file_id"])

    async def _batch_file(self, request: Request, *, content: bool) -> Response:
        """A batch's output or error file: its results, read from the job store."""
        file_id = request.path_params["file_id"]
        errors = file_id.startswith(_ERRORS)
        job_id = file_id.removeprefix(_ERRORS if errors else _OUTPUT)
        if job_id == file_id:
            return not_found(f"file_id: no file {file_id!r}")
        try:
            tenant = request_tenant(request)
            job = await self._jobs.get(tenant, job_id)
        except Exception:
            return not_found(f"file_id: no file {file_id!r}")
        if not content:
            return _json({"id": file_id, "object": "file", "bytes": None,
                          "created_at": int(job.created_at), "purpose": "batch_output",
                          "filename": f"batch_{job_id}_{'error' if errors else 'output'}.jsonl",
                          "status": "processed"})
        lines = self._result_lines(tenant, job_id, errors)
        return StreamingResponse(lines, media_type="application/jsonl")

    async def _result_lines(self, tenant: str, job_id: str, errors: bool
                            ) -> AsyncIterator[bytes]:
        async for result in self._jobs.results(tenant, job_id, 0):
            if result.HasField("error") == errors:
                yield json.dumps(batch_result_line(job_id, _item(result))).encode() + b"\n"

    # ---- batches ----------------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        try:
            body = await read_json(request, self._max_body)
            if not isinstance(body, dict):
                return invalid("body must be a JSON object")
            tenant = request_tenant(request)
            endpoint = body.get("endpoint")
            if endpoint not in OPENAI_URLS:
                return invalid(f"endpoint must be one of {', '.join(OPENAI_URLS)}, "
                               f"got {endpoint!r}")
            window = _window(body.get("completion_window", "24h"))
            if window is None:
                return invalid("completion_window must be a duration such as '24h'")
            record = await asyncio.to_thread(self._files.get, tenant,
                                             str(body.get("input_file_id")))
            if record is None:
                return not_found(f"input_file_id: no file {body.get('input_file_id')!r}")
            labels = _labels(body.get("metadata"))
            if labels is None:
                return invalid("metadata must be an object of strings")
            check_labels(labels, "metadata")
            labels |= {ENDPOINT_LABEL: endpoint, INPUT_LABEL: record.id}
            caller = caller_of(request)
            job = await self._jobs.upload(self._messages(tenant, labels, window, record),
                                          functools.partial(tenant_for, caller), caller.limits)
        except Exception as exc:
            return exception_response(exc)
        return _json(batch_json(job))

    async def _messages(self, tenant: str, labels: dict[str, str], window_s: float,
                        record: FileRecord) -> AsyncIterator[pb.UploadBatchRequest]:
        window = Duration()
        window.FromNanoseconds(int(window_s * 1e9))
        yield pb.UploadBatchRequest(header=pb.UploadBatchHeader(
            tenant=tenant, labels=labels, completion_window=window))
        async for data in _in_thread(self._files.read(record)):
            yield pb.UploadBatchRequest(data=data)

    async def get_batch(self, request: Request) -> Response:
        try:
            job = await self._jobs.get(request_tenant(request),
                                       request.path_params["batch_id"])
        except Exception as exc:
            return exception_response(exc)
        return _json(batch_json(job))

    async def cancel_batch(self, request: Request) -> Response:
        try:
            job = await self._jobs.cancel(request_tenant(request),
                                          request.path_params["batch_id"])
        except Exception as exc:
            return exception_response(exc)
        return _json(batch_json(job))

    async def list_batches(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "20"))
            page = await self._jobs.list_jobs(request_tenant(request), limit,
                                              request.query_params.get("after", ""))
        except ValueError as exc:
            return exception_response(exc)
        data = [batch_json(job) for job in page.jobs]
        return _json({"object": "list", "data": data, "has_more": page.has_more,
                      "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None})


def batch_json(job: JobRecord) -> dict[str, Any]:
    """A job as OpenAI's Batch object."""
    labels = dict(job.labels)
    endpoint, input_file = labels.pop(ENDPOINT_LABEL, ""), labels.pop(INPUT_LABEL, "")
    failed = job.failed + job.cancelled + job.expired
    ended = {JobState.COMPLETED: "completed_at", JobState.FAILED: "failed_at",
             JobState.EXPIRED: "expired_at", JobState.CANCELLED: "cancelled_at"}
    out: dict[str, Any] = {
        "id": job.id, "object": "batch", "endpoint": endpoint, "errors": None,
        "input_file_id": input_file, "completion_window": "24h",
        "status": _STATUS[job.state],
        "output_file_id": _OUTPUT + job.id if job.terminal else None,
        "error_file_id": _ERRORS + job.id if job.terminal and failed else None,
        "created_at": int(job.created_at),
        "in_progress_at": None if job.started_at is None else int(job.started_at),
        "expires_at": int(job.expires_at),
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": job.total, "completed": job.completed, "failed": failed},
        "metadata": labels or None,
    }
    if job.state in ended and job.finished_at is not None:
        out[ended[job.state]] = int(job.finished_at)
    if job.error:
        out["errors"] = {"object": "list", "data": [{"code": "failed", "message": job.error}]}
    return out


def _item(r: pb.BatchResult) -> BatchItem:
    u = r.usage
    code = grpc.StatusCode.UNKNOWN
    for c in grpc.StatusCode:
        if c.value[0] == r.error.code:
            code = c
    return BatchItem(
        index=r.index, custom_id=r.client_request_id, url=r.url, model=r.model, text=r.text,
        finish=_FINISH.get(r.finish_reason),
        usage=UsageCounts(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens,
                          u.draft_tokens_proposed, u.draft_tokens_accepted),
        finished_at=r.finished_at.seconds if r.HasField("finished_at") else None,
        ran=bool(r.token_ids),
        error_code=code.name if r.HasField("error") else None,
        error_message=r.error.message,
    )


def _window(value: Any) -> float | None:
    match = _WINDOW.match(value) if isinstance(value, str) else None
    return None if match is None else int(match.group(1)) * _UNIT_S[match.group(2)]


def _labels(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        return None
    return dict(metadata)


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking iterator read on a worker thread, piece by piece."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


def _json(obj: dict[str, Any]) -> Response:
    return Response(json.dumps(obj), media_type="application/json")
