"""OpenAI response objects (``text_completion``, ``chat.completion``, their streamed chunks,
usage, errors, Batch output lines) built from plain values: the one place that spells them, for
the HTTP surface, the server's batch output files and the SDK's result files alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backfill.openai_body import CHAT_URL

CHAT_OBJECT = "chat.completion"
CHAT_CHUNK_OBJECT = "chat.completion.chunk"
TEXT_OBJECT = "text_completion"


@dataclass(frozen=True, slots=True)
class UsageCounts:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    draft_tokens_proposed: int = 0  # speculative decoding
    draft_tokens_accepted: int = 0


def usage_json(u: UsageCounts) -> dict[str, Any]:
    """OpenAI's usage object. Speculative decoding's drafted tokens, when there were any, go
    where OpenAI reports its Predicted Outputs (``completion_tokens_details``): accepted and
    rejected prediction tokens."""
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }
    if u.draft_tokens_proposed:
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": u.draft_tokens_accepted,
            "rejected_prediction_tokens": u.draft_tokens_proposed - u.draft_tokens_accepted,
        }
    return out


def chat_choice(index: int, text: str, finish: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish}


def text_choice(index: int, text: str, finish: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(*, chat: bool, id: str, created: int, model: str,
                    choices: Sequence[dict[str, Any]], usage: UsageCounts) -> dict[str, Any]:
    """A whole (not streamed) chat.completion or text_completion."""
    return {"id": id, "object": CHAT_OBJECT if chat else TEXT_OBJECT, "created": created,
            "model": model, "choices": list(choices), "usage": usage_json(usage)}


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def batch_output_line(*, request_id: str, custom_id: str, status_code: int,
                      body: dict[str, Any] | None,
                      error: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of a Batch output or error file: a response, or (for a request the batch
    dropped) ``response`` null and an ``error``."""
    response = None if body is None else {"status_code": status_code, "request_id": request_id,
                                          "body": body}
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": response,
            "error": error}


@dataclass(frozen=True, slots=True)
class BatchItem:
    """What a Batch output line says about one finished request."""

    index: int
    custom_id: str
    url: str
    model: str
    text: str
    finish: str | None  # "stop" | "length" | None
    usage: UsageCounts
    finished_at: float | None
    ran: bool  # it produced tokens (a dropped request did not)
    error_code: str | None = None  # a gRPC status code name when it failed
    error_message: str = ""


def batch_result_line(job_id: str, item: BatchItem) -> dict[str, Any]:
    """One line of an OpenAI Batch output (or error) file: a chat.completion or
    text_completion body with usage, or the error."""
    request_id = f"{job_id}-{item.index}"
    code = item.error_code
    if code is None:
        chat = item.url == CHAT_URL
        choice = (chat_choice if chat else text_choice)(0, item.text, item.finish)
        body = completion_body(chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
                               created=int(item.finished_at or 0), model=item.model,
                               choices=[choice], usage=item.usage)
        return batch_output_line(request_id=request_id, custom_id=item.custom_id,
                                 status_code=200, body=body)
    if code in ("CANCELLED", "DEADLINE_EXCEEDED") and not item.ran:
        # Requests the batch dropped (OpenAI's batch_cancelled / batch_expired) never ran.
        name = "batch_expired" if code == "DEADLINE_EXCEEDED" else "batch_cancelled"
        return batch_output_line(request_id=request_id, custom_id=item.custom_id,
                                 status_code=0, body=None,
                                 error={"code": name, "message": item.error_message})
    invalid = code == "INVALID_ARGUMENT"
    body = error_body(item.error_message, "invalid_request_error" if invalid else "server_error",
                      code.lower())
    return batch_output_line(request_id=request_id, custom_id=item.custom_id,
                             status_code=400 if invalid else 500, body=body)
