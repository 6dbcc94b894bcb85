"""The ``trtllm`` backend: the Executor protocol over ``tensorrt_llm.bindings.executor``.

TensorRT-LLM's executor already is an in-flight batching engine with a queue, paged KV cache
and KV block reuse (prefix caching), so this adapter is thin: it maps our requests onto its
``Request`` (streaming, input = prompt + resume tokens, max tokens = what is left, priority
passed through), turns its ``Response``s into ``TokenDelta``s on one response thread, and maps
``IterationStats`` onto ``ExecutorStats``. ``tensorrt_llm`` is imported only inside
``load_bindings``, so the rest of the project never needs it.

An engine with a draft (``manifest.draft``) runs draft-target speculative decoding instead; see
``trtllm_spec``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer
from server.executor.base import (
    Capacity,
    ExecRequest,
    Executor,
    ExecutorStats,
    FinishReason,
    TokenDelta,
)
from server.executor.trtllm_pump import Outbox, ResponsePump
from server.executor.trtllm_request import (
    TokenPolicy,
    build_request,
    finish_reason,
    remaining,
    reused_tokens,
    validate,
)
from server.executor.trtllm_stats import StatsAccumulator
from server.executor.trtllm_stream import SequenceStream

CAPACITY_POLICIES = ("guaranteed_no_evict", "max_utilization")


@dataclass(frozen=True, slots=True)
class TrtllmConfig:
    """Run-time knobs of the TensorRT-LLM executor (the engine's limits are in the manifest)."""

    # GUARANTEED_NO_EVICT reserves a request's whole KV need at admission: no engine-side
    # eviction fights our scheduler. MAX_UTILIZATION packs more but may pause requests.
    capacity_policy: str = "guaranteed_no_evict"
    # Chunked context lets long prompts share iterations with decodes (stable online TPOT).
    enable_chunked_context: bool = True
    free_gpu_memory_fraction: float = 0.90  # of free GPU memory after weights, for KV blocks
    host_cache_bytes: int | None = None  # KV offload to host memory; None = off
    max_queue_size: int | None = None  # None = unbounded (our scheduler bounds its queues)
    iter_stats_max_iterations: int = 1000
    await_timeout_s: float = 0.02  # response thread wait; bounds shutdown latency

    def __post_init__(self) -> None:
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity_policy must be one of {CAPACITY_POLICIES}, "
                             f"got {self.capacity_policy!r}")
        if not 0.0 < self.free_gpu_memory_fraction <= 1.0:
            raise ValueError("free_gpu_memory_fraction must be in (0, 1]")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1 or None")
        if self.await_timeout_s <= 0:
            raise ValueError("await_timeout_s must be > 0")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TrtllmConfig:
        """``BACKFILL_TRTLLM_CAPACITY_POLICY`` and friends; the factory passes no config."""
        e = os.environ if env is None else env
        default = cls()
        host = e.get("BACKFILL_TRTLLM_HOST_CACHE_BYTES")
        queue = e.get("BACKFILL_TRTLLM_MAX_QUEUE_SIZE")
        return cls(
            capacity_policy=e.get("BACKFILL_TRTLLM_CAPACITY_POLICY", default.capacity_policy),
            enable_chunked_context=e.get("BACKFILL_TRTLLM_CHUNKED_CONTEXT", "1") != "0",
            free_gpu_memory_fraction=float(e.get("BACKFILL_TRTLLM_KV_FRACTION",
                                                 default.free_gpu_memory_fraction)),
            host_cache_bytes=int(host) if host else None,
            max_queue_size=int(queue) if queue else None,
        )


def load_bindings() -> Any:
    """``tensorrt_llm.bindings.executor``, or a clear error where it is not installed."""
    try:
        from tensorrt_llm.bindings import executor as bindings  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("the trtllm backend needs TensorRT-LLM 1.2.1 and an NVIDIA GPU: "
                           "pip install 'backfill[trtllm]' (or use the docker/Dockerfile "
                           "image); the cpu backend works without it") from exc
    return bindings


