"""POST /v1/completions and /v1/chat/completions: parse the body (backfill/openai_body.py),
validate and convert it as gRPC does (server/api/convert.py), submit its choices, and answer
with one JSON body or a server-sent event stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backfill.openai_body import CHAT_URL, COMPLETIONS_URL, BodyError, OpenAIBody, parse_body
from backfill.openai_output import (
    CHAT_CHUNK_OBJECT,
    TEXT_OBJECT,
    chat_choice,
    completion_body,
    error_body,
    text_choice,
    usage_json,
)
from server.api.choices import Choices, combined_usage
from server.api.errors import Status, http_status, status_for_outcome
from server.api.http.auth import caller_of
from server.api.http.body import BodyTooLargeError, read_json
from server.api.http.errors import error_response, exception_response, invalid
from server.api.http.format import (
    FINISH,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    usage_counts,
)
from server.api.identity import http_tenant
from server.api.models import ModelRegistry, Route
from server.api.streams import Admission
from server.executor.base import TokenLogprob
from server.metrics import RequestMetrics
from server.quotas import TenantQuotas
from server.scheduler.types import DrainingError, SchedEvent, SchedRequest, Usage
from server.tenant_metrics import TenantMetrics

PRIORITY_HEADER = "x-backfill-priority"  # the tier, when the body has no "priority"
_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class _Choice:
    """What one choice produced so far (a whole response collects it all)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish: str | None = None
    usage: Usage | None = None
    started: bool = False  # a streamed chunk went out (chat: the role; echo: the prompt)


@dataclass(slots=True)
class _Call:
    body: OpenAIBody
    model: Route  # the model serving it (settled before its first event)
    request: SchedRequest
    choices: Choices
    id: str
    created: int
    state: list[_Choice]

    @property
    def chat(self) -> bool:
        return self.body.url == CHAT_URL


