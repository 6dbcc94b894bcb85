"""A fake of ``tensorrt_llm.llmapi`` (TensorRT-LLM 1.2.1, ``LLM`` on the PyTorch backend) for
tests without a GPU.

Names, arguments, defaults and semantics follow the 1.2-line sources:

- ``tensorrt_llm/llmapi/llm.py``: ``LLM(model, tokenizer=None, ..., **kwargs)``; a keyword that
  is not a ``TorchLlmArgs`` field raises ValueError ("LLM got invalid argument"), TensorRT-engine
  arguments such as ``quant_config`` raise ValueError (weight quantization comes from the
  checkpoint); ``generate_async(inputs, sampling_params=None, ..., streaming=False, ...)`` with
  token ids as ``inputs`` raises RuntimeError("LLM is shutting down") after ``shutdown()``;
  ``get_stats(timeout=2)`` / ``get_stats_async(timeout=2)``; ``shutdown()`` (idempotent, and it
  gives the GPU memory back: the LLM's worker exits).
- ``tensorrt_llm/llmapi/llm_args.py``: ``KvCacheConfig`` (``free_gpu_memory_fraction`` 0.9,
  ``enable_block_reuse`` True, ``dtype`` "auto", ``tokens_per_block`` 32), ``SchedulerConfig``,
  ``CapacitySchedulerPolicy``, ``ContextChunkingPolicy``, ``DraftTargetDecodingConfig`` /
  ``EagleDecodingConfig`` (``max_draft_len``, ``speculative_model_dir``), ``NGramDecodingConfig``
  (``max_draft_len``, ``max_matching_ngram_size``), all strict (unknown fields raise);
  ``enable_iter_perf_stats`` must be on for stats.
- ``tensorrt_llm/sampling_params.py``: ``max_tokens`` defaults to 32; unset ``end_id`` needs a
  tokenizer (this fake has none, as with ``skip_tokenizer_init``); all of temperature, top_k,
  top_p unset, top_k 1, top_p 0 or temperature 0 mean greedy; otherwise the sampler draws with
  unset top_k as "all" and unset top_p as 1.0; an unset seed is 0.
- ``tensorrt_llm/executor/result.py``: ``GenerationResult`` is async-iterable (each step one
  response: ``outputs[0].token_ids`` grows, ``token_ids_diff`` is the new part), ``finished``,
  ``abort()`` / ``aborted()``; ``finish_reason`` 'stop' (end id or a stop id; the stop id is cut
  from ``token_ids`` unless ``include_stop_str_in_output``), 'length', 'timeout', 'cancelled';
  an engine error raises ``RequestError`` from the iteration. Async reads need a running loop
  when the result was created, and so do stats: the stats queue is made once, at the first
  request, in whatever thread that ran; before it ``get_stats_async`` yields nothing; a read that
  times out reports done until the next request (``mark_undone``). Stats are the C++
  ``IterationStats`` as JSON (camelCase: ``iterLatencyMS``, ``kvCacheStats.maxNumBlocks``...).

The engine underneath is the fake bindings engine (``fake_engine``): in-flight batching, KV
block reuse, the fake device's memory, and for ``speculative_config`` an in-engine drafter
(draft-target: the draft checkpoint's model; n-gram and EAGLE-3: a perturbed copy of the model).
"""

from __future__ import annotations

import datetime
import json
import threading
import weakref
from pathlib import Path
from typing import Any

from tests.unit.trtllm import fake_types as bt
from tests.unit.trtllm.fake_engine import Drafter, EngineLimits, Executor
from tests.unit.trtllm.fake_llmapi_types import (
    AsyncOrSyncQueue,
    CapacitySchedulerPolicy,
    CompletionOutput,
    ContextChunkingPolicy,
    DraftTargetDecodingConfig,
    EagleDecodingConfig,
    IterationResult,
    KvCacheConfig,
    NGramDecodingConfig,
    RequestError,
    SamplingParams,
    SchedulerConfig,
    _EmptyAsyncIterable,
)
from tests.unit.trtllm.fake_model import FakeModel

