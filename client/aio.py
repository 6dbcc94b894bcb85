"""``AsyncClient``: the SDK's one core; ``client.sync.Client`` runs it on a private loop.

>>> async def main():  # doctest: +SKIP
...     async with AsyncClient("127.0.0.1:50051") as client:
...         async for chunk in client.generate("Once upon a time",
...                                            sampling=SamplingParams(max_tokens=32)):
...             print(chunk.text, end="", flush=True)
...         done = await client.complete(messages=[{"role": "user", "content": "Hi"}])
...         job = await client.submit_batch("prompts.jsonl")
...         async for state in client.watch(job.id):
...             print(state.finished, "/", state.total)
...         async for result in client.results(job.id):
...             print(result.request_id, result.text)
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Literal, TypeVar

import grpc

from backfill.transport import DEFAULT_MAX_MESSAGE_MB, check_max_message_mb, message_options
from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import _convert
from client._session import Session, Source, UnarySource
from client._stream import GenerationStream, backoff_delay
from client.credentials import api_key_metadata, warn_if_plaintext_key
from client.errors import BackfillError, error_from_rpc
from client.jobs import RequestLike, file_chunks, request_chunks
from client.types import (
    BatchJob,
    BatchResult,
    ChatMessage,
    Completion,
    ModelInfo,
    SamplingParams,
    Stats,
    Tier,
)

Transport = Literal["session", "unary"]
R = TypeVar("R")
_DEFAULT_SAMPLING = SamplingParams()


class AsyncClient:
    """Talks to one Backfill server. Use as ``async with AsyncClient(target) as client``.

    ``transport="session"`` (default) multiplexes every request of a tier on one ``Session``
    stream (one stream per tier, so online chunks never queue behind offline ones);
    ``"unary"`` makes one ``Generate`` call per request. ``timeout`` bounds each unary RPC and
    each generation as a whole (client side); ``max_retries`` bounds the retries of requests
    that are safe to resend (UNAVAILABLE before any token). ``max_message_mb`` is the largest
    gRPC message sent or received: keep it equal to the server's ``--max-message-mb`` (both
    default to 64; batch jobs upload in pieces well below it). ``tenant`` is the default owner
    of batch jobs: a job is visible to its own tenant only.

    Security: ``credentials`` (e.g. ``client.tls_credentials(ca=..., cert=..., key=...)``)
    makes the channel TLS (mTLS with a client certificate); ``api_key`` is sent as
    ``authorization: Bearer <key>`` on every call to a server with ``--auth-keys``, which then
    takes the tenant from the key (``tenant`` may be left empty).
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
        retry_backoff_s: float = 0.05,
        transport: Transport = "session",
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, object]] = (),
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        tenant: str = "",
        api_key: str | None = None,
    ) -> None:
        if transport not in ("session", "unary"):
            raise ValueError(f"transport must be 'session' or 'unary', got {transport!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.target = target
        self.transport: Transport = transport
        self.tenant = tenant
        self._credentials = credentials
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_s
        self._metadata = tuple(metadata)
        if api_key:
            warn_if_plaintext_key(target, credentials is not None)
            self._metadata += api_key_metadata(api_key)
        self._options = (*message_options(max_message_mb), *channel_options)
        self._max_message_bytes = check_max_message_mb(max_message_mb)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceServiceStub | None = None
        # One Session per tier: responses of one stream arrive in order, so online chunks
        # must not queue behind a backlog of offline ones (head-of-line blocking).
        self._sessions: dict[int, Session] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancels open requests and closes the connection."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.aclose()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    @property
    def num_open_requests(self) -> int:
        """Requests open on the Session streams (0 with the unary transport)."""
        return sum(session.num_open for session in self._sessions.values())

    # --- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
        sampling: SamplingParams = _DEFAULT_SAMPLING,
        tier: Tier | str = Tier.ONLINE,
        deadline: float | None = None,
        tenant: str = "",
        model: str = "",
        request_id: str | None = None,
        route_hint: str = "",
    ) -> GenerationStream:
        """Starts a request; returns its stream of chunks (the request opens on first read).

        ``deadline`` is the time to first token in seconds; past it, a request that has not
        started fails with ``DeadlineExceeded``. ``model="auto"`` lets the server's router
        choose (the chunks' ``model`` names the one that served); ``route_hint`` ("small" or
        "large") overrides its policy.
        """
        request = _convert.request_to_pb(
            prompt=prompt,
            messages=messages,
            token_ids=token_ids,
            sampling=sampling,
            tier=tier,
            deadline=deadline,
            tenant=tenant,
            model=model,
            request_id=request_id or "",
            route_hint=route_hint,
        )
        return GenerationStream(
            request,
            self._open_source,
            max_retries=self._max_retries,
            backoff_s=self._backoff_s,
            timeout=self._timeout,
        )

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
        sampling: SamplingParams = _DEFAULT_SAMPLING,
        tier: Tier | str = Tier.ONLINE,
        deadline: float | None = None,
        tenant: str = "",
        model: str = "",
        request_id: str | None = None,
        route_hint: str = "",
    ) -> Completion:
        """Runs a request to its end and returns text, token ids, usage and timing."""
        stream = self.generate(
            prompt,
            messages=messages,
            token_ids=token_ids,
            sampling=sampling,
            tier=tier,
            deadline=deadline,
            tenant=tenant,
            model=model,
            request_id=request_id,
            route_hint=route_hint,
        )
        return await stream.complete()

    def _open_source(self, request: pb.GenerateRequest) -> Source:
        stub = self._ensure_stub()
        if self.transport == "unary":
            return UnarySource(stub, request, self._metadata)
        session = self._sessions.get(request.tier)
        if session is None:
            session = self._sessions[request.tier] = Session(
                stub, self._metadata, max_bytes=self._max_message_bytes
            )
        if not request.client_request_id:
            request.client_request_id = session.next_request_id()
        return session.start(request)

    # --- offline batch jobs ---------------------------------------------------------------

    async def submit_batch(
        self,
        requests: Iterable[RequestLike] | str | os.PathLike[str],
        *,
        tenant: str | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        completion_window: float | None = None,
        model: str = "",
        on_progress: Callable[[int], None] | None = None,
    ) -> BatchJob:
        """Submits requests, or a JSONL file in either format (see ``backfill.batch_format``),
        as one OFFLINE job, streamed in pieces, so a file of any size fits in bounded memory.

        A line the server cannot run fails on its own (see the job's ``failed`` count and its
        results); the job runs the rest. The submit carries an idempotency key (a fresh random
        one unless given), so a retry after a lost reply returns the same job instead of
        starting a second one; a file or a list is sent again on retry, a one-shot iterator is
        not retried. ``completion_window`` (seconds) is when the job expires (server default
        24h); ``model`` runs every request on that model; ``on_progress`` gets the size in
        bytes of each piece as it is sent.
        """
        header = pb.UploadBatchHeader(
            tenant=self.tenant if tenant is None else tenant,
            labels=dict(labels or {}),
            idempotency_key=uuid.uuid4().hex if idempotency_key is None else idempotency_key,
            model=model,
        )
        if completion_window is not None:
            header.completion_window.FromNanoseconds(round(completion_window * 1e9))
        pieces: Callable[[], Iterator[bytes]]
        if isinstance(requests, (str, os.PathLike)):
            path = requests
            pieces, replayable = (lambda: file_chunks(path)), True
        else:
            replayable = isinstance(requests, Sequence)
            pieces = functools.partial(request_chunks, requests)
        attempt = 0
        while True:
            messages = _upload_messages(header, pieces(), on_progress)
            try:
                reply = await self._ensure_stub().UploadBatch(messages, **self._call_kw())
                return _convert.job_from_pb(reply)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not (replayable and error.retryable and attempt < self._max_retries):
                    raise error from None
            await asyncio.sleep(backoff_delay(attempt, self._backoff_s))
            attempt += 1

    async def get_batch(self, job_id: str, *, tenant: str | None = None) -> BatchJob:
        """The job's state and progress counts."""
        request = pb.GetBatchRequest(id=job_id, tenant=self._tenant(tenant))
        job = await self._unary(lambda stub: stub.GetBatch(request, **self._call_kw()))
        return _convert.job_from_pb(job)

    async def cancel_batch(self, job_id: str, *, tenant: str | None = None) -> BatchJob:
        """Cancels the job's unfinished requests; finished results are kept."""
        request = pb.CancelBatchRequest(id=job_id, tenant=self._tenant(tenant))
        job = await self._unary(lambda stub: stub.CancelBatch(request, **self._call_kw()))
        return _convert.job_from_pb(job)

    async def list_batches(
        self, *, tenant: str | None = None, limit: int = 0, after: str = ""
    ) -> list[BatchJob]:
        """The tenant's jobs, newest first: all of them (``limit`` 0, read a page at a time),
        or ``limit`` after the job ``after``."""
        jobs: list[BatchJob] = []
        while True:
            want = 0 if limit == 0 else limit - len(jobs)
            request = pb.ListBatchesRequest(tenant=self._tenant(tenant), limit=want, after=after)
            reply = await self._list_page(request)
            jobs += [_convert.job_from_pb(job) for job in reply.jobs]
            if not (reply.has_more and reply.jobs) or (limit and len(jobs) >= limit):
                return jobs
            after = reply.jobs[-1].id

    async def _list_page(self, request: pb.ListBatchesRequest) -> pb.ListBatchesResponse:
        return await self._unary(lambda stub: stub.ListBatches(request, **self._call_kw()))

    async def watch(
        self, job_id: str, *, interval_s: float = 0.5, tenant: str | None = None
    ) -> AsyncIterator[BatchJob]:
        """Yields the job's state now, then whenever its progress changes, until it ends."""
        last: BatchJob | None = None
        while True:
            job = await self.get_batch(job_id, tenant=tenant)
            if job != last:
                yield job
                last = job
            if job.done:
                return
            await asyncio.sleep(interval_s)

    async def results(
        self, job_id: str, *, start_index: int = 0, tenant: str | None = None
    ) -> AsyncIterator[BatchResult]:
        """The job's results in submission order, from ``start_index``, following the job
        until it ends. A dropped connection resumes after the last result received
        (UNAVAILABLE is retried); results are sent once written to the server's job store, so
        one received is never replaced."""
        next_index, attempt = start_index, 0
        while True:
            request = pb.StreamBatchResultsRequest(id=job_id, start_index=next_index,
                                                   tenant=self._tenant(tenant))
            call = self._ensure_stub().StreamBatchResults(request, metadata=self._metadata or None)
            try:
                async for message in call:
                    result = _convert.result_from_pb(message)
                    next_index, attempt = result.index + 1, 0
                    yield result
                return
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not error.retryable or attempt >= self._max_retries:
                    raise error from None
            finally:
                call.cancel()
            await asyncio.sleep(backoff_delay(attempt, self._backoff_s))
            attempt += 1

    def _tenant(self, tenant: str | None) -> str:
        return self.tenant if tenant is None else tenant

    # --- models and statistics -----------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """The models this server serves."""
        request = pb.ListModelsRequest()
        reply = await self._unary(lambda stub: stub.ListModels(request, **self._call_kw()))
        return [_convert.model_from_pb(m) for m in reply.models]

    async def stats(self) -> Stats:
        """A snapshot of the server: slots, queues, tokens/s, occupancy, cost."""
        request = pb.GetStatsRequest()
        reply = await self._unary(lambda stub: stub.GetStats(request, **self._call_kw()))
        return _convert.stats_from_pb(reply)

    # --- plumbing -------------------------------------------------------------------------

    def _ensure_stub(self) -> pb_grpc.InferenceServiceStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
            self._stub = pb_grpc.InferenceServiceStub(self._channel)
        return self._stub

    def _call_kw(self) -> dict[str, object]:
        return {"timeout": self._timeout, "metadata": self._metadata or None}

    async def _unary(
        self,
        call: Callable[[pb_grpc.InferenceServiceStub], Awaitable[R]],
        idempotent: bool = True,
    ) -> R:
        """Runs a unary RPC, retrying UNAVAILABLE with backoff when resending is harmless."""
        attempt = 0
        while True:
            try:
                return await call(self._ensure_stub())
            except grpc.RpcError as exc:
                error: BackfillError = error_from_rpc(exc)
                if not (idempotent and error.retryable and attempt < self._max_retries):
                    raise error from None
            await asyncio.sleep(backoff_delay(attempt, self._backoff_s))
            attempt += 1


async def _upload_messages(
    header: pb.UploadBatchHeader,
    pieces: Iterator[bytes],
    on_progress: Callable[[int], None] | None,
) -> AsyncIterator[pb.UploadBatchRequest]:
    """The header, then each piece; pieces are read (or encoded) on a worker thread."""
    yield pb.UploadBatchRequest(header=header)
    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
        yield pb.UploadBatchRequest(data=piece)
        if on_progress is not None:
            on_progress(len(piece))
