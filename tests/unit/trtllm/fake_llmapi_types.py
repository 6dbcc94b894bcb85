"""The value types of the fake ``tensorrt_llm.llmapi`` (sources: see fake_llmapi.py): the
strict config models, ``SamplingParams``, ``CompletionOutput``, ``RequestError`` and the
iteration-stats ``IterationResult``."""

from __future__ import annotations

import asyncio
import enum
import json
import queue
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


class RequestError(RuntimeError):
    """The error raised when the request is failed (tensorrt_llm/executor/result.py)."""


def has_event_loop() -> bool:
    """tensorrt_llm/executor/utils.py: whether a loop is running in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Strict:
    """pydantic ``StrictBaseModel`` (extra="forbid"): unknown fields raise; defaults as listed."""

    FIELDS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.FIELDS))
        if unknown:
            raise ValueError(f"{type(self).__name__}: extra inputs are not permitted: {unknown}")
        for name, default in self.FIELDS.items():
            setattr(self, name, kwargs.get(name, default))
        self._check()

    def _check(self) -> None:
        pass


class CapacitySchedulerPolicy(str, enum.Enum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(str, enum.Enum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


class KvCacheConfig(_Strict):
    FIELDS: ClassVar[dict[str, Any]] = {
        "enable_block_reuse": True, "max_tokens": None, "max_attention_window": None,
        "sink_token_length": None, "free_gpu_memory_fraction": 0.9, "host_cache_size": None,
        "onboard_blocks": True, "cross_kv_cache_fraction": None,
        "secondary_offload_min_priority": None, "event_buffer_max_size": 0,
        "enable_partial_reuse": True, "copy_on_partial_reuse": True, "use_uvm": False,
        "max_gpu_total_bytes": 0, "dtype": "auto", "tokens_per_block": 32}

    def _check(self) -> None:
        if not 0 <= self.free_gpu_memory_fraction <= 1:  # type: ignore[attr-defined]
            raise ValueError("kv_cache_config.free_gpu_memory_fraction must be a float "
                             "between 0 and 1")


class SchedulerConfig(_Strict):
    FIELDS: ClassVar[dict[str, Any]] = {
        "capacity_scheduler_policy": CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
        "context_chunking_policy": None, "dynamic_batch_config": None}


_DECODING_BASE = {"max_draft_len": None, "max_total_draft_tokens": None,
                  "speculative_model_dir": None, "max_concurrency": None, "load_format": None,
                  "acceptance_window": None, "acceptance_length_threshold": None}


class DraftTargetDecodingConfig(_Strict):
    decoding_type: ClassVar[str] = "Draft_Target"
    FIELDS: ClassVar[dict[str, Any]] = dict(_DECODING_BASE)


class NGramDecodingConfig(_Strict):
    decoding_type: ClassVar[str] = "NGram"
    FIELDS: ClassVar[dict[str, Any]] = {**_DECODING_BASE, "max_matching_ngram_size": 0,
                                        "is_keep_all": True, "is_use_oldest": True,
                                        "is_public_pool": True}


class EagleDecodingConfig(_Strict):
    decoding_type: ClassVar[str] = "Eagle"
    FIELDS: ClassVar[dict[str, Any]] = {
        **_DECODING_BASE, "eagle_choices": None, "greedy_sampling": True,
        "posterior_threshold": None, "use_dynamic_tree": False, "dynamic_tree_max_topK": None,
        "num_eagle_layers": None, "max_non_leaves_per_layer": None, "eagle3_one_model": True,
        "eagle3_layers_to_capture": None}


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """tensorrt_llm/sampling_params.py: the fields this project touches, with their defaults."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    return_perf_metrics: bool = False
    exclude_input_from_output: bool = True
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")

    @property
    def _greedy_decoding(self) -> bool:
        """``params_imply_greedy_decoding``: all three unset, or top_k 1, top_p 0, temp 0."""
        return not self.use_beam_search and (
            (self.temperature is None and self.top_p is None and self.top_k is None)
            or self.top_k == 1 or self.top_p == 0.0 or self.temperature == 0)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # 'stop' | 'length' | 'timeout' | 'cancelled'
    stop_reason: int | str | None = None
    request_perf_metrics: Any = None
    _last_token_ids_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]


class AsyncOrSyncQueue:
    """``AsyncQueue``/``Queue`` of result.py: async reads only if a loop was running when the
    owner was made (``has_event_loop()`` at construction); the producer is another thread."""

    def __init__(self) -> None:
        self.async_ok = has_event_loop()
        self._q: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self._q.put(item)

    def get(self, timeout: float | None = None) -> Any:
        return self._q.get(timeout=timeout)

    async def aget(self, timeout: float | None = None) -> Any:
        assert self.async_ok, ("The asyncio event loop was not present during initialization, "
                               "so async operations are not available.")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._q.get_nowait()
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise asyncio.TimeoutError from None
                await asyncio.sleep(0.001)


class IterationResult:
    """result.py ``IterationResult``: stats as JSON strings; a read drains until ``timeout``
    passes with nothing new and then reports done until ``mark_undone`` (a new request)."""

    def __init__(self) -> None:
        self._done = False
        self._timeout = 2.0
        self.queue = AsyncOrSyncQueue()

    def set_timeout(self, timeout: float) -> None:
        self._timeout = timeout

    def mark_undone(self) -> None:
        self._done = False

    def get_results(self) -> list[dict[str, Any]]:
        results = []
        while not self._done:
            try:
                results.append(json.loads(self.queue.get(timeout=self._timeout)))
            except queue.Empty:
                self._done = True
        return results

    def __aiter__(self) -> IterationResult:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        try:
            return json.loads(await self.queue.aget(timeout=self._timeout))
        except asyncio.TimeoutError:
            self._done = True
            raise StopAsyncIteration from None


class _EmptyAsyncIterable:
    def __aiter__(self) -> _EmptyAsyncIterable:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration
