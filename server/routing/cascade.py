"""One request through the cascade: the small model answers first, its answer is judged by its
own token probabilities, and when it is unsure the large model answers instead.

Streaming: nothing of the small model's answer reaches the caller before it is judged (a
stream cannot take back what it sent), so the small model's events are held until its final
one. A confident answer then goes out as one event, its time to first token being the time the
caller got it; an unsure one is dropped, and the large model's stream is the caller's from its
first token, so the caller sees one model's answer, with no gap and no repeat. Timing is the
caller's: the large model's queue time, TTFT and total are counted from the cascade's start.

A ``CascadeRun`` is the ``Route`` and ``Submitter`` of one request (``n`` = 1): ``name`` and
``spec`` are the small model's until it escalates, which it does before the caller's first
event. It is driven by the two schedulers' threads (their sinks) and by the caller's cancel.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

from server.api.models import ModelSpec, ServedModel
from server.api.streams import merge_events
from server.executor.base import TokenLogprob
from server.scheduler.types import (
    DrainingError,
    EventSink,
    Outcome,
    QueueFullError,
    SchedEvent,
    SchedRequest,
    Submitter,
    Timing,
)

# (the model that answered, why: confident | escalated | fallback, discarded small tokens)
OnDecided = Callable[[str, str, int], None]
_ANSWERED = frozenset({Outcome.STOP, Outcome.LENGTH})


def confidence(logprobs: list[TokenLogprob], measure: str) -> float:
    """The answer's confidence, a probability: the geometric mean of its tokens' ("mean") or
    its least likely token's ("min"). An empty answer has none (0)."""
    if not logprobs:
        return 0.0
    values = [lp.logprob for lp in logprobs]
    return math.exp(sum(values) / len(values) if measure == "mean" else min(values))


class CascadeRun:
    def __init__(
        self,
        small: ServedModel,
        large: ServedModel,
        large_request: SchedRequest,
        *,
        threshold: float,
        measure: str,
        caller_logprobs: bool,
        on_decided: OnDecided,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``caller_logprobs``: whether the caller asked for logprobs (the small model's are
        computed either way, to judge it, and dropped from its answer otherwise)."""
        self._small, self._large = small, large
        self._large_request = large_request
        self._threshold, self._measure = threshold, measure
        self._caller_logprobs = caller_logprobs
        self._on_decided = on_decided
        self._clock = clock
        self._lock = threading.Lock()  # guards the four fields below
        self._serving = small
        self._active: tuple[Submitter, int] | None = None  # where a cancel goes
        self._cancelled = False
        self._held: list[SchedEvent] = []  # the small model's events, until judged
        self._sink: EventSink | None = None
        self._started = 0.0

    # -- Route --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._serving.name

    @property
    def spec(self) -> ModelSpec:
        return self._serving.spec

    @property
    def scheduler(self) -> Submitter:
        return self

    # -- Submitter ----------------------------------------------------------------------

    def submit(self, request: SchedRequest, sink: EventSink) -> int:
        """Submits the small model's request (refusals raise, as the scheduler's do)."""
        self._sink = sink
        self._started = self._clock()
        request_id = self._small.scheduler.submit(request, self._on_small)
        with self._lock:
            self._active = (self._small.scheduler, request_id)
        return request_id

    def cancel(self, request_id: int) -> None:
        """Cancels whichever model runs the request now (the id is the one submit gave)."""
        with self._lock:
            self._cancelled = True
            active = self._active
        if active is not None:
            active[0].cancel(active[1])

    # -- the two models' events ---------------------------------------------------------

    def _on_small(self, event: SchedEvent) -> None:
        """The small model's scheduler thread."""
        self._held.append(event)
        if not event.is_final:
            return
        answer, self._held = merge_events(self._held), []
        if answer.outcome not in _ANSWERED:  # cancelled, failed, deadline: that is the end
            self._deliver(answer)
            return
        with self._lock:
            sure = confidence(answer.logprobs or [], self._measure) >= self._threshold
            if self._cancelled or sure:
                self._active = None
        if not sure and not self._cancelled:
            self._escalate(answer)
            return
        if sure:
            self._on_decided(self._small.name, "confident", 0)
        self._deliver(answer)

    def _escalate(self, answer: SchedEvent) -> None:
        offset = self._clock() - self._started
        try:
            request_id = self._large.scheduler.submit(
                self._large_request, lambda event: self._on_large(event, offset))
        except (QueueFullError, DrainingError, ValueError):
            self._on_decided(self._small.name, "fallback", 0)
            self._deliver(answer)
            return
        with self._lock:
            self._serving = self._large
            self._active = (self._large.scheduler, request_id)
            cancelled = self._cancelled
        self._on_decided(self._large.name, "escalated", len(answer.token_ids))
        if cancelled:  # the caller left while the small model was being judged
            self._large.scheduler.cancel(request_id)

    def _on_large(self, event: SchedEvent, offset: float) -> None:
        """The large model's scheduler thread: its events are the caller's, timed from the
        cascade's start."""
        if event.timing is not None:
            t = event.timing
            event = dataclasses.replace(event, timing=Timing(
                queue_seconds=t.queue_seconds + offset,
                ttft_seconds=None if t.ttft_seconds is None else t.ttft_seconds + offset,
                total_seconds=t.total_seconds + offset, preemptions=t.preemptions))
        assert self._sink is not None
        self._sink(event)

    def _deliver(self, answer: SchedEvent) -> None:
        """The small model's answer as the caller's one event: all of it arrives now."""
        if not self._caller_logprobs:
            answer.logprobs = None
        if answer.timing is not None and answer.token_ids:
            answer.timing.ttft_seconds = answer.timing.total_seconds
        assert self._sink is not None
        self._sink(answer)
