"""Drive an Executor to completion synchronously: for tests, benchmarks and scripts."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from server.executor.base import ExecRequest, Executor, FinishReason, TokenDelta, TokenLogprob


@dataclass(slots=True)
class Collected:
    """Everything one request streamed, in order."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None
    error: str | None = None
    cached_prompt_tokens: int | None = None  # from the first delta that carried it
    num_deltas: int = 0
    first_token_s: float | None = None  # seconds from collect() start to the first token
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, delta: TokenDelta, elapsed: float) -> None:
        if delta.finish is not None and self.finish is not None:
            raise AssertionError(f"request {delta.request_id} finished twice")
        if self.finish is not None:
            raise AssertionError(f"request {delta.request_id} got a delta after its final one")
        if delta.token_ids and self.first_token_s is None:
            self.first_token_s = elapsed
        self.token_ids += delta.token_ids
        self.text += delta.text
        self.finish = delta.finish
        self.error = delta.error
        if self.cached_prompt_tokens is None:
            self.cached_prompt_tokens = delta.cached_prompt_tokens
        self.num_deltas += 1
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.prompt_logprobs is not None:
            if self.prompt_logprobs is not None:
                raise AssertionError(f"request {delta.request_id} got prompt logprobs twice")
            self.prompt_logprobs = delta.prompt_logprobs


def collect(
    executor: Executor,
    requests: Iterable[ExecRequest] = (),
    *,
    timeout: float = 60.0,
    results: dict[int, Collected] | None = None,
) -> dict[int, Collected]:
    """Enqueues requests and polls until every request in `results` (new ones included) has
    finished. Raises TimeoutError after `timeout` seconds."""
    out: dict[int, Collected] = {} if results is None else results
    for request in requests:
        executor.enqueue(request)
        out.setdefault(request.request_id, Collected())
    start = time.perf_counter()
    while any(c.finish is None for c in out.values()):
        elapsed = time.perf_counter() - start
        if elapsed > timeout:
            raise TimeoutError(f"requests still running after {timeout} s")
        for delta in executor.poll(0.5):
            out.setdefault(delta.request_id, Collected()).add(
                delta, time.perf_counter() - start
            )
    return out