__all__ = ["LLM", "CapacitySchedulerPolicy", "CompletionOutput", "ContextChunkingPolicy",
           "DraftTargetDecodingConfig", "EagleDecodingConfig", "KvCacheConfig",
           "NGramDecodingConfig", "RequestError", "RequestOutput", "SamplingParams",
           "SchedulerConfig"]

# TorchLlmArgs fields this fake accepts (a subset of the real ones; others raise as unknown).
TORCH_LLM_ARGS = {
    "max_batch_size": None, "max_num_tokens": 8192, "max_seq_len": None,
    "kv_cache_config": None, "enable_chunked_prefill": False, "scheduler_config": None,
    "speculative_config": None, "enable_iter_perf_stats": False,
    "iter_stats_max_iterations": None, "return_perf_metrics": False, "backend": None}
TRT_ONLY_ARGS = {"quant_config", "calib_config", "build_config", "workspace", "fast_build",
                 "enable_build_cache", "batching_type", "normalize_log_probs",
                 "extended_runtime_perf_knob_config", "embedding_parallel_mode"}
FINISH_REASONS = {bt.FinishReason.END_ID: "stop", bt.FinishReason.STOP_WORDS: "stop",
                  bt.FinishReason.LENGTH: "length", bt.FinishReason.TIMED_OUT: "timeout",
                  bt.FinishReason.CANCELLED: "cancelled"}