class Generation:
    def __init__(self, models: ModelRegistry, metrics: RequestMetrics,
                 serving: Callable[[], bool], *, quotas: TenantQuotas, tenants: TenantMetrics,
                 max_body_bytes: int) -> None:
        self._models = models
        self._metrics = metrics
        self._serving = serving
        self._quotas = quotas
        self._tenants = tenants
        self._max_body = max_body_bytes
        self._texts = {m.name: TokenTexts(m.spec.tokenizer) for m in models}

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, COMPLETIONS_URL)

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, CHAT_URL)

    async def _handle(self, request: Request, url: str) -> Response:
        try:
            call = await self._start(request, url)
        except BodyTooLargeError as exc:
            return exception_response(exc)
        except BodyError as exc:
            return invalid(str(exc))
        except Exception as exc:
            return exception_response(exc)
        if call.body.stream:
            return EventStream(self._stream(call), call.choices.cancel)
        return await self._whole(call, request)

    async def _start(self, request: Request, url: str) -> _Call:
        if not self._serving():
            raise DrainingError()
        caller = caller_of(request)
        tenant = http_tenant(caller, request.headers)
        body = await read_json(request, self._max_body)
        if not isinstance(body, dict):
            raise BodyError("body must be a JSON object")
        parsed = parse_body(url, body)
        req = parsed.request
        if "priority" not in body and PRIORITY_HEADER in request.headers:
            header_body = {"priority": _header_priority(request.headers[PRIORITY_HEADER])}
            req.tier = parse_body(url, {**body, **header_body}).request.tier
        target = self._models.resolve(req.model)
        prepared = await target.prepare_async(req, tenant=tenant, weight=caller.limits.weight)
        admission = Admission(self._metrics, self._tenants, self._quotas, caller.limits)
        choices = Choices.submit(prepared.route, prepared.request, req.n, admission)
        prefix = "chatcmpl" if url == CHAT_URL else "cmpl"
        return _Call(parsed, prepared.route, prepared.request, choices,
                     f"{prefix}-{uuid.uuid4().hex}", int(time.time()),
                     [_Choice() for _ in range(max(1, req.n))])

    def _texts_of(self, call: _Call) -> TokenTexts:
        """Token texts in the vocabulary of the model serving the call."""
        return self._texts[call.model.name]

    # ---- a whole response -------------------------------------------------------------------

    async def _whole(self, call: _Call, request: Request) -> Response:
        # A client that goes away before its whole response is ready frees what it held.
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, call.choices.cancel))
        try:
            while (ready := await call.choices.next()) is not None:
                for index, event in ready:
                    status = status_for_outcome(event)
                    if status is not None:
                        return error_response(status)
                    _collect(call.state[index], event)
        finally:
            watcher.cancel()
            if not call.choices.finished:
                call.choices.cancel()
        return _json(self._whole_body(call))

    def _whole_body(self, call: _Call) -> dict[str, Any]:
        choices = []
        for index, c in enumerate(call.state):
            text = "".join(c.text)
            if call.chat:
                lp = chat_logprobs(self._texts_of(call), c.logprobs) if call.body.logprobs else None
                choices.append(chat_choice(index, text, c.finish, lp))
                continue
            logprobs = c.logprobs
            if call.body.echo:
                text = self._prompt_text(call) + text
                logprobs = [*self._prompt_logprobs(call), *logprobs]
            lp = None
            if call.body.logprobs:
                lp = completion_logprobs(self._texts_of(call), logprobs, self._first_token(call))
            choices.append(text_choice(index, text, c.finish, lp))
        usage = combined_usage([c.usage for c in call.state if c.usage is not None])
        return completion_body(chat=call.chat, id=call.id, created=call.created,
                               model=call.model.name, choices=choices,
                               usage=usage_counts(usage))

    # ---- a stream ---------------------------------------------------------------------------

    async def _stream(self, call: _Call) -> AsyncIterator[bytes]:
        try:
            while (ready := await call.choices.next()) is not None:
                out = []
                for index, event in ready:
                    status = status_for_outcome(event)
                    if status is not None:
                        yield _sse(_stream_error(status)) + _DONE
                        return
                    out.append(_sse(self._chunk(call, index, event)))
                yield b"".join(out)
            if call.body.include_usage:
                usage = combined_usage([c.usage for c in call.state if c.usage is not None])
                yield _sse(self._envelope(call, [], usage_json(usage_counts(usage))))
            yield _DONE
        finally:
            if not call.choices.finished:
                call.choices.cancel()

    def _chunk(self, call: _Call, index: int, event: SchedEvent) -> dict[str, Any]:
        state = call.state[index]
        first = not state.started
        state.started = True
        if event.usage is not None:
            state.usage = event.usage
        finish = FINISH.get(event.outcome) if event.outcome is not None else None
        if call.chat:
            delta: dict[str, Any] = {"content": event.text}
            if first:
                delta = {"role": "assistant", **delta}
            lp = None
            if call.body.logprobs:
                lp = chat_logprobs(self._texts_of(call), event.logprobs or [])
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            text, logprobs = event.text, event.logprobs or []
            first_token = None
            if first and call.body.echo:
                text = self._prompt_text(call) + text
                logprobs = [*self._prompt_logprobs(call, event), *logprobs]
                first_token = self._first_token(call)
            lp = None
            if call.body.logprobs:
                lp = completion_logprobs(self._texts_of(call), logprobs, first_token)
            choice = text_choice(index, text, finish, lp)
        return self._envelope(call, [choice])

    def _envelope(self, call: _Call, choices: list[dict[str, Any]],
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {"id": call.id, "object": CHAT_CHUNK_OBJECT if call.chat else TEXT_OBJECT,
               "created": call.created, "model": call.model.name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    # ---- echo -------------------------------------------------------------------------------

    def _prompt_text(self, call: _Call) -> str:
        req = call.body.request
        if req.WhichOneof("prompt") == "text":
            return req.text
        return call.model.spec.tokenizer.decode(call.request.prompt_token_ids)

    def _prompt_logprobs(self, call: _Call, event: SchedEvent | None = None
                         ) -> list[TokenLogprob]:
        """Choice 0 scores the prompt for every choice (server/api/choices.py)."""
        if event is not None and event.prompt_logprobs is not None:
            call.state[0].prompt_logprobs = event.prompt_logprobs
        return call.state[0].prompt_logprobs or []

    def _first_token(self, call: _Call) -> int | None:
        return call.request.prompt_token_ids[0] if call.body.echo else None


def _collect(state: _Choice, event: SchedEvent) -> None:
    state.text.append(event.text)
    if event.logprobs:
        state.logprobs += event.logprobs
    if event.prompt_logprobs is not None:
        state.prompt_logprobs = event.prompt_logprobs
    if event.outcome is not None:
        state.finish = FINISH.get(event.outcome)
        state.usage = event.usage




class EventStream(Response):
    """Server-sent events. Not Starlette's StreamingResponse: under ASGI 2.3 (uvicorn's) that
    runs an anyio task group per response to watch for a disconnect, which cost more than the
    rest of a short request; here one plain task watches and calls ``on_disconnect``."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache"})
        self._chunks = chunks
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_watch_disconnect(receive, self._on_disconnect))
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self._chunks.aclose()  # type: ignore[attr-defined]


async def _watch_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    on_disconnect()


def _header_priority(value: str) -> str | int:
    try:
        return int(value)
    except ValueError:
        return value


def _stream_error(status: Status) -> dict[str, Any]:
    code, message = status
    return error_body(message, http_status(code)[1], code.name.lower())


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _json(obj: dict[str, Any]) -> Response:
    return Response(json.dumps(obj), media_type="application/json")
