"""``Client``: the synchronous SDK, a thin wrapper that runs ``AsyncClient`` on a private
event loop thread. Every method delegates to the async core; no logic is duplicated here.

>>> with Client("127.0.0.1:50051") as client:  # doctest: +SKIP
...     for chunk in client.generate("Hello", sampling=SamplingParams(max_tokens=16)):
...         print(chunk.text, end="", flush=True)
...     print(client.complete("2 + 2 =").text)
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from backfill.transport import DEFAULT_MAX_MESSAGE_MB
from client.aio import AsyncClient, Transport
from client.jobs import RequestLike
from client.types import (
    BatchJob,
    BatchResult,
    ChatMessage,
    Chunk,
    Completion,
    ModelInfo,
    SamplingParams,
    Stats,
    Tier,
)

T = TypeVar("T")
_DEFAULT_SAMPLING = SamplingParams()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


class _Loop:
    """A private event loop on a daemon thread; ``run`` blocks the caller on a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="backfill-client-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncIterator(Generic[T]):
    """Iterates an async iterator of the client's loop from a plain thread.

    ``close()`` (also on ``with`` exit, or when the iterator is dropped after a ``break``)
    closes the async iterator, which for a generation cancels the request on the server.
    """

    def __init__(self, source: AsyncIterator[T], loop: _Loop) -> None:
        self._source = source
        self._loop = loop
        self._closed = False

    def __iter__(self) -> SyncIterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            return self._loop.run(_anext(self._source))
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None

    def __enter__(self) -> SyncIterator[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None and not self._loop.loop.is_closed():
            # Not waited on: close() may run from __del__ on any thread.
            asyncio.run_coroutine_threadsafe(aclose(), self._loop.loop)

    def __del__(self) -> None:
        self.close()


class Client:
    """The synchronous client; same arguments and methods as :class:`client.aio.AsyncClient`."""

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
        self._loop = _Loop()
        self._async = AsyncClient(
            target,
            credentials=credentials,
            timeout=timeout,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
            transport=transport,
            metadata=metadata,
            channel_options=channel_options,
            max_message_mb=max_message_mb,
            tenant=tenant,
            api_key=api_key,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancels open requests, closes the connection and stops the loop thread."""
        if not self._loop.loop.is_closed():
            self._loop.run(self._async.close())
            self._loop.stop()

    @property
    def aio(self) -> AsyncClient:
        """The async core (its coroutines must run on this client's loop)."""
        return self._async

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
    ) -> SyncIterator[Chunk]:
        """Starts a request; iterate the chunks. See ``AsyncClient.generate``."""
        stream = self._async.generate(
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
        return SyncIterator(stream, self._loop)

    def complete(
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
        """Runs a request to its end. See ``AsyncClient.complete``."""
        return self._loop.run(
            self._async.complete(
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
        )

    def submit_batch(
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
        """Submits an OFFLINE batch job. See ``AsyncClient.submit_batch``."""
        return self._loop.run(self._async.submit_batch(
            requests, tenant=tenant, labels=labels, idempotency_key=idempotency_key,
            completion_window=completion_window, model=model, on_progress=on_progress,
        ))

    def get_batch(self, job_id: str, *, tenant: str | None = None) -> BatchJob:
        return self._loop.run(self._async.get_batch(job_id, tenant=tenant))

    def cancel_batch(self, job_id: str, *, tenant: str | None = None) -> BatchJob:
        return self._loop.run(self._async.cancel_batch(job_id, tenant=tenant))

    def list_batches(
        self, *, tenant: str | None = None, limit: int = 0, after: str = ""
    ) -> list[BatchJob]:
        return self._loop.run(self._async.list_batches(tenant=tenant, limit=limit, after=after))

    def watch(
        self, job_id: str, *, interval_s: float = 0.5, tenant: str | None = None
    ) -> SyncIterator[BatchJob]:
        """Job states until the job ends. See ``AsyncClient.watch``."""
        return SyncIterator(self._async.watch(job_id, interval_s=interval_s, tenant=tenant),
                            self._loop)

    def results(
        self, job_id: str, *, start_index: int = 0, tenant: str | None = None
    ) -> SyncIterator[BatchResult]:
        """Results in submission order. See ``AsyncClient.results``."""
        return SyncIterator(
            self._async.results(job_id, start_index=start_index, tenant=tenant), self._loop
        )

    def list_models(self) -> list[ModelInfo]:
        return self._loop.run(self._async.list_models())

    def stats(self) -> Stats:
        return self._loop.run(self._async.stats())
