"""One ``Session`` stream: many requests multiplexed by client_request_id.

A reader task consumes the client's messages (open a request, cancel one); the handler's own
coroutine is the writer. Streams with pending output queue their id once in ``_ready``; the
writer takes each stream's pending events merged into one response, so a client that reads
slowly gets fewer, larger chunks rather than an ever-growing backlog.

Batching (opt-in, see the proto's SessionRequest): a ``batch`` message starts its requests and
applies its cancels in one go, and from then on the writer sends everything ready when it runs
as one SessionResponse whose ``batch`` holds an item per request: a full stream costs one gRPC
message per write, not one per chunk. Nothing waits to fill a batch; the writer drains what is
queued. A stream whose client never sent a batch gets one response per message, as before.

A request with n > 1 choices stays open until each choice's last chunk went out (chunks name
their choice by ``index``); a choice that fails ends the whole request with its error and
cancels the others.

Errors of one request (bad field, queue full) become an error SessionResponse for that id;
the stream stays up. An error response is the last message for its id, so a request that
reuses the id of an open one ends both: the open one is cancelled (whatever it still had to
send is dropped) and the id gets one INVALID_ARGUMENT error. A client that half-closes still
gets every open request's output; a stream that breaks (the RPC is cancelled) cancels every
request it owns.

A prompt with a lot of text is tokenized on the tokenizer pool (server/api/convert.py) while
the stream goes on reading; the request is submitted when its tokens are ready (a cancel
meanwhile ends it with CANCELLED).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from backfill.v1 import inference_pb2 as pb
from server.api.choices import choice_requests
from server.api.convert import fill_generate_response, needs_tokenizer_pool
from server.api.errors import Status, status_for_exception, status_for_outcome
from server.api.identity import tenant_for
from server.api.models import ModelRegistry, Prepared, Route, Target
from server.api.streams import Admission, RequestStream, submit_to_stream
from server.api.validation import InvalidArgumentError
from server.scheduler.types import SchedEvent
from server.security.auth import Authenticator, Caller

log = logging.getLogger(__name__)

# Initial metadata the servicer sends on every Session: this server accepts batch messages.
BATCH_HEADER = ("backfill-session-batch", "1")


@dataclass(slots=True)
class _Open:
    """A request of this stream that has not ended yet."""

    client_request_id: str
    target: Target  # what the request named
    streams: list[RequestStream]  # one per choice
    route: Route | None = None  # where it runs, once prepared
    open_choices: int = 0  # choices submitted whose final event has not gone out
    sent_first: bool = False
    preparing: asyncio.Task[None] | None = None  # tokenizing on the pool, not submitted yet


class SessionHandler:
    """Serves one Session call; ``run`` is the servicer's response iterator."""

    def __init__(
        self,
        models: ModelRegistry,
        admission: Admission,
        caller: Caller,
        auth: Authenticator | None = None,
        reauthenticate: Callable[[], Caller] | None = None,
    ) -> None:
        """A stream outlives reloads of the keys file: when ``auth``'s file changed since the
        stream's credentials were last checked, the next request checks them again with
        ``reauthenticate`` (a revoked key's new requests are UNAUTHENTICATED; its running
        ones go on; new limits apply)."""
        self._models = models
        self._admission = admission
        self._caller = caller
        self._auth = auth
        self._reauthenticate = reauthenticate
        self._keys = None if auth is None else auth.ring
        self._loop = asyncio.get_running_loop()
        self._open: dict[str, _Open] = {}
        # id(RequestStream) -> (client_request_id, choice index)
        self._by_stream: dict[int, tuple[str, int]] = {}
        self._ready: deque[tuple[str, int]] = deque()  # choices with pending output, once each
        self._errors: deque[tuple[str, Status]] = deque()  # requests refused at the start
        self._wake = asyncio.Event()
        self._input_done = False
        self._batching = False  # the client sent a batch: it reads batched responses

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
                elif kind == "batch":
                    self._batching = True
                    self._start_batch(message.batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream broke mid-read; run's finally cancels what is open
            log.debug("session stream ended with an error", exc_info=True)
        finally:
            self._input_done = True
            self._wake.set()

    def _start_batch(self, batch: pb.SessionRequestBatch) -> None:
        """Starts every request, then applies every cancel (so one message can do both)."""
        for i, req in enumerate(batch.generate):
            self._start(req, f"batch.generate[{i}].")
        for cid in batch.cancel:
            self._cancel(cid)

    def _start(self, req: pb.GenerateRequest, prefix: str = "") -> None:
        cid = req.client_request_id
        try:
            if not cid:
                raise InvalidArgumentError(f"{prefix}client_request_id must be set in a Session")
            if (open_entry := self._open.get(cid)) is not None:
                self._close(open_entry)
                raise InvalidArgumentError(
                    f"{prefix}client_request_id {cid!r} was already open: a Session's open "
                    "requests need distinct ids, and both requests end here"
                )
            self._check_credentials()
            target = self._models.resolve(req.model, prefix)
            tenant = tenant_for(self._caller, req.tenant, prefix + "tenant")
            entry = _Open(cid, target, [])
            if needs_tokenizer_pool(req):
                self._open[cid] = entry
                entry.preparing = asyncio.ensure_future(self._prepare(entry, req, prefix, tenant))
                return
            prepared = target.prepare(req, prefix=prefix, tenant=tenant,
                                      weight=self._admission.limits.weight)
            self._open[cid] = entry
            self._submit(entry, prepared, req.n)
        except Exception as exc:
            self._fail(cid, status_for_exception(exc))

    def _check_credentials(self) -> None:
        if self._auth is None or self._reauthenticate is None or self._auth.ring is self._keys:
            return
        keys = self._auth.ring
        self._caller = self._reauthenticate()  # raises for credentials no longer valid
        self._keys = keys
        self._admission = dataclasses.replace(self._admission, limits=self._caller.limits)

    async def _prepare(
        self, entry: _Open, req: pb.GenerateRequest, prefix: str, tenant: str
    ) -> None:
        """Converts a long prompt off the loop, then submits it (unless it ended meanwhile)."""
        cid = entry.client_request_id
        try:
            prepared = await entry.target.prepare_async(
                req, prefix=prefix, tenant=tenant, weight=self._admission.limits.weight,
            )
        except Exception as exc:
            if self._open.get(cid) is entry:
                del self._open[cid]
                self._fail(cid, status_for_exception(exc))
            return
        if self._open.get(cid) is entry:
            entry.preparing = None
            try:
                self._submit(entry, prepared, req.n)
            except Exception as exc:
                self._fail(cid, status_for_exception(exc))

    def _submit(self, entry: _Open, prepared: Prepared, n: int) -> None:
        """Submits every choice of an entry already in ``_open``; on a refusal, cancels what
        was submitted, forgets the entry and raises."""
        entry.route = prepared.route
        try:
            for index, choice in enumerate(choice_requests(prepared.request, n)):
                stream = RequestStream(self._loop, self._on_ready)
                self._by_stream[id(stream)] = (entry.client_request_id, index)
                entry.streams.append(stream)
                submit_to_stream(prepared.route, choice, stream, self._admission)
                entry.open_choices += 1
        except BaseException:
            self._close(entry)
            raise

    def _close(self, entry: _Open) -> None:
        """Forgets a request and cancels what it still runs (later events are ignored)."""
        del self._open[entry.client_request_id]
        if entry.preparing is not None:
            entry.preparing.cancel()
        for stream in entry.streams:
            del self._by_stream[id(stream)]
        self._cancel_streams(entry)

    def _cancel(self, cid: str) -> None:
        """Cancels an open request; its final response (CANCELLED) follows. Unknown ids are a
        no-op: the request may have finished while the cancel was in flight."""
        entry = self._open.get(cid)
        if entry is None:
            return
        if entry.preparing is not None:  # never submitted: it ends here
            self._close(entry)
            self._fail(cid, (grpc.StatusCode.CANCELLED, "cancelled"))
            return
        self._cancel_streams(entry)

    def _cancel_all(self) -> None:
        for entry in self._open.values():
            if entry.preparing is not None:
                entry.preparing.cancel()
            self._cancel_streams(entry)

    @staticmethod
    def _cancel_streams(entry: _Open) -> None:
        for stream in entry.streams:
            if stream.request_id is not None and not stream.finished and entry.route:
                entry.route.scheduler.cancel(stream.request_id)

    # ---- writing ---------------------------------------------------------------------------

    def _on_ready(self, stream: RequestStream) -> None:
        key = self._by_stream.get(id(stream))
        if key is not None:
            self._ready.append(key)
            self._wake.set()

    def _fail(self, cid: str, status: Status) -> None:
        self._errors.append((cid, status))
        self._wake.set()

    async def _next_response(self) -> pb.SessionResponse | None:
        """The next message to send; None once input is closed and nothing is left open."""
        while True:
            if self._batching and len(self._errors) + len(self._ready) > 1:
                response = self._take_batch()
                if response.batch:
                    return response
            if self._errors:
                response = pb.SessionResponse()
                self._fill_error(response, *self._errors.popleft())
                return response
            while self._ready:
                response = pb.SessionResponse()
                if self._fill(response, self._ready.popleft()):
                    return response
            if self._input_done and not self._open:
                return None
            self._wake.clear()
            await self._wake.wait()

    def _take_batch(self) -> pb.SessionResponse:
        """Everything ready now, one item per request (errors first); possibly empty."""
        response = pb.SessionResponse()
        items = response.batch
        errors, ready = self._errors, self._ready
        while errors:
            self._fill_error(items.add(), *errors.popleft())
        while ready:
            taken = self._take(ready.popleft())
            if taken is not None:
                self._fill_event(items.add(), *taken)
        return response

    @staticmethod
    def _fill_error(response: pb.SessionResponse, cid: str, status: Status) -> None:
        response.client_request_id = cid
        response.error.code = status[0].value[0]
        response.error.message = status[1]

    def _fill(self, response: pb.SessionResponse, key: tuple[str, int]) -> bool:
        """Writes a choice's pending output into ``response``; False when there was none."""
        taken = self._take(key)
        if taken is None:
            return False
        self._fill_event(response, *taken)
        return True

    def _take(self, key: tuple[str, int]) -> tuple[_Open, int, SchedEvent] | None:
        """The choice's open entry, index and pending output merged into one event, if any."""
        cid, index = key
        entry = self._open.get(cid)
        if entry is None:
            return None
        event = entry.streams[index].take()
        return None if event is None else (entry, index, event)

    def _fill_event(
        self, response: pb.SessionResponse, entry: _Open, index: int, event: SchedEvent
    ) -> None:
        cid = entry.client_request_id
        # The first chunk names the model that served (settled before the route's first event).
        model = "" if entry.sent_first or entry.route is None else entry.route.name
        entry.sent_first = True
        response.client_request_id = cid
        # Filled in place: building a GenerateResponse and passing it as chunk= copies it.
        fill_generate_response(
            response.chunk, event, client_request_id=cid, model=model, index=index
        )
        if event.is_final:
            entry.open_choices -= 1
            status = status_for_outcome(event)
            if status is not None or entry.open_choices == 0:
                self._close(entry)
            if status is not None:
                self._fill_error(response, cid, status)
