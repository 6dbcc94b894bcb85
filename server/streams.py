"""The bridge from the scheduler's thread to one request's asyncio consumer.

The scheduler calls a request's sink from its own thread; ``RequestStream.sink`` hands each event
to the event loop with ``call_soon_threadsafe`` and returns at once (sinks must not block). The
consumer awaits ``next()``, which returns *everything* pending merged into one event: when the
reader is slower than generation, a chunk carries several tokens instead of the stream falling
behind, so a slow client costs one message per read, not one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from server.metrics import RequestMetrics
from server.scheduler import BackfillScheduler
from server.scheduler.types import DrainingError, QueueFullError, SchedEvent, SchedRequest


def merge_events(events: list[SchedEvent]) -> SchedEvent:
    """One event with the tokens and text of ``events`` in order; the final fields (outcome,
    error, usage, timing) come from the last one, the only one that can be final."""
    last = events[-1]
    if len(events) == 1:
        return last
    token_ids = tuple(t for e in events for t in e.token_ids)
    text = "".join(e.text for e in events)
    return SchedEvent(
        request_id=last.request_id,
        token_ids=token_ids,
        text=text,
        outcome=last.outcome,
        error=last.error,
        usage=last.usage,
        timing=last.timing,
    )


class RequestStream:
    """Events of one request, in order, coalesced for a slow consumer.

    Invariant: ``next()`` returns each token exactly once, in order, and returns the final event
    (possibly merged with the tokens before it) last; after that it returns None.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_ready: Callable[[RequestStream], None] | None = None,
    ) -> None:
        self._loop = loop
        self._pending: deque[SchedEvent] = deque()
        self._ready = asyncio.Event()
        self._done = False  # the final event was handed out
        # Called (on the loop) when events become pending after none were: a multiplexer
        # (Session) learns which streams have output without a task per request.
        self._on_ready = on_ready
        self.request_id: int | None = None  # the scheduler's id, once submitted

    def sink(self, event: SchedEvent) -> None:
        """Called from the scheduler's thread; never blocks."""
        # A closed loop means the consumer is gone: nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.push, event)

    def push(self, event: SchedEvent) -> None:
        """Called on the event loop's thread."""
        was_empty = not self._pending
        self._pending.append(event)
        self._ready.set()
        if was_empty and self._on_ready is not None:
            self._on_ready(self)

    async def next(self) -> SchedEvent | None:
        """All events pending now, merged; waits for at least one. None after the final."""
        if self._done:
            return None
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self.take()

    def take(self) -> SchedEvent | None:
        """All events pending now, merged; None when nothing is pending or after the final."""
        if self._done or not self._pending:
            return None
        merged = merge_events(list(self._pending))
        self._pending.clear()
        self._done = merged.is_final
        return merged

    @property
    def finished(self) -> bool:
        """The final event was handed to the consumer."""
        return self._done


def submit_to_stream(
    scheduler: BackfillScheduler,
    request: SchedRequest,
    stream: RequestStream,
    metrics: RequestMetrics,
) -> int:
    """Submits request with a sink that meters each event, then hands it to stream. Refusals
    (QueueFullError, DrainingError) are counted as rejected and re-raised."""
    meter = metrics.meter(request.tier)

    def sink(event: SchedEvent) -> None:  # the scheduler's thread
        meter.observe(event)
        stream.sink(event)

    try:
        stream.request_id = scheduler.submit(request, sink)
    except (QueueFullError, DrainingError):
        metrics.rejected(request.tier)
        raise
    return stream.request_id
