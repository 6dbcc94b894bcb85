"""TensorRT-LLM ``IterationStats`` -> our ``ExecutorStats``.

``Executor.get_latest_iteration_stats()`` hands over the iterations since the last call and
forgets them, so exactly one place may call it: ``StatsAccumulator.absorb`` keeps the
cumulative figures (busy time, steps, drafts) and the latest snapshot. Request-level counters
(prompt, cached, generated tokens) come from the adapter, which sees every response.

TensorRT-LLM counts reusable cached blocks as free (they sit in the free queue until evicted),
so ``kv_blocks_cached`` is 0 here and ``kv_blocks_free`` includes them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server.executor.base import ExecutorStats


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    total: int
    used: int
    free: int
    tokens_per_block: int


def kv_snapshot(iteration: Any) -> KvSnapshot | None:
    kv = getattr(iteration, "kv_cache_stats", None)
    if kv is None:
        return None
    return KvSnapshot(total=int(kv.max_num_blocks), used=int(kv.used_num_blocks),
                      free=int(kv.free_num_blocks), tokens_per_block=int(kv.tokens_per_block))


def step_tokens(iteration: Any) -> int:
    """Tokens computed in one iteration: context tokens plus one per generation request."""
    ifb = getattr(iteration, "inflight_batching_stats", None)
    if ifb is None:
        return 0
    return int(ifb.num_ctx_tokens) + int(ifb.num_gen_requests)


class StatsAccumulator:
    """Thread-safe running totals; ``snapshot`` is what ``Executor.stats()`` returns."""

    def __init__(self, kv_blocks_total: int) -> None:
        self._lock = threading.Lock()
        self._latest: Any = None
        self._kv = KvSnapshot(total=kv_blocks_total, used=0, free=kv_blocks_total,
                              tokens_per_block=0)
        self._steps = 0
        self._busy_s = 0.0
        self._prompt = 0
        self._cached = 0
        self._generated = 0
        self._proposed = 0
        self._accepted = 0

    def absorb(self, iterations: Iterable[Any]) -> None:
        with self._lock:
            for it in iterations:
                self._latest = it
                self._steps = max(self._steps, int(it.iter))
                self._busy_s += float(it.iter_latency_ms) / 1000.0
                kv = kv_snapshot(it)
                if kv is not None:
                    self._kv = kv

    @property
    def kv_blocks_total(self) -> int:
        with self._lock:
            return self._kv.total

    def count_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            self._prompt += prompt_tokens
            self._cached += cached_tokens

    def count_generated(self, num_tokens: int) -> None:
        with self._lock:
            self._generated += num_tokens

    def count_drafts(self, proposed: int, accepted: int) -> None:
        with self._lock:
            self._proposed += proposed
            self._accepted += accepted

    def snapshot(self) -> ExecutorStats:
        with self._lock:
            it = self._latest
            return ExecutorStats(
                active=int(it.num_active_requests) if it is not None else 0,
                queued=int(it.num_queued_requests) if it is not None else 0,
                kv_blocks_total=self._kv.total,
                kv_blocks_used=self._kv.used,
                kv_blocks_free=self._kv.free,
                kv_blocks_cached=0,
                steps=self._steps,
                last_step_latency_s=float(it.iter_latency_ms) / 1000.0 if it is not None else 0.0,
                last_step_tokens=step_tokens(it) if it is not None else 0,
                prompt_tokens=self._prompt,
                cached_prompt_tokens=self._cached,
                generated_tokens=self._generated,
                busy_seconds=self._busy_s,
                draft_tokens_proposed=self._proposed,
                draft_tokens_accepted=self._accepted,
            )