class RequestOutput:
    """``GenerationResult`` / ``RequestOutput`` of one request."""

    def __init__(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 llm: LLM, streaming: bool) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(0)]
        self.sampling_params = params
        self._streaming = streaming
        self._queue = AsyncOrSyncQueue()
        self._llm = weakref.ref(llm)
        self._done = False
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        llm = self._llm()
        assert llm is not None, "The executor is not set for this result."
        llm._abort_request(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def result(self, timeout: float | None = None) -> RequestOutput:
        while not self._done:
            self._handle(self._queue.get(timeout=timeout))
        return self

    async def aresult(self) -> RequestOutput:
        while not self._done:
            self._handle(await self._queue.aget())
        return self

    def __await__(self) -> Any:
        return self.aresult().__await__()

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        self._handle(await self._queue.aget())
        return self

    def _handle(self, response: bt.Response) -> None:
        if response.has_error():
            self._done = True
            raise RequestError(response.error_msg)
        result = response.result
        self._done = result.is_final
        out = self.outputs[0]
        out._last_token_ids_len = len(out.token_ids)
        out.token_ids.extend(result.output_token_ids[0])
        out.request_perf_metrics = result.request_perf_metrics
        reason = result.finish_reasons[0]
        if reason == bt.FinishReason.CANCELLED:
            out.finish_reason = "cancelled"
        if self._done:
            out.finish_reason = FINISH_REASONS[reason]
            if reason == bt.FinishReason.STOP_WORDS:
                out.stop_reason = out.token_ids[-1]
                if not self.sampling_params.include_stop_str_in_output:
                    out.token_ids = out.token_ids[:-1]


class LLM:
    """``tensorrt_llm.LLM`` over a fake checkpoint (``config.json`` with an optional ``fake``
    section: model knobs as in fake_bindings, ``num_blocks``, ``weight_blocks``)."""

    def __init__(self, model: str | Path, tokenizer: Any = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, dtype: str = "auto", revision: str | None = None,
                 tokenizer_revision: str | None = None, **kwargs: Any) -> None:
        trt_only = sorted(set(kwargs) & TRT_ONLY_ARGS)
        if trt_only:
            raise ValueError(f"The following arguments are specific to TensorRT backend and "
                             f"cannot be used with PyTorch backend: {trt_only}.")
        for key in kwargs:
            if key not in TORCH_LLM_ARGS:
                raise ValueError(f"LLM got invalid argument: {key}")
        self.args = {**TORCH_LLM_ARGS, **kwargs}
        raw = json.loads((Path(model) / "config.json").read_text())
        self.model_config = raw
        self._engine: Any = self._start_engine(raw, self.args)
        self._results: dict[int, RequestOutput] = {}
        self._lock = threading.Lock()
        self._iter_stats_result: IterationResult | None = None
        self._shutdown = False
        self._dispatcher = threading.Thread(target=self._dispatch, name="fake-llm", daemon=True)
        self._dispatcher.start()

    # -- API ------------------------------------------------------------------------------

    def generate_async(self, inputs: Any, sampling_params: SamplingParams | None = None,
                       lora_request: Any = None, prompt_adapter_request: Any = None,
                       streaming: bool = False, kv_cache_retention_config: Any = None,
                       disaggregated_params: Any = None, _postproc_params: Any = None,
                       scheduling_params: Any = None, cache_salt: str | None = None
                       ) -> RequestOutput:
        if self._shutdown:
            raise RuntimeError("LLM is shutting down")
        params = sampling_params or SamplingParams()
        if params.end_id is None:
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can "
                             "explicitly specify the end_id for sampling_params")
        if not isinstance(inputs, list) or not all(isinstance(t, int) for t in inputs):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        if not self.args["enable_chunked_prefill"] and len(inputs) > self.args["max_num_tokens"]:
            raise ValueError(f"The sum of prompt length ({len(inputs)}) ... should not exceed "
                             f"max_num_tokens ({self.args['max_num_tokens']})")
        with self._lock:
            self._maybe_initialize_iteration_results()
            engine_id = self._engine.enqueue_request(_engine_request(inputs, params, streaming))
            result = RequestOutput(engine_id, list(inputs), params, self, streaming)
            self._results[engine_id] = result
        return result

    def get_stats(self, timeout: float | None = 2) -> list[dict[str, Any]]:
        if self._iter_stats_result is None:
            return []
        self._iter_stats_result.set_timeout(timeout or 0.0)
        return self._iter_stats_result.get_results()

    def get_stats_async(self, timeout: float | None = 2) -> Any:
        if self._iter_stats_result is None:
            return _EmptyAsyncIterable()
        self._iter_stats_result.set_timeout(timeout or 0.0)
        return self._iter_stats_result

    def shutdown(self) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        self._dispatcher.join(timeout=5)
        self._engine.shutdown()
        self._engine = None  # the worker is gone: its memory goes back to the device

    # -- test introspection (not in the real API) ----------------------------------------

    @property
    def engine(self) -> Any:
        return self._engine

    # -- internals ------------------------------------------------------------------------

    def _abort_request(self, request_id: int) -> None:
        with self._lock:
            if not self._shutdown:
                self._engine.cancel_request(request_id)

    def _maybe_initialize_iteration_results(self) -> None:
        if self._iter_stats_result is None:
            self._iter_stats_result = IterationResult()
        else:
            self._iter_stats_result.mark_undone()

    def _dispatch(self) -> None:
        """The executor's response and stats threads: responses to their results, iteration
        stats (as JSON) to the stats queue."""
        wait = datetime.timedelta(milliseconds=5)
        while not self._shutdown:
            for response in self._engine.await_responses(wait):
                with self._lock:
                    result = self._results.get(response.request_id)
                    if response.has_error() or response.result.is_final:
                        self._results.pop(response.request_id, None)
                if result is not None:
                    result._queue.put(response)
            with self._lock:
                if self._shutdown:
                    return
                stats = self._engine.get_latest_iteration_stats()
                if self.args["enable_iter_perf_stats"] and self._iter_stats_result is not None:
                    for it in stats:
                        self._iter_stats_result.queue.put(_stats_json(it))

    @staticmethod
    def _start_engine(raw: dict[str, Any], args: dict[str, Any]) -> Executor:
        fake = raw.get("fake", {})
        kv = args["kv_cache_config"] or KvCacheConfig()
        sched = args["scheduler_config"] or SchedulerConfig()
        max_seq_len = args["max_seq_len"] or raw.get("max_position_embeddings", 2048)
        limits = EngineLimits(max_batch_size=args["max_batch_size"] or 2048,
                              max_num_tokens=args["max_num_tokens"], max_seq_len=max_seq_len,
                              max_input_len=max_seq_len - 1, max_draft_len=0,
                              tokens_per_block=kv.tokens_per_block,
                              num_blocks=fake.get("num_blocks", 64))
        config = bt.ExecutorConfig(
            kv_cache_config=bt.KvCacheConfig(enable_block_reuse=kv.enable_block_reuse,
                                             max_tokens=kv.max_tokens,
                                             free_gpu_memory_fraction=kv.free_gpu_memory_fraction),
            scheduler_config=bt.SchedulerConfig(getattr(
                bt.CapacitySchedulerPolicy, sched.capacity_scheduler_policy.value)),
            enable_chunked_context=args["enable_chunked_prefill"],
            iter_stats_max_iterations=args["iter_stats_max_iterations"] or 1000)
        model = _model(raw)
        return Executor.for_model(model, limits, config,
                                  weight_blocks=fake.get("weight_blocks", 0),
                                  fail_at_context_len=fake.get("fail_at_context_len"),
                                  drafter=_drafter(model, args["speculative_config"]))


