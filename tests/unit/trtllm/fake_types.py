"""The value types of the fake ``tensorrt_llm.bindings.executor``: configs, requests,
results, stats (sources: see fake_bindings.py)."""


from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
