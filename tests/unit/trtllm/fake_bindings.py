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

from tests.unit.trtllm.fake_engine import (
    EngineLimits,
    Executor,
    FakeModel,
    model_token,
    write_engine_config,
)
from tests.unit.trtllm.fake_types import (
    DEFAULT_PRIORITY,
    BatchingType,
    CapacitySchedulerPolicy,
    ContextChunkingPolicy,
    ExecutorConfig,
    ExternalDraftTokensConfig,
    FinishReason,
    InflightBatchingStats,
    IterationStats,
    KvCacheConfig,
    KvCacheMetrics,
    KvCacheStats,
    ModelType,
    OutputConfig,
    Request,
    RequestPerfMetrics,
    Response,
    Result,
    SamplingConfig,
    SchedulerConfig,
    SpecDecodingStats,
)

__version__ = "1.2.1-fake"

__all__ = [
    "DEFAULT_PRIORITY",
    "BatchingType",
    "CapacitySchedulerPolicy",
    "ContextChunkingPolicy",
    "EngineLimits",
    "Executor",
    "ExecutorConfig",
    "ExternalDraftTokensConfig",
    "FakeModel",
    "FinishReason",
    "InflightBatchingStats",
    "IterationStats",
    "KvCacheConfig",
    "KvCacheMetrics",
    "KvCacheStats",
    "ModelType",
    "OutputConfig",
    "Request",
    "RequestPerfMetrics",
    "Response",
    "Result",
    "SamplingConfig",
    "SchedulerConfig",
    "SpecDecodingStats",
    "model_token",
    "write_engine_config",
]
