"""One ``Session`` stream: many requests multiplexed by client_request_id.

A reader task consumes the client's messages (open a request, cancel one); the handler's own
coroutine is the writer. Streams with pending output queue their id once in ``_ready``; the
writer takes each stream's pending events merged into one response, so a client that reads
slowly gets fewer, larger chunks rather than an ever-growing backlog.

Errors of one request (bad field, duplicate id, queue full) become an error SessionResponse
for that id; the stream stays up. A client that half-closes still gets every open request's
output; a stream that breaks (the RPC is cancelled) cancels every request it owns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from backfill.v1 import inference_pb2 as pb
from server.convert import (
    ModelRegistry,
    ServedModel,
    Status,
    fill_generate_response,
    status_for_exception,
    status_for_outcome,
    to_pb_status,
    to_sched_request,
)
from server.metrics import RequestMetrics
from server.streams import RequestStream, submit_to_stream
from server.validation import InvalidArgumentError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Open:
    """A request of this stream that has not ended yet."""

    client_request_id: str
    model: ServedModel
    stream: RequestStream
    sent_first: bool = False


class SessionHandler:
    """Serves one Session call; ``run`` is the servicer's response iterator."""

    def __init__(self, models: ModelRegistry, metrics: RequestMetrics) -> None:
        self._models = models
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._open: dict[str, _Open] = {}
        self._by_stream: dict[int, str] = {}  # id(RequestStream) -> client_request_id
        self._ready: deque[str] = deque()  # ids with pending output, each at most once
        self._errors: deque[pb.SessionResponse] = deque()
        self._wake = asyncio.Event()
        self._input_done = False

    async def run(
        self, requests: AsyncIterable[pb.SessionRequest]
    ) -> AsyncIterator[pb.SessionResponse]:
        reader = asyncio.ensure_future(self._read(requests))
        try:
            while (response := await self._next_response()) is not None:
                yield response
        finally:
            reader.cancel()
            self._cancel_all()

    @property
    def num_open(self) -> int:
        return len(self._open)

    # ---- reading ---------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterable[pb.SessionRequest]) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "generate":
                    self._start(message.generate)
                elif kind == "cancel":
                    self._cancel(message.cancel)
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream broke mid-read; run's finally cancels what is open
            log.debug("session stream ended with an error", exc_info=True)
        finally:
            self._input_done = True
            self._wake.set()

    def _start(self, req: pb.GenerateRequest) -> None:
        cid = req.client_request_id
        try:
            if not cid:
                raise InvalidArgumentError("client_request_id must be set in a Session")
            if cid in self._open:
                raise InvalidArgumentError(f"client_request_id {cid!r} is already open")
            model = self._models.resolve(req.model)
            request = to_sched_request(req, model.spec)
            stream = RequestStream(self._loop, self._on_ready)
            entry = _Open(cid, model, stream)
            self._by_stream[id(stream)] = cid
            self._open[cid] = entry
            try:
                submit_to_stream(model.scheduler, request, stream, self._metrics)
            except BaseException:
                del self._open[cid], self._by_stream[id(stream)]
                raise
        except Exception as exc:
            self._fail(cid, status_for_exception(exc))

    def _cancel(self, cid: str) -> None:
        """Cancels an open request; its final response (CANCELLED) follows. Unknown ids are a
        no-op: the request may have finished while the cancel was in flight."""
        entry = self._open.get(cid)
        if entry is not None and entry.stream.request_id is not None:
            entry.model.scheduler.cancel(entry.stream.request_id)

    def _cancel_all(self) -> None:
        for entry in self._open.values():
            if entry.stream.request_id is not None and not entry.stream.finished:
                entry.model.scheduler.cancel(entry.stream.request_id)

    # ---- writing ---------------------------------------------------------------------------

    def _on_ready(self, stream: RequestStream) -> None:
        cid = self._by_stream.get(id(stream))
        if cid is not None:
            self._ready.append(cid)
            self._wake.set()

    def _fail(self, cid: str, status: Status) -> None:
        self._errors.append(pb.SessionResponse(client_request_id=cid, error=to_pb_status(status)))
        self._wake.set()

    async def _next_response(self) -> pb.SessionResponse | None:
        """The next message to send; None once input is closed and nothing is left open."""
        while True:
            if self._errors:
                return self._errors.popleft()
            while self._ready:
                response = self._take(self._ready.popleft())
                if response is not None:
                    return response
            if self._input_done and not self._open:
                return None
            self._wake.clear()
            await self._wake.wait()

    def _take(self, cid: str) -> pb.SessionResponse | None:
        entry = self._open.get(cid)
        if entry is None:
            return None
        event = entry.stream.take()
        if event is None:
            return None
        model = "" if entry.sent_first else entry.model.name
        entry.sent_first = True
        response = pb.SessionResponse(client_request_id=cid)
        # Filled in place: building a GenerateResponse and passing it as chunk= copies it.
        fill_generate_response(response.chunk, event, client_request_id=cid, model=model)
        if event.is_final:
            del self._open[cid], self._by_stream[id(entry.stream)]
            status = status_for_outcome(event)
            if status is not None:
                code, message = status
                response.error.code = code.value[0]
                response.error.message = message
        return response
