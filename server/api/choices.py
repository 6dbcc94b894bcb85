"""A request with ``n`` > 1 choices: n sequences of the same prompt, read as one stream.

Each choice is its own scheduler request (a batch slot each, preempted and cancelled like any
other), all sharing the one prompt tuple: the CPU engine then computes the prompt once and the
other choices start from its blocks in the prefix cache (server/executor/cpu/batcher.py), and
TensorRT-LLM's KV block reuse does the same. With a seed, choice i samples with seed + i (as
vLLM does), so the choices differ yet reproduce; prompt logprobs are computed by choice 0 only,
since every choice's would be the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque

from server.api.models import Route
from server.api.streams import Admission, RequestStream, submit_to_stream
from server.scheduler.types import SchedEvent, SchedRequest, Usage

SEED_MODULUS = 2**64


def choice_requests(request: SchedRequest, n: int) -> list[SchedRequest]:
    """The scheduler requests of a request's n choices (``[request]`` when n <= 1)."""
    if n <= 1:
        return [request]
    s = request.sampling
    return [
        dataclasses.replace(
            request,
            sampling=dataclasses.replace(
                s,
                seed=None if s.seed is None else (s.seed + i) % SEED_MODULUS,
                prompt_logprobs=s.prompt_logprobs if i == 0 else None,
            ),
        )
        for i in range(n)
    ]


def combined_usage(usages: list[Usage]) -> Usage:
    """One usage for all choices: the prompt counted once, completions summed."""
    first = usages[0]
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_prompt_tokens=max(u.cached_prompt_tokens for u in usages),
        draft_tokens_proposed=sum(u.draft_tokens_proposed for u in usages),
        draft_tokens_accepted=sum(u.draft_tokens_accepted for u in usages),
    )


class Choices:
    """The streams of one request's choices. Invariant: ``next()`` returns every event of
    every choice once, each choice's in order, and None after the last choice's final event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, route: Route) -> None:
        self._loop = loop
        self.route = route  # the model serving the choices (its name settles before output)
        self.streams: list[RequestStream] = []
        self._index: dict[int, int] = {}  # id(stream) -> choice index
        self._ready: deque[int] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._open = 0

    @classmethod
    def submit(
        cls,
        route: Route,
        request: SchedRequest,
        n: int,
        admission: Admission,
    ) -> Choices:
        """Submits every choice; when one is refused (queue full, draining), the ones already
        submitted are cancelled and the error raised."""
        choices = cls(asyncio.get_running_loop(), route)
        try:
            for index, choice in enumerate(choice_requests(request, n)):
                stream = RequestStream(choices._loop, choices._on_ready)
                choices._index[id(stream)] = index
                choices.streams.append(stream)
                submit_to_stream(route, choice, stream, admission)
                choices._open += 1
        except BaseException:
            choices.cancel()
            raise
        return choices

    def _on_ready(self, stream: RequestStream) -> None:
        self._ready.append(self._index[id(stream)])
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> list[tuple[int, SchedEvent]] | None:
        """Everything pending now as (choice index, merged event); waits for at least one."""
        while True:
            out = self.take()
            if out:
                return out
            if self._open == 0:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take(self) -> list[tuple[int, SchedEvent]]:
        out = []
        while self._ready:
            index = self._ready.popleft()
            event = self.streams[index].take()
            if event is not None:
                out.append((index, event))
                if event.is_final:
                    self._open -= 1
        return out

    @property
    def finished(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        """Cancels every choice that has not ended (the client went away, or one failed)."""
        for stream in self.streams:
            if stream.request_id is not None and not stream.finished:
                self.route.scheduler.cancel(stream.request_id)
