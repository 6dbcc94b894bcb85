"""TensorRT-LLM iteration stats -> our ``ExecutorStats``.

Both GPU backends hand over the iterations since the last read and forget them (the bindings'
``get_latest_iteration_stats`` drains a deque; the LLM API's ``get_stats_async`` drains a
queue), so exactly one place per executor may read them: ``StatsAccumulator.absorb`` keeps the
cumulative figures (busy time, steps, drafts) and the latest snapshot. The two backends report
the same C++ ``IterationStats``: objects with snake_case fields from the bindings, JSON dicts
with camelCase keys (``JsonSerialization::toJsonStr``) from the LLM API; ``from_bindings`` and
``from_json`` turn either into one ``IterationSample``. Request-level counters (prompt, cached,
generated tokens) come from the adapter, which sees every response.

TensorRT-LLM counts reusable cached blocks as free (they sit in the free queue until evicted),
so ``kv_blocks_cached`` is 0 here and ``kv_blocks_free`` includes them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine_builder.step_cost import StepSample, StepShape
from server.executor.base import ExecutorStats

STEP_SAMPLES_KEPT = 4096  # step samples nobody took yet are dropped oldest first beyond this


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    total: int
    used: int
    free: int
    tokens_per_block: int


@dataclass(frozen=True, slots=True)
class IterationSample:
    """One engine iteration, whichever backend reported it."""

    iteration: int
    latency_ms: float
    active: int
    queued: int
    kv: KvSnapshot | None
    step_tokens: int  # context tokens plus one per generation request
    context_requests: int
    draft_tokens: int = 0  # speculative tokens the engine itself proposed / accepted
    accepted_tokens: int = 0
    context_tokens: int = 0
    generation_requests: int = 0

    def step_sample(self) -> StepSample | None:
        """What the step-cost model can learn from this iteration: its decode rows and
        prefill tokens (the engine does not report context lengths), and its latency."""
        if self.latency_ms <= 0 or self.step_tokens <= 0:
            return None
        shape = StepShape(
            decode_rows=self.generation_requests,
            prefill_tokens=self.context_tokens,
            prefill_segments=self.context_requests,
            samples=self.generation_requests + self.context_requests,
        )
        return StepSample(shape, self.latency_ms / 1000.0)


def from_bindings(it: Any) -> IterationSample:
    """A ``tensorrt_llm.bindings.executor.IterationStats``."""
    kv = getattr(it, "kv_cache_stats", None)
    ifb = getattr(it, "inflight_batching_stats", None)
    return IterationSample(
        iteration=int(it.iter), latency_ms=float(it.iter_latency_ms),
        active=int(it.num_active_requests), queued=int(it.num_queued_requests),
        kv=None if kv is None else KvSnapshot(
            total=int(kv.max_num_blocks), used=int(kv.used_num_blocks),
            free=int(kv.free_num_blocks), tokens_per_block=int(kv.tokens_per_block)),
        step_tokens=0 if ifb is None else int(ifb.num_ctx_tokens) + int(ifb.num_gen_requests),
        context_requests=0 if ifb is None else int(ifb.num_context_requests),
        context_tokens=0 if ifb is None else int(ifb.num_ctx_tokens),
        generation_requests=0 if ifb is None else int(ifb.num_gen_requests))


def from_json(it: Mapping[str, Any]) -> IterationSample:
    """One dict of ``LLM.get_stats_async()`` (camelCase keys, as nlohmann serializes them)."""
    kv = it.get("kvCacheStats") or None
    ifb = it.get("inflightBatchingStats") or {}
    spec = it.get("specDecodingStats") or {}
    return IterationSample(
        iteration=int(it.get("iter", 0)), latency_ms=float(it.get("iterLatencyMS", 0.0)),
        active=int(it.get("numActiveRequests", 0)), queued=int(it.get("numQueuedRequests", 0)),
        kv=None if kv is None else KvSnapshot(
            total=int(kv.get("maxNumBlocks", 0)), used=int(kv.get("usedNumBlocks", 0)),
            free=int(kv.get("freeNumBlocks", 0)),
            tokens_per_block=int(kv.get("tokensPerBlock", 0))),
        step_tokens=int(ifb.get("numCtxTokens", 0)) + int(ifb.get("numGenRequests", 0)),
        context_requests=int(ifb.get("numContextRequests", 0)),
        draft_tokens=int(spec.get("numDraftTokens", 0)),
        accepted_tokens=int(spec.get("numAcceptedTokens", 0)),
        context_tokens=int(ifb.get("numCtxTokens", 0)),
        generation_requests=int(ifb.get("numGenRequests", 0)))


class StatsAccumulator:
    """Thread-safe running totals; ``snapshot`` is what ``Executor.stats()`` returns."""

    def __init__(self, kv_blocks_total: int) -> None:
        self._lock = threading.Lock()
        self._latest: IterationSample | None = None
        self._kv = KvSnapshot(total=kv_blocks_total, used=0, free=kv_blocks_total,
                              tokens_per_block=0)
        self._steps = 0
        self._busy_s = 0.0
        self._prompt = 0
        self._cached = 0
        self._generated = 0
        self._proposed = 0
        self._accepted = 0
        self._steps_seen: deque[StepSample] = deque(maxlen=STEP_SAMPLES_KEPT)

    def absorb(self, samples: Iterable[IterationSample]) -> None:
        with self._lock:
            for it in samples:
                self._latest = it
                step = it.step_sample()
                if step is not None:
                    self._steps_seen.append(step)
                self._steps = max(self._steps, it.iteration)
                self._busy_s += it.latency_ms / 1000.0
                self._proposed += it.draft_tokens
                self._accepted += it.accepted_tokens
                if it.kv is not None:
                    self._kv = it.kv

    def take_step_samples(self) -> list[StepSample]:
        with self._lock:
            out = list(self._steps_seen)
            self._steps_seen.clear()
            return out

    @property
    def kv(self) -> KvSnapshot:
        with self._lock:
            return self._kv

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
                active=it.active if it is not None else 0,
                queued=it.queued if it is not None else 0,
                kv_blocks_total=self._kv.total,
                kv_blocks_used=self._kv.used,
                kv_blocks_free=self._kv.free,
                kv_blocks_cached=0,
                steps=self._steps,
                last_step_latency_s=it.latency_ms / 1000.0 if it is not None else 0.0,
                last_step_tokens=it.step_tokens if it is not None else 0,
                prompt_tokens=self._prompt,
                cached_prompt_tokens=self._cached,
                generated_tokens=self._generated,
                busy_seconds=self._busy_s,
                context_requests=it.context_requests if it is not None else 0,
                draft_tokens_proposed=self._proposed,
                draft_tokens_accepted=self._accepted,
            )
