"""The multiplexed ``Session`` stream: one gRPC call carries every request of a client.

One Python gRPC call per request costs far more than one message on an open stream, so the SDK
sends each request as a ``SessionRequest`` on a shared bidirectional stream and routes each
``SessionResponse`` to its caller's inbox by ``client_request_id``. A reader task owns the
receiving side; requests and cancels go out through an outbox drained by the request iterator
that gRPC consumes. Everything here runs on one event loop (the client's), so no locks.

Batching: once the server's initial metadata says it accepts them (``BATCH_HEADER``), every
write carries everything queued since the last one as one ``SessionRequest.batch`` (nothing
waits to fill a batch), which also asks the server for batched responses; the reader unpacks
``SessionResponse.batch``. Until then, and with servers that do not say so, one message per
request or cancel, as the protocol always allowed.

If the stream breaks, every in-flight request fails with the mapped error, and the next request
opens a fresh stream (the server cancels the requests of a broken stream, so nothing runs twice).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client.errors import (
    BackfillError,
    Cancelled,
    Unavailable,
    error_from_rpc,
    error_from_status,
    message_too_large,
)

Metadata = Sequence[tuple[str, str]]
# The server's initial metadata on a Session that accepts SessionRequest.batch (the proto).
BATCH_HEADER = ("backfill-session-batch", "1")
# An outbox item: a request to start, or the client_request_id of one to cancel.
_Outgoing = pb.GenerateRequest | str
# What wrapping an item in a SessionRequest (or its batch) adds: field tags and length prefixes.
_ITEM_OVERHEAD_BYTES = 16


class Source(Protocol):
    """Where one request's responses come from (a Session inbox or a unary Generate call)."""

    async def next(self) -> pb.GenerateResponse:
        """The next chunk; raises a BackfillError when the request failed."""
        ...

    def cancel(self) -> None:
        """Stops the request (idempotent, never blocks)."""
        ...


class _Inbox:
    """One request's pending responses; a deque plus one waiter is cheaper than asyncio.Queue."""

    __slots__ = ("_items", "_session", "_waiter", "request_id")

    def __init__(self, session: Session, request_id: str) -> None:
        self.request_id = request_id
        self._session = session
        self._items: deque[pb.SessionResponse | BackfillError] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: pb.SessionResponse | BackfillError) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> pb.GenerateResponse:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BackfillError):
            raise item
        if item.HasField("error") and item.error.code != 0:
            raise error_from_status(item.error.code, item.error.message)
        return item.chunk

    def cancel(self) -> None:
        self._session.cancel(self.request_id)


class _Wire:
    """One open ``Session`` call: its outbox, drained by the request iterator gRPC consumes."""

    __slots__ = ("alive", "batching", "call", "max_bytes", "outbox", "reader", "wakeup")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # a batch message stays within the message size limit
        self.outbox: deque[_Outgoing] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.alive = True
        self.batching = False  # the server accepts batch messages (its initial metadata says so)
        self.call: grpc.aio.StreamStreamCall | None = None
        self.reader: asyncio.Task[None] | None = None

    def send(self, item: _Outgoing) -> None:
        self.outbox.append(item)
        self._wake()

    def stop(self) -> None:
        self.alive = False
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def requests(self) -> AsyncIterator[pb.SessionRequest]:
        loop = asyncio.get_running_loop()
        outbox = self.outbox
        while self.alive:
            while outbox:
                yield self._take_batch() if self.batching else _single(outbox.popleft())
            self.wakeup = loop.create_future()
            await self.wakeup

    def _take_batch(self) -> pb.SessionRequest:
        """What is queued, in order, as one batch message of at most ``max_bytes`` (the rest
        goes in the next one). The server starts a batch's requests, then applies its cancels:
        a request cancelled right after it was sent is still cancelled."""
        message = pb.SessionRequest()
        generates: list[pb.GenerateRequest] = []
        cancels: list[str] = []
        size = 0
        outbox = self.outbox
        while outbox:
            item = outbox[0]
            cost = _ITEM_OVERHEAD_BYTES + (len(item) if isinstance(item, str) else item.ByteSize())
            if size + cost > self.max_bytes and size:
                break
            outbox.popleft()
            size += cost
            if isinstance(item, str):
                cancels.append(item)
            else:
                generates.append(item)
        if cancels:
            message.batch.cancel.extend(cancels)
        message.batch.generate.extend(generates)
        return message


def _single(item: _Outgoing) -> pb.SessionRequest:
    if isinstance(item, str):
        return pb.SessionRequest(cancel=item)
    return pb.SessionRequest(generate=item)


