"""Offline batch jobs on the client: the JSONL input (Backfill's format or OpenAI's Batch format,
both described in ``backfill.batch_format``) streamed in pieces, and results written as JSONL in
either format.

>>> parse_request({"id": "a", "prompt": "Hi", "max_tokens": 4}).sampling.max_tokens
4
>>> from client.types import Timing, Usage
>>> result = BatchResult(0, "r1", "Bonjour", (5, 6), FinishReason.STOP, Usage(3, 2), Timing(),
...                      url="/v1/chat/completions", model="m")
>>> line = openai_line("job1", result)
>>> line["response"]["body"]["choices"][0]["message"]["content"], line["error"]
('Bonjour', None)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Union

from backfill.batch_format import LineError, is_request_line, parse_line
from backfill.openai_output import BatchItem, UsageCounts, batch_result_line
from client import _convert
from client.types import BatchRequest, BatchResult, FinishReason, SamplingParams

RequestLike = Union[BatchRequest, str, Mapping[str, Any]]  # noqa: UP007 (runtime alias, 3.10)

CHUNK_BYTES = 1 << 20  # one upload message: far below any gRPC message limit
_OPENAI_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def parse_request(obj: Mapping[str, Any], index: int = 0) -> BatchRequest:
    """One JSONL object (either format) to a BatchRequest; ValueError naming the problem."""
    try:
        parsed = parse_line(obj)
        request = _convert.batch_request_from_pb(parsed.request)
    except (LineError, ValueError, TypeError) as exc:
        raise ValueError(f"request {index}: {exc}") from exc
    return request if request.id else _with_id(request, str(index))


def _with_id(request: BatchRequest, request_id: str) -> BatchRequest:
    return BatchRequest(request_id, request.prompt, request.messages, request.token_ids,
                        request.sampling, request.model)


def load_jsonl(path: str | os.PathLike[str]) -> list[BatchRequest]:
    """Reads a whole JSONL file of requests into memory, checking every line (for small files;
    ``submit_batch`` streams a file of any size instead)."""
    requests: list[BatchRequest] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not is_request_line(line):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            try:
                requests.append(parse_request(obj, len(requests)))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from exc
    return requests


def request_to_json(request: RequestLike, index: int) -> Mapping[str, Any]:
    """A request as one line of Backfill's format (a mapping passes through unchanged, so the
    server checks it like a line of a file)."""
    if isinstance(request, str):
        return {"id": str(index), "prompt": request}
    if not isinstance(request, BatchRequest):
        return request
    out: dict[str, Any] = {"id": request.id or str(index)}
    if request.prompt is not None:
        out["prompt"] = request.prompt
    elif request.messages is not None:
        out["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        out["token_ids"] = list(request.token_ids or ())
    if request.model:
        out["model"] = request.model
    out.update(_sampling_json(request.sampling))
    return out


def _sampling_json(s: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed",
                 "ignore_eos"):
        value = getattr(s, name)
        if value is not None:
            out[name] = value
    if s.stop:
        out["stop"] = list(s.stop)
    if s.stop_token_ids:
        out["stop_token_ids"] = list(s.stop_token_ids)
    return out


def file_chunks(path: str | os.PathLike[str], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A file's bytes in pieces (lines may be split; the server joins them)."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def request_chunks(requests: Iterable[RequestLike], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Requests as JSONL, in pieces of about ``size`` bytes, one request at a time."""
    pending: list[bytes] = []
    held = 0
    for index, request in enumerate(requests):
        line = json.dumps(request_to_json(request, index), ensure_ascii=False).encode() + b"\n"
        pending.append(line)
        held += len(line)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


# ---- results ---------------------------------------------------------------------------------


def result_line(job_id: str, result: BatchResult) -> dict[str, Any]:
    """A result in the format its request came in: OpenAI's for a line in OpenAI's format."""
    return openai_line(job_id, result) if result.url else result_to_json(result)


def result_to_json(result: BatchResult) -> dict[str, Any]:
    """A result as one line of Backfill's output format."""
    out: dict[str, Any] = {
        "index": result.index,
        "id": result.request_id,
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason.value if result.finish_reason else None,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "cached_prompt_tokens": result.usage.cached_prompt_tokens,
        },
    }
    if result.error is not None:
        out["error"] = {"code": result.error.code.name, "message": result.error.details}
    return out


def openai_line(job_id: str, result: BatchResult) -> dict[str, Any]:
    """A result as one line of an OpenAI Batch output (or error) file."""
    u, error = result.usage, result.error
    finish = _OPENAI_FINISH.get(result.finish_reason) if result.finish_reason else None
    return batch_result_line(job_id, BatchItem(
        index=result.index, custom_id=result.request_id, url=result.url, model=result.model,
        text=result.text, finish=finish,
        usage=UsageCounts(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens,
                          u.draft_tokens_proposed, u.draft_tokens_accepted),
        finished_at=result.finished_at, ran=bool(result.token_ids),
        error_code=None if error is None else error.code.name,
        error_message="" if error is None else error.details,
    ))
