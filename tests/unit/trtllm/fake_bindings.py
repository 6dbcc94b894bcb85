"""A fake of ``tensorrt_llm.bindings.executor`` (TensorRT-LLM 1.2.1) for tests without a GPU.

Names, argument names, defaults and semantics follow the 1.2.1 sources (the default wheel is
built with nanobind; ``pybind/executor/`` binds the same Python names):

- ``cpp/tensorrt_llm/nanobind/executor/executor.cpp``: ``Executor(model_path, model_type,
  executor_config)``, ``enqueue_request``, ``enqueue_requests``, the three ``await_responses``
  overloads (``timeout`` / ``id, timeout`` / ``ids, timeout``; a ``datetime.timedelta``),
  ``get_num_responses_ready(id=None)``, ``cancel_request(id)``, ``get_latest_iteration_stats``,
  ``get_latest_request_stats``, ``can_enqueue_requests``, ``shutdown``.
- ``cpp/tensorrt_llm/nanobind/executor/request.cpp``: ``SamplingConfig(beam_width=1, *, ...)``,
  ``OutputConfig``, ``ExternalDraftTokensConfig(tokens, logits, acceptance_threshold,
  fast_logits)``, ``Request(input_token_ids, max_tokens, *, streaming=False, ...,
  priority=0.5, ...)``, ``Result`` fields, ``Response`` (``has_error()`` is a method; reading
  ``result`` of an error response or ``error_msg`` of a good one throws), ``FinishReason``.
- ``cpp/tensorrt_llm/nanobind/executor/executorConfig.cpp``: ``SchedulerConfig``,
  ``KvCacheConfig(enable_block_reuse=True, max_tokens=None, ...)``, ``ExecutorConfig(...)``.
- ``cpp/tensorrt_llm/nanobind/executor/bindings.cpp``: ``ModelType``, ``CapacitySchedulerPolicy``,
  ``ContextChunkingPolicy``, ``KvCacheStats``, ``InflightBatchingStats``, ``SpecDecodingStats``,
  ``IterationStats`` (``specdec_stats``).
- ``cpp/include/tensorrt_llm/executor/executor.h``: ``getLatestIterationStats`` returns the
  stats gathered since the last call (a deque, drained), at most ``iter_stats_max_iterations``.

Behaviour modelled (an in-flight batching executor on a worker thread, like the real one):
a priority queue (higher ``priority`` first, FCFS within equal priority), at most
``max_batch_size`` active requests, context in the iteration a request is scheduled (its first
token at the end of it), one token per generation iteration, streaming deltas of only new
tokens, non-streaming results that include the input unless ``exclude_input_from_output``,
``END_ID`` (the end token is not returned), ``STOP_WORDS`` (stop tokens are returned),
``LENGTH``, ``CANCELLED`` one iteration after ``cancel_request``, ``max_queue_size`` enforced
at enqueue, paged KV blocks with block reuse, and external draft tokens accepted by comparing
them with the engine's own greedy tokens (plus one correction or bonus token).

The "model" is deterministic: the next token depends only on the context (see ``model_token``),
so tests compute expected outputs with the same function. Engine directories hold a real-shaped
``config.json`` (``pretrained_config`` / ``build_config``) plus a test-only ``fake`` section.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__version__ = "1.2.1-fake"

DEFAULT_PRIORITY = 0.5  # tle::Request::kDefaultPriority


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class ContextChunkingPolicy(enum.Enum):
    FIRST_COME_FIRST_SERVED = 0
    EQUAL_PROGRESS = 1


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class SchedulerConfig:
    def __init__(self, capacity_scheduler_policy: CapacitySchedulerPolicy =
                 CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
                 context_chunking_policy: ContextChunkingPolicy | None = None,
                 dynamic_batch_config: Any = None) -> None:
        self.capacity_scheduler_policy = capacity_scheduler_policy
        self.context_chunking_policy = context_chunking_policy
        self.dynamic_batch_config = dynamic_batch_config


class KvCacheConfig:
    def __init__(self, enable_block_reuse: bool = True, max_tokens: int | None = None,
                 max_attention_window: list[int] | None = None,
                 sink_token_length: int | None = None,
                 free_gpu_memory_fraction: float | None = None,
                 host_cache_size: int | None = None, onboard_blocks: bool = True,
                 cross_kv_cache_fraction: float | None = None,
                 secondary_offload_min_priority: int | None = None,
                 event_buffer_max_size: int = 0, *, enable_partial_reuse: bool = True,
                 copy_on_partial_reuse: bool = True, use_uvm: bool = False,
                 runtime_defaults: Any = None) -> None:
        if free_gpu_memory_fraction is not None and not 0 < free_gpu_memory_fraction <= 1:
            raise RuntimeError("free_gpu_memory_fraction must be in (0, 1]")
        self.enable_block_reuse = enable_block_reuse
        self.max_tokens = max_tokens
        self.max_attention_window = max_attention_window
        self.sink_token_length = sink_token_length
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.host_cache_size = host_cache_size
        self.onboard_blocks = onboard_blocks
        self.cross_kv_cache_fraction = cross_kv_cache_fraction
        self.secondary_offload_min_priority = secondary_offload_min_priority
        self.event_buffer_max_size = event_buffer_max_size
        self.enable_partial_reuse = enable_partial_reuse
        self.copy_on_partial_reuse = copy_on_partial_reuse
        self.use_uvm = use_uvm


class ExecutorConfig:
    """All 28 constructor arguments of the binding, by name; unknown names raise TypeError."""

    def __init__(self, max_beam_width: int = 1, scheduler_config: SchedulerConfig | None = None,
                 kv_cache_config: KvCacheConfig | None = None,
                 enable_chunked_context: bool = False, normalize_log_probs: bool = True,
                 iter_stats_max_iterations: int = 1000, request_stats_max_iterations: int = 0,
                 batching_type: BatchingType = BatchingType.INFLIGHT,
                 max_batch_size: int | None = None, max_num_tokens: int | None = None,
                 parallel_config: Any = None, peft_cache_config: Any = None,
                 logits_post_processor_config: Any = None, decoding_config: Any = None,
                 use_gpu_direct_storage: bool = False, gpu_weights_percent: float = 1.0,
                 max_queue_size: int | None = None,
                 extended_runtime_perf_knob_config: Any = None, debug_config: Any = None,
                 recv_poll_period_ms: int = 0, max_seq_idle_microseconds: int = 180_000_000,
                 spec_dec_config: Any = None, guided_decoding_config: Any = None,
                 additional_model_outputs: Any = None, cache_transceiver_config: Any = None,
                 gather_generation_logits: bool = False, mm_embedding_offloading: bool = False,
                 enable_trt_overlap: bool = False) -> None:
        self.max_beam_width = max_beam_width
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.enable_chunked_context = enable_chunked_context
        self.iter_stats_max_iterations = iter_stats_max_iterations
        self.request_stats_max_iterations = request_stats_max_iterations
        self.batching_type = batching_type
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.decoding_config = decoding_config
        self.max_queue_size = max_queue_size
        self.spec_dec_config = spec_dec_config
        self.gather_generation_logits = gather_generation_logits


_SAMPLING_NAMES = ("top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed",
                   "temperature", "min_tokens", "beam_search_diversity_rate",
                   "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "length_penalty", "early_stopping", "no_repeat_ngram_size",
                   "num_return_sequences", "min_p", "beam_width_array")


class SamplingConfig:
    """``SamplingConfig(beam_width=1, *, top_k=None, ...)``; checks as samplingConfig.cpp does."""

    top_k: int | None
    top_p: float | None
    temperature: float | None
    min_tokens: int | None
    seed: int | None

    def __init__(self, beam_width: int = 1, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(_SAMPLING_NAMES)
        if unknown:
            raise TypeError(f"SamplingConfig: unexpected keyword arguments {sorted(unknown)}")
        self.beam_width = beam_width
        for name in _SAMPLING_NAMES:
            setattr(self, name, kwargs.get(name))
        if self.top_k is not None and self.top_k < 0:
            raise RuntimeError("topK must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RuntimeError("topP must be in (0, 1]")
        if self.temperature is not None and self.temperature <= 0:
            raise RuntimeError("temperature must be > 0")
        if self.min_tokens is not None and self.min_tokens < 0:
            raise RuntimeError("minTokens must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise TypeError("seed must fit uint64")


class OutputConfig:
    def __init__(self, return_log_probs: bool = False, return_context_logits: bool = False,
                 return_generation_logits: bool = False,
                 exclude_input_from_output: bool = False, return_encoder_output: bool = False,
                 return_perf_metrics: bool = False, additional_model_outputs: Any = None) -> None:
        self.return_log_probs = return_log_probs
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.return_encoder_output = return_encoder_output
        self.return_perf_metrics = return_perf_metrics
        self.additional_model_outputs = additional_model_outputs


class ExternalDraftTokensConfig:
    def __init__(self, tokens: Sequence[int], logits: Any = None,
                 acceptance_threshold: float | None = None,
                 fast_logits: bool | None = None) -> None:
        self._tokens = list(tokens)
        self._logits = logits
        self._acceptance_threshold = acceptance_threshold
        self._fast_logits = fast_logits

    @property
    def tokens(self) -> list[int]:  # def_prop_ro
        return list(self._tokens)

    @property
    def logits(self) -> Any:
        return self._logits

    @property
    def acceptance_threshold(self) -> float | None:
        return self._acceptance_threshold


_REQUEST_NAMES = frozenset({
    "streaming", "sampling_config", "output_config", "end_id", "pad_id", "position_ids",
    "bad_words", "stop_words", "embedding_bias", "external_draft_tokens_config",
    "prompt_tuning_config", "multimodal_input", "multimodal_embedding", "mrope_config",
    "lora_config", "lookahead_config", "kv_cache_retention_config",
    "logits_post_processor_name", "logits_post_processor", "encoder_input_token_ids",
    "client_id", "return_all_generated_tokens", "priority", "type", "context_phase_params",
    "encoder_input_features", "encoder_output_length", "cross_attention_mask",
    "num_return_sequences", "eagle_config", "skip_cross_attn_blocks",
    "guided_decoding_params", "language_adapter_uid", "allotted_time_ms"})


class Request:
    """``Request(input_token_ids, max_tokens, *, streaming=False, ...)``; kw-only after two."""

    def __init__(self, input_token_ids: Sequence[int], max_tokens: int, **kwargs: Any) -> None:
        unknown = set(kwargs) - _REQUEST_NAMES
        if unknown:
            raise TypeError(f"Request: unexpected keyword arguments {sorted(unknown)}")
        self._input_token_ids = [int(t) for t in input_token_ids]
        self._max_tokens = int(max_tokens)
        self.streaming: bool = kwargs.get("streaming", False)
        self.sampling_config: SamplingConfig = kwargs.get("sampling_config") or SamplingConfig()
        self.output_config: OutputConfig = kwargs.get("output_config") or OutputConfig()
        self.end_id: int | None = kwargs.get("end_id")
        self.pad_id: int | None = kwargs.get("pad_id")
        self.stop_words: list[list[int]] | None = kwargs.get("stop_words")
        self.bad_words: list[list[int]] | None = kwargs.get("bad_words")
        self.external_draft_tokens_config: ExternalDraftTokensConfig | None = kwargs.get(
            "external_draft_tokens_config")
        self.client_id: int | None = kwargs.get("client_id")
        self.return_all_generated_tokens: bool = kwargs.get("return_all_generated_tokens", False)
        # Constructor-only in the bindings: there is no priority property.
        self._priority = float(kwargs.get("priority", DEFAULT_PRIORITY))
        if not 0.0 <= self._priority <= 1.0:
            raise RuntimeError(f"priority must be in [0, 1], got {self._priority}")

    @property
    def input_token_ids(self) -> list[int]:
        return list(self._input_token_ids)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens


@dataclass
class KvCacheMetrics:
    num_total_allocated_blocks: int = 0
    num_new_allocated_blocks: int = 0
    num_reused_blocks: int = 0
    num_missed_blocks: int = 0
    kv_cache_hit_rate: float = 0.0


@dataclass
class RequestPerfMetrics:
    kv_cache_metrics: KvCacheMetrics = field(default_factory=KvCacheMetrics)
    first_iter: int | None = None
    last_iter: int | None = None
    iter: int | None = None


@dataclass
class Result:
    is_final: bool = False
    output_token_ids: list[list[int]] = field(default_factory=list)  # [beam][tokens]
    cum_log_probs: list[float] | None = None
    log_probs: list[list[float]] | None = None
    finish_reasons: list[FinishReason] = field(default_factory=list)  # [beam]
    sequence_index: int = 0
    is_sequence_final: bool = False
    decoding_iter: int = 0
    request_perf_metrics: RequestPerfMetrics | None = None


class Response:
    def __init__(self, request_id: int, result_or_error: Result | str,
                 client_id: int | None = None) -> None:
        self._request_id = request_id
        self._client_id = client_id
        self._result = result_or_error if isinstance(result_or_error, Result) else None
        self._error = result_or_error if isinstance(result_or_error, str) else None

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def client_id(self) -> int | None:
        return self._client_id

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        if self._error is None:  # tle::Response::getErrorMsg throws without an error
            raise RuntimeError("Cannot get the error message when there is no error")
        return self._error

    @property
    def result(self) -> Result:
        if self._result is None:  # tle::Response::getResult throws on an error response
            raise RuntimeError(f"Cannot get the result for a response with an error "
                               f"({self._error})")
        return self._result


@dataclass
class KvCacheStats:
    max_num_blocks: int = 0
    free_num_blocks: int = 0
    used_num_blocks: int = 0
    tokens_per_block: int = 0
    alloc_total_blocks: int = 0
    alloc_new_blocks: int = 0
    reused_blocks: int = 0
    missed_blocks: int = 0
    cache_hit_rate: float = 0.0


@dataclass
class InflightBatchingStats:
    num_scheduled_requests: int = 0
    num_context_requests: int = 0
    num_gen_requests: int = 0
    num_paused_requests: int = 0
    num_ctx_tokens: int = 0
    micro_batch_id: int = 0
    avg_num_decoded_tokens_per_iter: float = 0.0


@dataclass
class SpecDecodingStats:
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_requests_with_draft_tokens: int = 0
    acceptance_length: float = 0.0
    iter_latency_ms: float = 0.0
    draft_overhead: float = 0.0


@dataclass
class IterationStats:
    timestamp: str = ""
    iter: int = 0
    iter_latency_ms: float = 0.0
    new_active_requests_queue_latency_ms: float = 0.0
    num_new_active_requests: int = 0
    num_active_requests: int = 0
    num_queued_requests: int = 0
    num_completed_requests: int = 0
    max_num_active_requests: int = 0
    gpu_mem_usage: int = 0
    cpu_mem_usage: int = 0
    pinned_mem_usage: int = 0
    kv_cache_stats: KvCacheStats | None = None
    cross_kv_cache_stats: KvCacheStats | None = None
    static_batching_stats: Any = None
    inflight_batching_stats: InflightBatchingStats | None = None
    specdec_stats: SpecDecodingStats | None = None


# -- the fake engine ------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeModel:
    """The deterministic "weights": next token from the context alone."""

    vocab_size: int
    low: int = 97  # tokens are drawn from [low, high): printable bytes in the tests' tokenizer
    high: int = 123
    salt: int = 0
    eos_every: int | None = None  # emit end_id when the context length is a multiple of this
    perturb_every: int | None = None  # a "draft" model: differs when len % perturb_every == 0

    def token(self, context: Sequence[int], end_id: int | None) -> int:
        n = len(context)
        if self.eos_every and end_id is not None and end_id >= 0 and n % self.eos_every == 0:
            return end_id
        span = self.high - self.low
        t = self.low + (31 * context[-1] + 7 * n + self.salt) % span
        if self.perturb_every and n % self.perturb_every == 0:
            t = self.low + (t - self.low + 1) % span
        return t


def model_token(model: FakeModel, context: Sequence[int], end_id: int | None) -> int:
    return model.token(context, end_id)


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_draft_len: int
    tokens_per_block: int
    num_blocks: int


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
            "max_seq_len": max_seq_len, "max_draft_len": max_draft_len,
            "speculative_decoding_mode": 8 if max_draft_len else 1,
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
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    context_done: bool = False
    cancelled: bool = False
    reused_blocks: int = 0
    missed_blocks: int = 0


class _RequestError(Exception):
    """A request the engine fails; it ends with an error response, as in the real executor."""


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
        self.fail_at_context_len: int | None = fake.get("fail_at_context_len")
        model_keys = {"low", "high", "salt", "eos_every", "perturb_every"}
        self.model = FakeModel(vocab_size=raw["pretrained_config"]["vocab_size"],
                               **{k: v for k, v in fake.items() if k in model_keys})
        tpb = build["plugin_config"]["tokens_per_block"]
        kv = executor_config.kv_cache_config
        num_blocks = fake.get("num_blocks", 64)
        if kv.max_tokens is not None:
            num_blocks = min(num_blocks, kv.max_tokens // tpb)
        self.limits = EngineLimits(
            max_batch_size=min(executor_config.max_batch_size or build["max_batch_size"],
                               build["max_batch_size"]),
            max_num_tokens=executor_config.max_num_tokens or build["max_num_tokens"],
            max_seq_len=build["max_seq_len"], max_draft_len=build.get("max_draft_len", 0),
            tokens_per_block=tpb, num_blocks=num_blocks)
        self.model_type = model_type
        self.config = executor_config
        self.enqueued: list[Request] = []  # test introspection: every accepted request
        self.cancel_calls: list[int] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
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
                raise RuntimeError("[TensorRT-LLM][ERROR] Shutdown called, cannot enqueue")
            limit = self.config.max_queue_size
            if limit is not None and limit > 0 and len(self._queue) >= limit:
                raise RuntimeError(f"[TensorRT-LLM][ERROR] Maximum queue size of {limit} "
                                   "has been reached, please try again later")
            if not request.input_token_ids:
                raise RuntimeError("[TensorRT-LLM][ERROR] Input length is 0")
            engine_id = next(self._ids)
            seq = _Seq(engine_id, request, next(self._arrivals), request.input_token_ids,
                       len(request.input_token_ids))
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
            while True:
                ready = self._take(target)
                if ready or self._shutdown:
                    return ready
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return ready
                self._lock.wait(left)

    def get_num_responses_ready(self, id: int | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._responses if id is None or r.request_id == id)

    def cancel_request(self, id: int) -> None:
        with self._lock:
            self.cancel_calls.append(id)
            seq = self._known.get(id)
            if seq is not None:  # unknown or finished ids are a no-op
                seq.cancelled = True
                self._lock.notify_all()

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        with self._lock:
            out, self._stats = self._stats, []
            return out

    def get_latest_request_stats(self) -> list[Any]:
        return []  # request stats are off by default (request_stats_max_iterations = 0)

    def can_enqueue_requests(self) -> bool:
        return not self._shutdown

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown = True
            self._lock.notify_all()
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
        start = time.perf_counter()
        self._iter += 1
        ctx_tokens, num_ctx, num_new = self._admit()
        num_gen = 0
        draft_stats = SpecDecodingStats()
        finished = 0
        for seq in list(self._active):
            if seq.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                finished += 1
                continue
            num_gen += seq.context_done
            try:
                if not seq.context_done:
                    seq.context_done = True
                    reason = self._generate_with_draft(seq, draft_stats)
                else:
                    reason = self._generate(seq, 1)
            except _RequestError as exc:
                self._fail(seq, str(exc))
                finished += 1
                continue
            if reason is not None:
                self._finish(seq, reason)
                finished += 1
            elif seq.request.streaming and seq.unsent:
                self._respond(seq, FinishReason.NOT_FINISHED, final=False)
        for seq in [s for s in self._queue if s.cancelled]:
            self._queue.remove(seq)
            self._finish(seq, FinishReason.CANCELLED)
        self._record(start, ctx_tokens, num_ctx, num_gen, num_new, finished, draft_stats)

    def _admit(self) -> tuple[int, int, int]:
        ctx_tokens = num_ctx = num_new = 0
        self._queue.sort(key=lambda s: (-s.request._priority, s.arrival))
        while self._queue and len(self._active) < self.limits.max_batch_size:
            seq = self._queue[0]
            if seq.cancelled:
                break
            if ctx_tokens + seq.num_input > self.limits.max_num_tokens and num_ctx:
                break
            needed = self._blocks(seq.num_input + self._reserve(seq))
            if needed > self.limits.num_blocks - self._used_blocks():
                break
            self._queue.pop(0)
            self._reuse(seq)
            self._active.append(seq)
            ctx_tokens += seq.num_input
            num_ctx += 1
            num_new += 1
        return ctx_tokens, num_ctx, num_new

    def _reserve(self, seq: _Seq) -> int:
        policy = self.config.scheduler_config.capacity_scheduler_policy
        if policy == CapacitySchedulerPolicy.GUARANTEED_NO_EVICT:
            return seq.request.max_tokens  # room for the whole generation up front
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

    def _generate(self, seq: _Seq, n: int) -> FinishReason | None:
        for _ in range(n):
            reason = self._append(seq, self.model.token(seq.context, seq.request.end_id))
            if reason is not None:
                return reason
        return None

    def _generate_with_draft(self, seq: _Seq, stats: SpecDecodingStats) -> FinishReason | None:
        # Draft tokens ride along with the context phase: accepted ones plus one more token
        # come out of that single iteration.
        draft_cfg = seq.request.external_draft_tokens_config
        if draft_cfg is None:
            return self._generate(seq, 1)
        draft = draft_cfg.tokens
        if len(draft) > self.limits.max_draft_len:
            raise _RequestError(f"Number of draft tokens ({len(draft)}) is larger than maximum "
                                f"number of draft tokens ({self.limits.max_draft_len})")
        stats.num_draft_tokens += len(draft)
        stats.num_requests_with_draft_tokens += 1
        for token in draft:
            own = self.model.token(seq.context, seq.request.end_id)
            if own != token:
                return self._append(seq, own)  # the correction ends the step
            stats.num_accepted_tokens += 1
            reason = self._append(seq, own)
            if reason is not None:
                return reason
        return self._generate(seq, 1)  # the bonus token

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
        if len(seq.generated) >= req.max_tokens or len(seq.context) >= self.limits.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _fail(self, seq: _Seq, message: str) -> None:
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
