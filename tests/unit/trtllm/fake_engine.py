"""The fake in-flight batching engine behind ``Executor`` (semantics: see fake_bindings.py)."""

from __future__ import annotations

import datetime
import itertools
import json
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.unit.trtllm import fake_model
from tests.unit.trtllm.fake_model import FakeModel, Sampling, regularize_top_k_top_p
from tests.unit.trtllm.fake_types import (
    CapacitySchedulerPolicy,
    ExecutorConfig,
    FinishReason,
    InflightBatchingStats,
    IterationStats,
    KvCacheMetrics,
    KvCacheStats,
    ModelType,
    Request,
    RequestPerfMetrics,
    Response,
    Result,
    SpecDecodingStats,
)

DEFAULT_KV_FRACTION = 0.9  # KvCacheConfig::kDefaultGpuMemFraction
SPEC_MODE_NONE = 1  # SpeculativeDecodingMode.NONE
SPEC_MODE_DRAFT_TOKENS_EXTERNAL = 2  # an IntFlag: 1 << 1 (8 is LOOKAHEAD_DECODING)


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


def write_engine_config(engine_dir: Path, *, vocab_size: int = 300, max_batch_size: int = 4,
                        max_num_tokens: int = 256, max_seq_len: int = 128,
                        max_draft_len: int = 0, tokens_per_block: int = 32,
                        fake: dict[str, Any] | None = None) -> None:
    """A config.json shaped like trtllm-build's (pretrained_config / build_config)."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "1.2.1",
        "pretrained_config": {"architecture": "LlamaForCausalLM", "vocab_size": vocab_size},
        "build_config": {
            "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens,
            "max_seq_len": max_seq_len, "max_input_len": max_seq_len - 1,
            "max_draft_len": max_draft_len,
            "speculative_decoding_mode": (SPEC_MODE_DRAFT_TOKENS_EXTERNAL if max_draft_len
                                          else SPEC_MODE_NONE),
            "plugin_config": {"tokens_per_block": tokens_per_block,
                              "use_paged_context_fmha": True, "paged_kv_cache": True},
        },
        "fake": fake or {},
    }
    (engine_dir / "config.json").write_text(json.dumps(config))


@dataclass
class _Seq:
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


def _shutdown_error(what: str = "") -> RuntimeError:
    # TLLM_CHECK_WITH_INFO(!mShutdownCalled, "Shutdown called") in executorImpl.cpp
    return RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: Shutdown called{what}")


class Executor:
    """``Executor(model_path, model_type, executor_config)`` over a fake engine directory."""

    def __init__(self, model_path: str | Path, model_type: ModelType,
                 executor_config: ExecutorConfig) -> None:
        config_path = Path(model_path) / "config.json"
        if not config_path.is_file():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Failed to open {config_path}")
        raw = json.loads(config_path.read_text())
        build = raw["build_config"]
        fake = raw.get("fake", {})
        model_keys = {"low", "high", "salt", "eos_every", "perturb_every"}
        model = FakeModel(vocab_size=raw["pretrained_config"]["vocab_size"],
                          **{k: v for k, v in fake.items() if k in model_keys})
        limits = EngineLimits(
            max_batch_size=min(executor_config.max_batch_size or build["max_batch_size"],
                               build["max_batch_size"]),
            max_num_tokens=executor_config.max_num_tokens or build["max_num_tokens"],
            max_seq_len=build["max_seq_len"], max_input_len=build["max_input_len"],
            max_draft_len=build.get("max_draft_len", 0),
            tokens_per_block=build["plugin_config"]["tokens_per_block"],
            num_blocks=fake.get("num_blocks", 64))
        self._start(model, limits, executor_config, model_type=model_type,
                    weight_blocks=fake.get("weight_blocks", 0),
                    fail_at_context_len=fake.get("fail_at_context_len"))

    @classmethod
    def for_model(cls, model: FakeModel, limits: EngineLimits, config: ExecutorConfig, *,
                  weight_blocks: int = 0, fail_at_context_len: int | None = None,
                  drafter: Drafter | None = None) -> Executor:
        """Test-only constructor (the fake LLM API runs its model on this engine)."""
        engine = cls.__new__(cls)
        engine._start(model, limits, config, model_type=ModelType.DECODER_ONLY,
                      weight_blocks=weight_blocks, fail_at_context_len=fail_at_context_len,
                      drafter=drafter)
        return engine

    def _start(self, model: FakeModel, limits: EngineLimits, config: ExecutorConfig, *,
               model_type: ModelType, weight_blocks: int, fail_at_context_len: int | None,
               drafter: Drafter | None = None) -> None:
        kv = config.kv_cache_config
        cap = limits.num_blocks
        if kv.max_tokens is not None:
            cap = min(cap, kv.max_tokens // limits.tokens_per_block)
        fraction = kv.free_gpu_memory_fraction
        device = fake_model.DEVICE
        num_blocks = device.allocate(weight_blocks, DEFAULT_KV_FRACTION if fraction is None
                                     else fraction, cap)
        # The KV pool and the weights go back to the device when this object is destroyed.
        weakref.finalize(self, device.release, weight_blocks + num_blocks)
        self.model = model
        self.drafter = drafter
        self.fail_at_context_len = fail_at_context_len
        self.limits = EngineLimits(**{**limits.__dict__, "num_blocks": num_blocks})
        self.model_type = model_type
        self.config = config
        self.enqueued: list[Request] = []  # test introspection: every accepted request
        self.cancel_calls: list[int] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)  # executorImpl.cpp: mLastReqId = 1, per executor
        self._arrivals = itertools.count()
        self._queue: list[_Seq] = []
        self._active: list[_Seq] = []
        self._known: dict[int, _Seq] = {}
        self._responses: list[Response] = []
        self._stats: list[IterationStats] = []
        self._iter = 0
        self._cached_prefixes: set[tuple[int, ...]] = set()
        self._totals = KvCacheStats()
        self._paused = False
        self._shutdown = False
        self._thread = threading.Thread(target=self._loop, name="fake-trtllm", daemon=True)
        self._thread.start()

    # -- API ------------------------------------------------------------------------------

    def enqueue_request(self, request: Request) -> int:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error(", cannot enqueue requests")
            limit = self.config.max_queue_size
            if limit is not None and limit > 0 and len(self._queue) >= limit:
                raise RuntimeError(f"[TensorRT-LLM][ERROR] Maximum queue size of {limit} "
                                   "has been reached, please try again later")
            if not request.input_token_ids:
                raise RuntimeError("[TensorRT-LLM][ERROR] Input length is 0")
            engine_id = next(self._ids)
            sc = request.sampling_config
            k, p = regularize_top_k_top_p(sc.top_k, sc.top_p)
            sampling = Sampling(top_k=k, top_p=p,
                                temperature=sc.temperature or fake_model.DEFAULT_TEMPERATURE,
                                seed=fake_model.DEFAULT_SEED if sc.seed is None else sc.seed)
            seq = _Seq(engine_id, request, next(self._arrivals), request.input_token_ids,
                       len(request.input_token_ids), sampling)
            self.enqueued.append(request)
            self._known[engine_id] = seq
            self._queue.append(seq)
            self._lock.notify_all()
            return engine_id

    def enqueue_requests(self, requests: Sequence[Request]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def await_responses(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The three overloads: ``(timeout=None)``, ``(id, timeout=None)``, ``(ids, timeout)``."""
        target: int | list[int] | None = kwargs.pop("id", kwargs.pop("ids", None))
        timeout = kwargs.pop("timeout", None)
        if args and isinstance(args[0], (int, list)):
            target, args = args[0], args[1:]
        if args:
            timeout = args[0]
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError("await_responses(): timeout must be a datetime.timedelta")
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            while True:
                ready = self._take(target)
                if ready or self._shutdown:  # a waiter wakes when shutdown begins
                    return ready
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return ready
                self._lock.wait(left)

    def get_num_responses_ready(self, id: int | None = None) -> int:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            return sum(1 for r in self._responses if id is None or r.request_id == id)

    def cancel_request(self, id: int) -> None:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            self.cancel_calls.append(id)
            seq = self._known.get(id)
            if seq is not None:  # unknown or finished ids are a no-op
                seq.cancelled = True
                self._lock.notify_all()

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            out, self._stats = self._stats, []
            return out

    def get_latest_request_stats(self) -> list[Any]:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
        return []  # request stats are off by default (request_stats_max_iterations = 0)

    def can_enqueue_requests(self) -> bool:
        return not self._shutdown

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # -- test controls (not in the real API) ---------------------------------------------

    def pause(self) -> None:
        """Stops iterations, so a test can build up a queue deterministically."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def queued_ids(self) -> list[int]:
        with self._lock:
            return [s.engine_id for s in self._queue]

    # -- the loop -------------------------------------------------------------------------

    def _take(self, target: int | list[int] | None) -> list[Any]:
        if isinstance(target, list):
            return [self._take(t) for t in target]
        taken = [r for r in self._responses if target is None or r.request_id == target]
        self._responses = [r for r in self._responses if r not in taken]
        return taken

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._shutdown and (self._paused or not (self._queue or self._active)):
                    self._lock.wait()
                if self._shutdown:
                    return
                self._step()
                self._lock.notify_all()
            time.sleep(0.001)  # an "iteration" takes time, so cancels can land in between

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

    def _validate(self, seq: _Seq) -> None:
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

    def _reserve(self, seq: _Seq) -> int:
        policy = self.config.scheduler_config.capacity_scheduler_policy
        if policy == CapacitySchedulerPolicy.GUARANTEED_NO_EVICT:
            return max(seq.max_new, 1)  # room for the whole generation up front
        return 1

    def _reuse(self, seq: _Seq) -> None:
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

    def _forward(self, seq: _Seq, spec: SpecDecodingStats) -> FinishReason | None:
        if seq.max_new <= 0:  # validate() left nothing to generate
            return FinishReason.LENGTH
        if not seq.context_done:
            seq.context_done = True
            cfg = seq.request.external_draft_tokens_config
            return self._verify(seq, cfg.tokens if cfg is not None else [], spec)
        if self.drafter is not None:
            return self._verify(seq, self._propose(seq), spec)
        return self._append(seq, self._next(seq))

    def _propose(self, seq: _Seq) -> list[int]:
        assert self.drafter is not None
        context = list(seq.context)
        out: list[int] = []
        for _ in range(min(self.drafter.max_draft_len, seq.max_new - len(seq.generated) - 1)):
            token = self.drafter.model.token(context, seq.request.end_id)
            out.append(token)
            context.append(token)
        return out

    def _verify(self, seq: _Seq, draft: list[int], stats: SpecDecodingStats
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

    def _next(self, seq: _Seq) -> int:
        return self.model.sample(seq.context, seq.request.end_id, seq.sampling)

    def _append(self, seq: _Seq, token: int) -> FinishReason | None:
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

    def _fail(self, seq: _Seq, message: str) -> None:
        if seq in self._active:
            self._active.remove(seq)
        self._known.pop(seq.engine_id, None)
        self._responses.append(Response(seq.engine_id, f"[TensorRT-LLM][ERROR] {message}",
                                        seq.request.client_id))

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        if seq in self._active:
            self._active.remove(seq)
        self._known.pop(seq.engine_id, None)
        if self.config.kv_cache_config.enable_block_reuse:
            tpb = self.limits.tokens_per_block
            for end in range(tpb, len(seq.context) + 1, tpb):
                self._cached_prefixes.add(tuple(seq.context[:end]))
        self._respond(seq, reason, final=True)

    def _respond(self, seq: _Seq, reason: FinishReason, *, final: bool) -> None:
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
