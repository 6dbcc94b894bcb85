"""The bridge from the scheduler's thread to one request's asyncio consumer.

The scheduler calls a request's sink from its own thread; ``RequestStream.sink`` hands each event
to the event loop through the loop's ``EventBridge`` and returns at once (sinks must not block).
The bridge batches: a scheduling pass that emits events for hundreds of requests costs one
``call_soon_threadsafe`` (one self-pipe write, one loop wake-up), not one per event. The consumer
awaits ``next()``, which returns *everything* pending merged into one event: when the reader is
slower than generation, a chunk carries several tokens instead of the stream falling behind, so a
slow client costs one message per read, not one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from server.metrics import RequestMetrics
from server.quotas import QuotaExceededError, TenantQuotas
from server.scheduler.types import DrainingError, QueueFullError, SchedEvent, SchedRequest
from server.security.keys import UNLIMITED, TenantLimits
from server.tenant_metrics import TenantMetrics

if TYPE_CHECKING:
    from server.api.models import Route

T = TypeVar("T")


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
        logprobs=concat_lists([e.logprobs for e in events]),
        prompt_logprobs=concat_lists([e.prompt_logprobs for e in events]),
    )


def concat_lists(parts: list[list[T] | None]) -> list[T] | None:
    """The lists of ``parts`` in order as one; None when every part is None."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else [x for p in present for x in p]


class EventBridge:
    """Carries events from any thread to one event loop, in batches.

    Invariant: events reach their streams in the order they were posted, and a posted event is
    delivered by the first drain that runs after it: a post appends, then schedules a drain
    unless one is already scheduled; a drain first marks itself not scheduled, then empties the
    queue, so a post it misses finds the mark cleared and schedules the next. Lock-free (deque
    appends and pops are atomic): a post runs once per token on the scheduler's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[tuple[RequestStream, SchedEvent]] = deque()
        self._scheduled = False
        self.wakeups = 0  # drains scheduled: how many times the loop was woken

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> EventBridge:
        """The one bridge of ``loop``: all streams of a loop must share it, or batching
        (one wake-up per pass) is lost."""
        bridge = _BRIDGES.get(loop)
        if bridge is None:
            bridge = _BRIDGES[loop] = cls(loop)
        return bridge

    def post(self, stream: RequestStream, event: SchedEvent) -> None:
        """Any thread; never blocks."""
        self._queue.append((stream, event))
        if not self._scheduled:
            self._scheduled = True
            self.wakeups += 1
            # A closed loop means the consumers are gone: nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        queue = self._queue
        while queue:
            stream, event = queue.popleft()
            stream.push(event)


# One bridge per loop; weak so that a closed, dropped loop (tests make many) takes its bridge.
_BRIDGES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventBridge] = (
    weakref.WeakKeyDictionary()
)


class RequestStream:
    """Events of one request, in order, coalesced for a slow consumer.

    Invariant: ``next()`` returns each token exactly once, in order, and returns the final event
    (possibly merged with the tokens before it) last; after that it returns None.
    """

    __slots__ = ("_bridge", "_done", "_on_ready", "_pending", "_waiter", "on_final",
                 "request_id")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_ready: Callable[[RequestStream], None] | None = None,
    ) -> None:
        self._bridge = EventBridge.for_loop(loop)
        self._pending: list[SchedEvent] = []
        # Created only while ``next()`` waits: a multiplexed (Session) stream never needs one.
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the final event was handed out
        # Called (on the loop) when events become pending after none were: a multiplexer
        # (Session) learns which streams have output without a task per request.
        self._on_ready = on_ready
        self.request_id: int | None = None  # the scheduler's id, once submitted
        # Called on the loop with the final event as it arrives, before any consumer takes it,
        # whether or not one ever does: what the request held is given back there.
        self.on_final: Callable[[SchedEvent], None] | None = None

    def sink(self, event: SchedEvent) -> None:
        """Called from the scheduler's thread; never blocks."""
        self._bridge.post(self, event)

    def push(self, event: SchedEvent) -> None:
        """Called on the event loop's thread."""
        if self.on_final is not None and event.outcome is not None:
            self.on_final(event)
        was_empty = not self._pending
        self._pending.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if was_empty and self._on_ready is not None:
            self._on_ready(self)

    async def next(self) -> SchedEvent | None:
        """All events pending now, merged; waits for at least one. None after the final."""
        if self._done:
            return None
        while not self._pending:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take()

    def take(self) -> SchedEvent | None:
        """All events pending now, merged; None when nothing is pending or after the final."""
        if self._done or not self._pending:
            return None
        pending = self._pending
        merged = pending[0] if len(pending) == 1 else merge_events(pending)
        self._pending = []
        self._done = merged.is_final
        return merged

    @property
    def finished(self) -> bool:
        """The final event was handed to the consumer."""
        return self._done


@dataclass(frozen=True, slots=True)
class Admission:
    """What accepting a request needs besides the request: the server's metrics and quotas,
    and the limits of the tenant it runs for (UNLIMITED with authentication off)."""

    metrics: RequestMetrics
    tenants: TenantMetrics
    quotas: TenantQuotas
    limits: TenantLimits = UNLIMITED


def submit_to_stream(
    route: Route,
    request: SchedRequest,
    stream: RequestStream,
    admission: Admission,
) -> int:
    """Submits request to the route's scheduler, held against its tenant's quotas until its
    final event reaches the loop, with a sink that meters each event (for the model that
    serves it), then hands it to stream. Refusals (QuotaExceededError, QueueFullError,
    DrainingError) are counted as rejected and re-raised."""
    tier, tenant, tenants = request.tier, request.tenant, admission.tenants
    try:
        ticket = admission.quotas.admit(request, admission.limits)
    except QuotaExceededError as exc:
        admission.metrics.rejected(tier, route.name)
        tenants.rejected(tenant, route.name, tier, exc.quota)
        raise
    if ticket is not None:
        stream.on_final = ticket.finish
    observe = admission.metrics.meter(tier, route).observe
    post = stream.sink
    prompt = len(request.prompt_token_ids)

    def sink(event: SchedEvent) -> None:  # the scheduler's thread, once per event
        observe(event)
        if event.outcome is not None:
            generated = 0 if event.usage is None else event.usage.completion_tokens
            tenants.finished(tenant, route.name, tier, event.outcome, prompt, generated)
        post(event)

    try:
        stream.request_id = route.scheduler.submit(request, sink)
    except BaseException as exc:
        if ticket is not None:
            ticket.release(0)
        if isinstance(exc, (QueueFullError, DrainingError)):
            admission.metrics.rejected(tier, route.name)
            tenants.rejected(tenant, route.name, tier)
        raise
    return stream.request_id
