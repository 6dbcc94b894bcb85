"""``GenerationStream``: the async iterator of chunks that ``AsyncClient.generate`` returns.

It owns one request from start to end: it opens the request lazily on the first ``__anext__``,
retries with exponential backoff and jitter only while that is safe (UNAVAILABLE before any
token arrived: the server never ran it, or cancelled it with its broken stream), turns failing
final chunks into exceptions, and cancels the request on the server when the caller stops early
(``aclose``, ``async with``, breaking out and dropping it, or cancelling the awaiting task).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from types import TracebackType

from backfill.v1 import inference_pb2 as pb
from client._convert import chunk_from_pb
from client._session import Source
from client.errors import BackfillError, Cancelled, DeadlineExceeded, Internal
from client.types import Chunk, Completion, FinishReason, Timing, Usage


def backoff_delay(attempt: int, base_s: float, cap_s: float = 5.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)].

    >>> 0.0 <= backoff_delay(3, 0.1) <= 0.8
    True
    """
    return random.uniform(0.0, min(cap_s, base_s * (2**attempt)))


class GenerationStream:
    """Chunks of one request; iterate with ``async for``, or await :meth:`complete`.

    >>> async def demo(client):  # doctest: +SKIP
    ...     async with client.generate("Hello", sampling=SamplingParams(max_tokens=8)) as s:
    ...         async for chunk in s:
    ...             print(chunk.text, end="")
    """

    def __init__(
        self,
        request: pb.GenerateRequest,
        open_source: Callable[[pb.GenerateRequest], Source],
        *,
        max_retries: int,
        backoff_s: float,
        timeout: float | None,
    ) -> None:
        self._request = request
        self._open_source = open_source
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._timeout = timeout
        self._source: Source | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at: float | None = None
        self._attempts = 0
        self._got_tokens = False
        self._finished = False

    @property
    def request_id(self) -> str:
        """The client_request_id (assigned when the request opens, unless given)."""
        return self._request.client_request_id

    def __aiter__(self) -> GenerationStream:
        return self

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    async def aclose(self) -> None:
        """Stops the request if it is still running (idempotent)."""
        self.cancel()

    def cancel(self) -> None:
        """Sends a cancel for this request unless it already ended. Never blocks."""
        if self._finished:
            return
        self._finished = True
        if self._source is not None:
            self._source.cancel()

    def __del__(self) -> None:
        if not self._finished and self._source is not None and self._loop is not None:
            # A closed loop means the channel is gone, and the server dropped the stream.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._source.cancel)

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        while True:
            try:
                response = await self._next_response()
            except BackfillError as exc:
                if not self._should_retry(exc):
                    self._finished = True
                    raise
                await asyncio.sleep(backoff_delay(self._attempts, self._backoff_s))
                self._attempts += 1
                self._source = None
                continue
            except asyncio.CancelledError:
                self.cancel()
                raise
            return self._to_chunk(response)

    async def complete(self) -> Completion:
        """Reads the stream to its end and returns the whole output."""
        texts: list[str] = []
        token_ids: list[int] = []
        last: Chunk | None = None
        model = ""
        async for chunk in self:
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            model = model or chunk.model
            last = chunk
        assert last is not None and last.finish_reason is not None
        return Completion(
            request_id=self.request_id,
            text="".join(texts),
            token_ids=tuple(token_ids),
            finish_reason=last.finish_reason,
            usage=last.usage or Usage(),
            timing=last.timing or Timing(),
            model=model,
        )

    async def _next_response(self) -> pb.GenerateResponse:
        if self._source is None:
            self._loop = asyncio.get_running_loop()
            if self._started_at is None:
                self._started_at = time.monotonic()
            self._source = self._open_source(self._request)
        if self._timeout is None:
            return await self._source.next()
        remaining = self._started_at + self._timeout - time.monotonic()  # type: ignore[operator]
        try:
            return await asyncio.wait_for(self._source.next(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            self.cancel()
            message = f"no response within the client timeout {self._timeout}s"
            raise DeadlineExceeded(message) from None

    def _should_retry(self, exc: BackfillError) -> bool:
        return exc.retryable and not self._got_tokens and self._attempts < self._max_retries

    def _to_chunk(self, response: pb.GenerateResponse) -> Chunk:
        chunk = chunk_from_pb(response, self.request_id)
        if chunk.token_ids:
            self._got_tokens = True
        if chunk.finish_reason is None:
            return chunk
        self._finished = True
        if chunk.finish_reason is FinishReason.DEADLINE:
            raise DeadlineExceeded("the TTFT deadline passed before the first token")
        if chunk.finish_reason is FinishReason.ERROR:
            raise Internal("the engine failed this request")
        if chunk.finish_reason is FinishReason.CANCELLED:
            raise Cancelled("the request was cancelled on the server")
        return chunk