class Session:
    """A lazily opened, self-healing ``Session`` stream shared by many concurrent requests."""

    def __init__(
        self, stub: pb_grpc.InferenceServiceStub, metadata: Metadata = (), *, max_bytes: int
    ) -> None:
        self._stub = stub
        self._metadata = tuple(metadata)
        self._max_bytes = max_bytes  # the channel's message size limit
        self._inboxes: dict[str, _Inbox] = {}
        self._wire: _Wire | None = None
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def num_open(self) -> int:
        """Requests sent on this session that have not ended yet."""
        return len(self._inboxes)

    def next_request_id(self) -> str:
        return f"r{next(self._ids)}"

    def start(self, request: pb.GenerateRequest) -> _Inbox:
        """Sends ``request`` (its client_request_id must be set) and returns its inbox."""
        if self._closed:
            raise Cancelled("the client is closed")
        request_id = request.client_request_id
        if request_id in self._inboxes:
            raise ValueError(f"request id {request_id!r} is already open on this session")
        size = request.ByteSize() + _ITEM_OVERHEAD_BYTES
        if size > self._max_bytes:  # sent, it would end the stream and every request on it
            raise message_too_large(size, self._max_bytes, client_side=True)
        wire = self._wire or self._open()
        inbox = _Inbox(self, request_id)
        self._inboxes[request_id] = inbox
        wire.send(request)
        return inbox

    def cancel(self, request_id: str) -> None:
        """Cancels an open request; late responses for it are dropped."""
        if self._inboxes.pop(request_id, None) is not None and self._wire is not None:
            self._wire.send(request_id)

    async def aclose(self) -> None:
        """Fails the open requests with Cancelled and ends the stream."""
        self._closed = True
        self._fail_all(Cancelled("the client was closed"))
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.stop()
            assert wire.call is not None and wire.reader is not None
            wire.call.cancel()
            await asyncio.gather(wire.reader, return_exceptions=True)

    def _open(self) -> _Wire:
        wire = _Wire(self._max_bytes)
        wire.call = self._stub.Session(wire.requests(), metadata=self._metadata or None)
        wire.reader = asyncio.ensure_future(self._read(wire))
        self._wire = wire
        return wire

    async def _read(self, wire: _Wire) -> None:
        error: BackfillError
        call = wire.call
        assert call is not None
        try:
            metadata = await call.initial_metadata()
            if metadata is not None and BATCH_HEADER in tuple(metadata):
                wire.batching = True
            async for response in call:
                if response.batch:
                    for item in response.batch:
                        self._route(item)
                else:
                    self._route(response)
            error = Unavailable("the server ended the Session stream")
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
        except asyncio.CancelledError:
            error = Cancelled("the Session stream was cancelled")
        wire.stop()
        if self._wire is wire:
            self._wire = None
            self._fail_all(error)

    def _route(self, response: pb.SessionResponse) -> None:
        cid = response.client_request_id
        inbox = self._inboxes.get(cid)
        if inbox is None:
            return  # the caller cancelled it; its final message is not needed
        if response.HasField("error") or response.chunk.finish_reason:
            del self._inboxes[cid]
        inbox.put(response)

    def _fail_all(self, error: BackfillError) -> None:
        inboxes = list(self._inboxes.values())
        self._inboxes.clear()
        for inbox in inboxes:
            inbox.put(error)


# The details grpc core gives a call it cancelled on its own, with no message (our server's
# CANCELLED always says "cancelled"; a local cancel says "Locally cancelled by application!").
_BARE_CANCEL = "CANCELLED"


class UnarySource:
    """One ``Generate`` call per request: the fallback transport (``transport="unary"``).

    A call that ends CANCELLED with grpc's bare ``"CANCELLED"`` details, before any response,
    and that this client did not cancel, never reached the servicer: under a burst of ~1,000
    concurrent calls the grpc.aio server occasionally drops an accepted call before reading its
    request (nothing is logged; server.app.GRPC_SERVER_OPTIONS). It is reported as Unavailable
    so that the stream's usual rule (retry UNAVAILABLE before the first token) resends it.
    """

    __slots__ = ("_call", "_cancelled", "_iter", "_responded")

    def __init__(
        self,
        stub: pb_grpc.InferenceServiceStub,
        request: pb.GenerateRequest,
        metadata: Metadata = (),
    ) -> None:
        self._call = stub.Generate(request, metadata=tuple(metadata) or None)
        self._iter = self._call.__aiter__()
        self._cancelled = False
        self._responded = False

    async def next(self) -> pb.GenerateResponse:
        try:
            response = await self._iter.__anext__()
        except StopAsyncIteration:
            raise Unavailable("the Generate stream ended without a final chunk") from None
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        self._responded = True
        return response

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def _error(self, exc: grpc.RpcError) -> BackfillError:
        error = error_from_rpc(exc)
        dropped = (
            isinstance(error, Cancelled)
            and not (self._cancelled or self._responded)
            and hasattr(exc, "details")
            and exc.details() == _BARE_CANCEL
        )
        if dropped:
            return Unavailable("the server dropped the call before running it (grpc CANCELLED)")
        return error
