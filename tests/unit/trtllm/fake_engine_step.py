"""One iteration of the fake engine: cancels, admission with ``LlmRequest::validate``, one
forward pass with draft verification, responses and stats (semantics: see fake_bindings.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tests.unit.trtllm.fake_model import FakeModel, Sampling
from tests.unit.trtllm.fake_types import (
    CapacitySchedulerPolicy,
    FinishReason,
    InflightBatchingStats,
    IterationStats,
    KvCacheMetrics,
    KvCacheStats,
    Request,
    RequestPerfMetrics,
    Response,
    Result,
    SpecDecodingStats,
)


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_input_len: int
    max_draft_len: int
    tokens_per_block: int
    num_blocks: int


@dataclass(frozen=True)
class Drafter:
    """A drafter inside the engine (the LLM API's speculative_config), proposing greedily."""

    model: FakeModel
    max_draft_len: int


@dataclass
class EngineSeq:
    engine_id: int
    request: Request
    arrival: int
    context: list[int]  # input + generated
    num_input: int
    sampling: Sampling
    max_new: int = 0  # after validate()
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    context_done: bool = False
    cancelled: bool = False
    reused_blocks: int = 0
    missed_blocks: int = 0


class _RequestError(Exception):
    """A request the engine fails; it ends with an error response, as in the real executor."""


class Stepper:
    """The engine state a step works on; ``fake_engine.Executor`` owns the thread and lock."""

    model: FakeModel
    drafter: Drafter | None
    fail_at_context_len: int | None
    limits: EngineLimits
    config: Any
    _queue: list[EngineSeq]
    _active: list[EngineSeq]
    _known: dict[int, EngineSeq]
    _responses: list[Response]
    _stats: list[IterationStats]
    _iter: int
    _cached_prefixes: set[tuple[int, ...]]
    _totals: KvCacheStats

    def _step(self) -> None:
        """executionLoop: cancels among the active first, then admission, then one forward."""
        start = time.perf_counter()
        self._iter += 1
        finished = 0
        for seq in [s for s in self._active if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)  # terminateCancelledRequests
            finished += 1
        ctx_tokens, num_ctx, num_new, refused = self._admit()
        finished += refused
        num_gen = 0
        spec = SpecDecodingStats()
        for seq in list(self._active):
            num_gen += seq.context_done
            try:
                reason = self._forward(seq, spec)
            except _RequestError as exc:
                self._fail(seq, str(exc))
                finished += 1
                continue
            if reason is not None:
                self._finish(seq, reason)
                finished += 1
            elif seq.request.streaming and seq.unsent:
                self._respond(seq, FinishReason.NOT_FINISHED, final=False)
        self._record(start, ctx_tokens, num_ctx, num_gen, num_new, finished, spec)

    def _admit(self) -> tuple[int, int, int, int]:
        """New requests in priority order while slots, tokens and blocks allow; a cancelled
        queued request is admitted like any other (it is terminated next iteration)."""
        ctx_tokens = num_ctx = num_new = refused = 0
        self._queue.sort(key=lambda s: (-s.request._priority, s.arrival))
        while self._queue and len(self._active) < self.limits.max_batch_size:
            seq = self._queue[0]
            if ctx_tokens + seq.num_input > self.limits.max_num_tokens and num_ctx:
                break
            try:
                self._validate(seq)
            except _RequestError as exc:
                self._queue.pop(0)
                self._fail(seq, str(exc))
                refused += 1
                continue
            needed = self._blocks(seq.num_input + self._reserve(seq))
            if needed > self.limits.num_blocks - self._used_blocks():
                break
            self._queue.pop(0)
            self._reuse(seq)
            self._active.append(seq)
            ctx_tokens += seq.num_input
            num_ctx += 1
            num_new += 1
        return ctx_tokens, num_ctx, num_new, refused

    def _validate(self, seq: EngineSeq) -> None:
        """``LlmRequest::validate`` (batch_manager/llmRequest.cpp)."""
        limits, request = self.limits, seq.request
        if seq.num_input > limits.max_input_len:
            raise _RequestError(f"Prompt length ({seq.num_input}) exceeds maximum input length "
                                f"({limits.max_input_len}).")
        draft_cfg = request.external_draft_tokens_config
        draft = draft_cfg.tokens if draft_cfg is not None else []
        draft_len = limits.max_draft_len  # a request without draft tokens still reserves them
        if draft:
            if len(draft) > limits.max_draft_len:
                raise _RequestError(f"Draft tokens length ({len(draft)}) exceeds maximum draft "
                                    f"tokens length ({limits.max_draft_len}).")
            draft_len = min(len(draft), limits.max_input_len - seq.num_input)
            draft_cfg._tokens = draft[:draft_len]  # type: ignore[union-attr]
        seq.max_new = min(request.max_tokens, limits.max_seq_len - seq.num_input - draft_len)

    def _reserve(self, seq: EngineSeq) -> int:
        policy = self.config.scheduler_config.capacity_scheduler_policy
        if policy == CapacitySchedulerPolicy.GUARANTEED_NO_EVICT:
            return max(seq.max_new, 1)  # room for the whole generation up front
        return 1

    def _reuse(self, seq: EngineSeq) -> None:
        tpb = self.limits.tokens_per_block
        full = seq.num_input // tpb
        reused = 0
        if self.config.kv_cache_config.enable_block_reuse:
            while reused < full and tuple(seq.context[:(reused + 1) * tpb]) in \
                    self._cached_prefixes:
                reused += 1
        seq.reused_blocks = reused
        seq.missed_blocks = self._blocks(seq.num_input) - reused
        self._totals.reused_blocks += reused
        self._totals.missed_blocks += seq.missed_blocks
        self._totals.alloc_total_blocks += self._blocks(seq.num_input)
        self._totals.alloc_new_blocks += seq.missed_blocks

    def _forward(self, seq: EngineSeq, spec: SpecDecodingStats) -> FinishReason | None:
        if seq.max_new <= 0:  # validate() left nothing to generate
            return FinishReason.LENGTH
        if not seq.context_done:
            seq.context_done = True
            cfg = seq.request.external_draft_tokens_config
            return self._verify(seq, cfg.tokens if cfg is not None else [], spec)
        if self.drafter is not None:
            return self._verify(seq, self._propose(seq), spec)
        return self._append(seq, self._next(seq))

    def _propose(self, seq: EngineSeq) -> list[int]:
        assert self.drafter is not None
        context = list(seq.context)
        out: list[int] = []
        for _ in range(min(self.drafter.max_draft_len, seq.max_new - len(seq.generated) - 1)):
            token = self.drafter.model.token(context, seq.request.end_id)
            out.append(token)
            context.append(token)
        return out

    def _verify(self, seq: EngineSeq, draft: list[int], stats: SpecDecodingStats
                ) -> FinishReason | None:
        """Draft tokens are accepted while they match the engine's own tokens; the first
        mismatch is replaced by the engine's token, and all-accepted earns a bonus token."""
        if draft:
            stats.num_draft_tokens += len(draft)
            stats.num_requests_with_draft_tokens += 1
        for token in draft:
            own = self._next(seq)
            reason = self._append(seq, own)
            if own != token:
                return reason
            stats.num_accepted_tokens += 1
            if reason is not None:
                return reason
        return self._append(seq, self._next(seq))

    def _next(self, seq: EngineSeq) -> int:
        return self.model.sample(seq.context, seq.request.end_id, seq.sampling)

    def _append(self, seq: EngineSeq, token: int) -> FinishReason | None:
        req = seq.request
        min_tokens = req.sampling_config.min_tokens or 0
        if token == req.end_id and len(seq.generated) < min_tokens:
            token = self.model.low + (token + 1) % (self.model.high - self.model.low)
        if self.fail_at_context_len and len(seq.context) + 1 >= self.fail_at_context_len:
            raise _RequestError("CUDA runtime error: an illegal memory access was encountered")
        if token == req.end_id:
            return FinishReason.END_ID  # the end token is not part of the output
        seq.generated.append(token)
        seq.unsent.append(token)
        seq.context.append(token)
        for word in req.stop_words or []:
            if word and seq.generated[-len(word):] == list(word):
                return FinishReason.STOP_WORDS
        if len(seq.generated) >= seq.max_new or len(seq.context) >= self.limits.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _fail(self, seq: EngineSeq, message: str) -> None:
        if seq in self._active:
            self._active.remove(seq)
        self._known.pop(seq.engine_id, None)
        self._responses.append(Response(seq.engine_id, f"[TensorRT-LLM][ERROR] {message}",
                                        seq.request.client_id))

    def _finish(self, seq: EngineSeq, reason: FinishReason) -> None:
        if seq in self._active:
            self._active.remove(seq)
        self._known.pop(seq.engine_id, None)
        if self.config.kv_cache_config.enable_block_reuse:
            tpb = self.limits.tokens_per_block
            for end in range(tpb, len(seq.context) + 1, tpb):
                self._cached_prefixes.add(tuple(seq.context[:end]))
        self._respond(seq, reason, final=True)

    def _respond(self, seq: EngineSeq, reason: FinishReason, *, final: bool) -> None:
        req = seq.request
        if req.streaming and not req.return_all_generated_tokens:
            tokens = list(seq.unsent)
        elif req.output_config.exclude_input_from_output:
            tokens = list(seq.generated)
        else:
            tokens = seq.context[:seq.num_input] + seq.generated
        if not req.streaming and not final:
            return
        seq.unsent.clear()
        metrics = None
        if req.output_config.return_perf_metrics:
            metrics = RequestPerfMetrics(KvCacheMetrics(
                num_total_allocated_blocks=seq.reused_blocks + seq.missed_blocks,
                num_new_allocated_blocks=seq.missed_blocks, num_reused_blocks=seq.reused_blocks,
                num_missed_blocks=seq.missed_blocks))
        result = Result(is_final=final, output_token_ids=[tokens], finish_reasons=[reason],
                        is_sequence_final=final, decoding_iter=self._iter,
                        request_perf_metrics=metrics)
        self._responses.append(Response(seq.engine_id, result, req.client_id))

    def _record(self, start: float, ctx_tokens: int, num_ctx: int, num_gen: int, num_new: int,
                finished: int, spec: SpecDecodingStats) -> None:
        used = self._used_blocks()
        kv = KvCacheStats(max_num_blocks=self.limits.num_blocks,
                          free_num_blocks=self.limits.num_blocks - used, used_num_blocks=used,
                          tokens_per_block=self.limits.tokens_per_block,
                          alloc_total_blocks=self._totals.alloc_total_blocks,
                          alloc_new_blocks=self._totals.alloc_new_blocks,
                          reused_blocks=self._totals.reused_blocks,
                          missed_blocks=self._totals.missed_blocks)
        ifb = InflightBatchingStats(num_scheduled_requests=num_ctx + num_gen,
                                    num_context_requests=num_ctx, num_gen_requests=num_gen,
                                    num_ctx_tokens=ctx_tokens)
        stats = IterationStats(
            iter=self._iter, iter_latency_ms=(time.perf_counter() - start) * 1000,
            num_new_active_requests=num_new, num_active_requests=len(self._active),
            num_queued_requests=len(self._queue), num_completed_requests=finished,
            max_num_active_requests=self.limits.max_batch_size, kv_cache_stats=kv,
            inflight_batching_stats=ifb, specdec_stats=spec)
        self._stats.append(stats)
        del self._stats[:-self.config.iter_stats_max_iterations]

    def _used_blocks(self) -> int:
        return sum(self._blocks(len(s.context)) for s in self._active)

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.limits.tokens_per_block)