def executor_config(b: Any, manifest: Manifest, config: TrtllmConfig) -> Any:
    """In-flight batching with KV block reuse; every behaviour-changing default set explicitly."""
    policy = getattr(b.CapacitySchedulerPolicy, config.capacity_policy.upper())
    return b.ExecutorConfig(
        max_beam_width=1,
        scheduler_config=b.SchedulerConfig(
            capacity_scheduler_policy=policy,
            context_chunking_policy=b.ContextChunkingPolicy.FIRST_COME_FIRST_SERVED),
        kv_cache_config=b.KvCacheConfig(
            enable_block_reuse=True,
            free_gpu_memory_fraction=config.free_gpu_memory_fraction,
            host_cache_size=config.host_cache_bytes),
        enable_chunked_context=config.enable_chunked_context,
        iter_stats_max_iterations=config.iter_stats_max_iterations,
        batching_type=b.BatchingType.INFLIGHT,
        max_batch_size=manifest.limits.max_batch_size,
        max_num_tokens=manifest.limits.max_num_tokens,
        max_queue_size=config.max_queue_size,
    )


def open_engine(b: Any, engine_dir: Path, manifest: Manifest, config: TrtllmConfig) -> Any:
    path = engine_dir / manifest.files["engine_dir"]
    return b.Executor(str(path), b.ModelType.DECODER_ONLY, executor_config(b, manifest, config))


def probe_kv_blocks(b: Any, engine: Any, token_id: int, timeout_s: float = 120.0) -> int | None:
    """The engine's real KV pool size: the pool is sized from free GPU memory at start, so
    the manifest only has an estimate. Runs one 1-token request and reads KvCacheStats.
    Call before any response thread exists (it would take the response)."""
    import datetime

    request_id = engine.enqueue_request(b.Request([token_id], 1, streaming=False,
                                                  end_id=token_id, pad_id=token_id))
    engine.await_responses(request_id, datetime.timedelta(seconds=timeout_s))
    blocks = [it.kv_cache_stats.max_num_blocks for it in engine.get_latest_iteration_stats()
              if getattr(it, "kv_cache_stats", None) is not None]
    return int(blocks[-1]) if blocks else None


def token_policy(manifest: Manifest) -> TokenPolicy:
    return TokenPolicy(eos_token_ids=manifest.tokenizer.eos_token_ids,
                       vocab_size=manifest.architecture.vocab_size,
                       max_seq_len=manifest.limits.max_seq_len)


def engine_capacity(manifest: Manifest, num_kv_blocks: int) -> Capacity:
    limits = manifest.limits
    return Capacity(max_slots=limits.max_batch_size, num_kv_blocks=num_kv_blocks,
                    tokens_per_block=limits.tokens_per_block,
                    max_tokens_per_step=limits.max_num_tokens, max_seq_len=limits.max_seq_len,
                    vocab_size=manifest.architecture.vocab_size)


