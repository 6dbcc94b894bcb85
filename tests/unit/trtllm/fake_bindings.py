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
``LENGTH``, ``max_queue_size`` enforced at enqueue, paged KV blocks with block reuse, and
external draft tokens accepted by comparing them with the engine's own tokens (plus one
correction or bonus token). The behaviours that bite, each from the 1.2 sources:

- request ids count from 1 in every ``Executor`` (``executorImpl.cpp``: ``mLastReqId = 1``), so
  two executors hand out the same ids;
- unset sampling is topK=0, topP=0.0, seed 0, and k=0, p=0 becomes greedy
  (``defaultDecodingParams.h``, ``regularizeTopKTopP``); sampling otherwise draws tokens, so
  a test tells sampling from greedy by the output (``fake_model``);
- ``LlmRequest::validate`` at admission: a prompt over max_input_len fails, more draft tokens
  than the engine's max_draft_len fail ("Draft tokens length (N) exceeds maximum draft tokens
  length (K)."), and ``prompt + max_new_tokens + draft length`` is clamped to max_seq_len,
  counting the engine's max_draft_len for a request sent without draft tokens; a request left
  with nothing to generate ends with LENGTH and no tokens;
- ``cancel_request`` acts at the start of an iteration, on active requests only
  (``terminateCancelledRequests``): a queued request finishes CANCELLED only once scheduled;
- after ``shutdown()`` every call but ``can_enqueue_requests``/``shutdown`` raises
  ("Shutdown called"), and the KV pool goes back to the device only when the ``Executor``
  object is destroyed (``fake_model.DEVICE``: each executor takes ``free_gpu_memory_fraction``,
  default 0.9, of the memory free when it starts);
- ``config.json`` ``build_config.speculative_decoding_mode`` is the IntFlag value
  (DRAFT_TOKENS_EXTERNAL is 2; 8 is LOOKAHEAD_DECODING).

The "model" is deterministic given its seed: greedy tokens depend only on the context (see
``FakeModel.token``), so tests compute expected greedy outputs with the same function. Engine
directories hold a real-shaped ``config.json`` (``pretrained_config`` / ``build_config``) plus
a test-only ``fake`` section.
"""

from __future__ import annotations

from tests.unit.trtllm.fake_engine import (
    EngineLimits,
    Executor,
    write_engine_config,
)
from tests.unit.trtllm.fake_model import FakeModel, model_token
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
