"""Shared helpers for scheduler tests: a settable clock, an event recorder, small factories."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

from server.executor.base import Capacity, SamplingParams
from server.scheduler import BackfillScheduler, Outcome, SchedEvent, SchedRequest, Tier
from tests.fakes import ScriptedExecutor


class FakeClock:
    """A clock the test moves by hand (the scheduler only reads it)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """Collects events per request id; a sink for every request (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: dict[int, list[SchedEvent]] = defaultdict(list)
        self.threads: set[str] = set()
        self.all_final = threading.Condition(self._lock)

    def __call__(self, event: SchedEvent) -> None:
        with self._lock:
            self.events[event.request_id].append(event)
            self.threads.add(threading.current_thread().name)
            self.all_final.notify_all()

    def tokens(self, request_id: int) -> tuple[int, ...]:
        return tuple(t for e in self.events[request_id] for t in e.token_ids)

    def finals(self, request_id: int) -> list[SchedEvent]:
        return [e for e in self.events[request_id] if e.is_final]

    def final(self, request_id: int) -> SchedEvent:
        finals = self.finals(request_id)
        assert len(finals) == 1, f"request {request_id}: {len(finals)} final events"
        assert self.events[request_id][-1].is_final, "an event came after the final one"
        return finals[0]

    def outcome(self, request_id: int) -> Outcome | None:
        finals = self.finals(request_id)
        return finals[0].outcome if finals else None

    def wait_final(self, ids: list[int], timeout: float) -> bool:
        with self._lock:
            return self.all_final.wait_for(
                lambda: all(any(e.is_final for e in self.events[i]) for i in ids), timeout
            )


@dataclass(frozen=True, slots=True)
class Shape:
    slots: int = 4
    kv_blocks: int = 256
    tokens_per_block: int = 4
    max_tokens_per_step: int = 256
    max_seq_len: int = 64

    def capacity(self) -> Capacity:
        return Capacity(
            max_slots=self.slots,
            num_kv_blocks=self.kv_blocks,
            tokens_per_block=self.tokens_per_block,
            max_tokens_per_step=self.max_tokens_per_step,
            max_seq_len=self.max_seq_len,
            vocab_size=1000,
        )


def fake(shape: Shape | None = None, **kwargs: object) -> ScriptedExecutor:
    return ScriptedExecutor((shape or Shape()).capacity(), **kwargs)  # type: ignore[arg-type]


def req(
    tier: Tier,
    prompt: tuple[int, ...] = (1, 2, 3),
    max_tokens: int = 4,
    deadline: float | None = None,
) -> SchedRequest:
    return SchedRequest(
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens),
        tier=tier,
        ttft_deadline=deadline,
    )


def online(prompt: tuple[int, ...] = (1, 2, 3), max_tokens: int = 4, **kw: float) -> SchedRequest:
    return req(Tier.ONLINE, prompt, max_tokens, **kw)


def offline(prompt: tuple[int, ...] = (1, 2, 3), max_tokens: int = 4) -> SchedRequest:
    return req(Tier.OFFLINE, prompt, max_tokens)


def live_prompts(ex: ScriptedExecutor) -> set[tuple[int, ...]]:
    """Prompts of the sequences the executor holds (queued or running) right now."""
    live = set(ex.live_ids)
    return {r.prompt_token_ids for r in ex.enqueued if r.request_id in live}


def run_until_idle(
    sched: BackfillScheduler, recorder: Recorder, ids: list[int], max_passes: int = 500
) -> None:
    """Runs passes until every id has its final event."""
    for _ in range(max_passes):
        if all(recorder.finals(i) for i in ids):
            return
        sched.run_pass()
    raise AssertionError("requests did not finish")