class TrtllmExecutor:
    """One TensorRT-LLM engine behind the Executor protocol. Thread-safe."""

    def __init__(self, engine: Any, bindings: Any, tokenizer: EngineTokenizer,
                 manifest: Manifest, config: TrtllmConfig | None = None, *,
                 kv_blocks: int | None = None) -> None:
        self._b = bindings
        self._engine = engine
        self._tokenizer = tokenizer
        self._manifest = manifest
        self._policy = token_policy(manifest)
        self._stats = StatsAccumulator(kv_blocks or manifest.limits.num_kv_blocks)
        self._lock = threading.Lock()
        self._streams: dict[int, SequenceStream] = {}  # our request id -> its stream
        self._engine_ids: dict[int, int] = {}  # our request id -> engine request id
        self._owners: dict[int, int | None] = {}  # engine id -> our id (None: already ended)
        self._outbox = Outbox()
        self._closed = False
        cfg = config or TrtllmConfig()
        self._pump = ResponsePump(engine, self._on_responses, self._absorb_stats,
                                  timeout_s=cfg.await_timeout_s, name="trtllm-responses")

    @classmethod
    def from_manifest(cls, engine_dir: Path, manifest: Manifest,
                      config: TrtllmConfig | None = None) -> Executor:
        """Opens DIR's engine; with a draft engine, the draft-target executor instead."""
        cfg = config or TrtllmConfig.from_env()
        b = load_bindings()
        tokenizer = EngineTokenizer.load(Path(engine_dir), manifest)
        if manifest.draft is not None:
            from server.executor.trtllm_spec import SpeculativeExecutor

            return SpeculativeExecutor.open(b, Path(engine_dir), manifest, tokenizer, cfg)
        engine = open_engine(b, Path(engine_dir), manifest, cfg)
        kv_blocks = probe_kv_blocks(b, engine, manifest.tokenizer.eos_token_ids[0])
        return cls(engine, b, tokenizer, manifest, cfg, kv_blocks=kv_blocks)

    # -- the protocol ---------------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return engine_capacity(self._manifest, self._stats.kv_blocks_total)

    def enqueue(self, request: ExecRequest) -> None:
        validate(request, self._policy)
        left = remaining(request)
        trt_request = build_request(self._b, request, left, self._policy, streaming=True)
        with self._lock:
            if self._closed:
                raise ValueError("the executor is shut down")
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id}")
            stream = SequenceStream(request, IncrementalDetokenizer(self._tokenizer,
                                                                    left.context))
            try:
                engine_id = self._engine.enqueue_request(trt_request)
            except Exception as exc:  # queue full, engine shut down: the request ends here
                self._outbox.put(stream.failed(f"TensorRT-LLM refused the request: {exc}"))
                return
            self._streams[request.request_id] = stream
            self._engine_ids[request.request_id] = engine_id
            self._owners[engine_id] = request.request_id

    def cancel(self, request_id: int) -> None:
        """The engine ends the request after its current iteration with CANCELLED."""
        with self._lock:
            engine_id = self._engine_ids.get(request_id)
            if engine_id is not None:
                self._engine.cancel_request(engine_id)

    def poll(self, timeout: float) -> list[TokenDelta]:
        return self._outbox.take(timeout)

    def stats(self) -> ExecutorStats:
        self._absorb_stats()
        return self._stats.snapshot()

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            finals = [s.on_final((), FinishReason.CANCELLED) for s in self._streams.values()]
            self._streams.clear()
            self._engine_ids.clear()
            self._owners.clear()
        self._outbox.put(*finals)
        self._pump.stop()
        self._engine.shutdown()

    # -- the response thread --------------------------------------------------------------

    def _absorb_stats(self) -> None:
        self._stats.absorb(self._engine.get_latest_iteration_stats())

    def _on_responses(self, responses: list[Any]) -> None:
        with self._lock:
            for response in responses:
                delta = self._on_response(response)
                if delta is not None:
                    self._outbox.put(delta)

    def _on_response(self, response: Any) -> TokenDelta | None:
        engine_id = response.request_id
        owner = self._owners.get(engine_id)
        if owner is None:  # ended on our side (stop string, shutdown) or unknown
            if response.has_error() or response.result.is_final:
                self._owners.pop(engine_id, None)
            return None
        stream = self._streams[owner]
        if response.has_error():
            self._forget(owner, engine_id)
            return stream.failed(response.error_msg)
        result = response.result
        ids = list(result.output_token_ids[0]) if result.output_token_ids else []
        self._note_first(stream, result)
        self._stats.count_generated(len(ids))
        if result.is_final:
            self._forget(owner, engine_id)
            finish, error = finish_reason(self._b, result.finish_reasons[0])
            return stream.on_final(ids, finish, error)
        emitted = stream.on_tokens(ids)
        if emitted.stopped:  # a stop string: we are done; the engine learns next iteration
            self._forget(owner, engine_id, keep_owner=True)
            self._engine.cancel_request(engine_id)
        return emitted.delta

    def _note_first(self, stream: SequenceStream, result: Any) -> None:
        if stream.prompt_counted:
            return
        cached = reused_tokens(result, self._manifest.limits.tokens_per_block)
        stream.note_cached(cached)
        stream.prompt_counted = True
        context = len(stream.request.prompt_token_ids) + len(stream.request.resume_token_ids)
        self._stats.count_prompt(context, min(cached or 0, context))

    def _forget(self, owner: int, engine_id: int, *, keep_owner: bool = False) -> None:
        self._streams.pop(owner, None)
        self._engine_ids.pop(owner, None)
        if keep_owner:
            self._owners[engine_id] = None  # swallow the engine's late final
        else:
            self._owners.pop(engine_id, None)