def _model(raw: dict[str, Any]) -> FakeModel:
    keys = {"low", "high", "salt", "eos_every", "perturb_every"}
    return FakeModel(vocab_size=raw["vocab_size"],
                     **{k: v for k, v in raw.get("fake", {}).items() if k in keys})


def _drafter(model: FakeModel, spec: Any) -> Drafter | None:
    if spec is None:
        return None
    if isinstance(spec, NGramDecodingConfig):
        if not (spec.max_draft_len or 0) > 0 or not spec.max_matching_ngram_size > 0:
            raise AssertionError("NGram needs max_draft_len > 0 and max_matching_ngram_size > 0")
        return Drafter(FakeModel(model.vocab_size, perturb_every=3), spec.max_draft_len)
    if spec.speculative_model_dir is None:
        raise AssertionError(f"Path to {spec.decoding_type} draft model must be specified.")
    draft_raw = json.loads((Path(spec.speculative_model_dir) / "config.json").read_text())
    draft = _model(draft_raw) if isinstance(spec, DraftTargetDecodingConfig) else \
        FakeModel(model.vocab_size, perturb_every=4)
    return Drafter(draft, spec.max_draft_len)


def _engine_request(inputs: list[int], p: SamplingParams, streaming: bool) -> bt.Request:
    """What the LLM API's worker sends its executor (end_id -1 for ignore_eos; the PyTorch
    sampler's reading of unset top_k / top_p when not greedy)."""
    greedy = p._greedy_decoding
    sampling = bt.SamplingConfig(
        1, top_k=1 if greedy else (p.top_k or 0),
        top_p=None if greedy else (1.0 if p.top_p is None else p.top_p),
        temperature=None if greedy else (p.temperature or 1.0), seed=p.seed,
        min_tokens=p.min_tokens)
    return bt.Request(
        list(inputs), p.max_tokens, streaming=streaming, sampling_config=sampling,
        output_config=bt.OutputConfig(exclude_input_from_output=True,
                                      return_perf_metrics=p.return_perf_metrics),
        end_id=-1 if p.ignore_eos else p.end_id, pad_id=p.pad_id,
        stop_words=[[t] for t in p.stop_token_ids] if p.stop_token_ids else None)


def _stats_json(it: bt.IterationStats) -> str:
    """``IterationStats`` as ``JsonSerialization::toJsonStr`` writes it."""
    kv, ifb, spec = it.kv_cache_stats, it.inflight_batching_stats, it.specdec_stats
    return json.dumps({
        "iter": it.iter, "iterLatencyMS": it.iter_latency_ms,
        "numActiveRequests": it.num_active_requests, "numQueuedRequests": it.num_queued_requests,
        "numCompletedRequests": it.num_completed_requests,
        "maxNumActiveRequests": it.max_num_active_requests,
        "kvCacheStats": None if kv is None else {
            "maxNumBlocks": kv.max_num_blocks, "freeNumBlocks": kv.free_num_blocks,
            "usedNumBlocks": kv.used_num_blocks, "tokensPerBlock": kv.tokens_per_block,
            "reusedBlocks": kv.reused_blocks, "missedBlocks": kv.missed_blocks},
        "inflightBatchingStats": None if ifb is None else {
            "numScheduledRequests": ifb.num_scheduled_requests,
            "numContextRequests": ifb.num_context_requests,
            "numGenRequests": ifb.num_gen_requests, "numCtxTokens": ifb.num_ctx_tokens},
        "specDecodingStats": None if spec is None else {
            "numDraftTokens": spec.num_draft_tokens,
            "numAcceptedTokens": spec.num_accepted_tokens},
    })
