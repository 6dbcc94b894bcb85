"""The ``trtllm-llmapi`` backend: the Executor protocol over ``tensorrt_llm.LLM`` (PyTorch
backend), serving a Hugging Face checkpoint with no engine build.

The LLM API is asyncio-first: ``generate_async(..., streaming=True)`` returns a result to
``async for`` over, and ``get_stats_async`` an async iterable of iteration stats. Both are tied
to the event loop that is running when they are created (the iteration-stats queue is created
once, at the LLM's first request, and async reads of it fail for good if that happened outside
a running loop), so every call into the LLM after its construction runs on this executor's one
event-loop thread. The scheduler's threads only post coroutines to it and read the outbox.

A cancel ends the sequence here at once and aborts it in the engine (``GenerationResult.abort``),
as on the ``trtllm`` backend. Request priority is not passed: the LLM API takes it only after
the 1.2 line, and the backfill scheduler keeps control by what it admits. Speculative decoding
(draft-target, n-gram, EAGLE-3) runs inside TensorRT-LLM: its draft counts come from the
iteration stats (``ExecutorStats``), not per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer
from server.executor.base import ExecRequest, FinishReason, TokenDelta
from server.executor.trtllm.base import GpuExecutorBase
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.llmapi_args import (
    llm_kwargs,
    load_llmapi,
    probe_params,
    sampling_params,
)
from server.executor.trtllm.request import remaining, reused_tokens, validate
from server.executor.trtllm.stats import IterationSample, from_json
from server.executor.trtllm.stream import SequenceStream

log = logging.getLogger(__name__)

# CompletionOutput.finish_reason (tensorrt_llm/executor/result.py) -> ours.
FINISHES = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
            "cancelled": FinishReason.CANCELLED}


@dataclass(eq=False, slots=True)
class _Run:
    """One sequence in the engine; identity, not request id, says a response is still wanted
    (an id is free for reuse the moment its sequence ends on our side)."""

    stream: SequenceStream
    result: Any = None  # the RequestOutput, once submitted


class LlmApiExecutor(GpuExecutorBase):
    """A ``tensorrt_llm.LLM`` behind the Executor protocol. Thread-safe."""

    def __init__(self, llm: Any, api: Any, tokenizer: EngineTokenizer, manifest: Manifest,
                 config: TrtllmConfig | None = None) -> None:
        super().__init__(manifest, tokenizer)
        cfg = config or TrtllmConfig()
        self._api = api
        self._llm: Any = llm
        self._runs: dict[int, _Run] = {}
        self._stats_wait_s = cfg.await_timeout_s
        self._kv_reported = threading.Event()
        self._submitted = asyncio.Event()  # stats exist only after the first request
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-llmapi",
                                        daemon=True)
        self._thread.start()
        self._submit(self._poll_stats())

    @classmethod
    def from_manifest(cls, engine_dir: str | Path, manifest: Manifest,
                      config: TrtllmConfig | None = None) -> LlmApiExecutor:
        """Starts the LLM on DIR's checkpoint and measures its KV pool before returning."""
        cfg = config or TrtllmConfig.from_env()
        path = Path(engine_dir)
        api = load_llmapi()
        tokenizer = EngineTokenizer.load(path, manifest)
        executor = cls(api.LLM(**llm_kwargs(api, path, manifest, cfg)), api, tokenizer,
                       manifest, cfg)
        try:
            executor.probe_kv_blocks()
        except BaseException:
            executor.shutdown()
            raise
        return executor

    def probe_kv_blocks(self, timeout_s: float = 60.0) -> None:
        """Runs one 1-token request and waits for the stats that report the KV pool (sized
        from free GPU memory at start, so the manifest only has an estimate)."""
        self._submit(self._probe()).result(timeout_s)
        if not self._kv_reported.wait(timeout_s):
            log.warning("no KV-cache stats from the LLM; using the manifest's estimate")

    # -- the protocol ---------------------------------------------------------------------

    def enqueue(self, request: ExecRequest) -> None:
        validate(request, self._policy)
        left = remaining(request)
        params = sampling_params(self._api, request, left, self._policy)
        with self._lock:
            self._check_new(request.request_id, self._runs)
            run = _Run(SequenceStream(request, IncrementalDetokenizer(self._tokenizer,
                                                                      left.context)))
            self._runs[request.request_id] = run
            self._submit(self._run(request.request_id, run, list(left.context), params))

    def cancel(self, request_id: int) -> None:
        """Ends the sequence now and aborts it in the engine."""
        with self._lock:
            run = self._runs.pop(request_id, None)
            if run is None:
                return
            self._outbox.put(run.stream.cancelled())
            if run.result is not None:
                self._loop.call_soon_threadsafe(run.result.abort)

    # -- GpuExecutorBase hooks ------------------------------------------------------------

    def _read_stats(self) -> list[IterationSample]:
        return []  # _poll_stats absorbs them as the LLM produces them

    def _end_all(self) -> list[TokenDelta]:
        finals = [run.stream.cancelled() for run in self._runs.values()]
        self._runs.clear()
        return finals

    def _release_engines(self) -> None:
        self._submit(_cancel_other_tasks()).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._llm.shutdown()  # the LLM's worker exits and gives its GPU memory back
        self._llm = None

    # -- the event-loop thread ------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, None]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _run(self, request_id: int, run: _Run, prompt: list[int], params: Any) -> None:
        try:
            result = self._llm.generate_async(prompt, sampling_params=params, streaming=True)
        except Exception as exc:  # shutting down, or a request the LLM refuses
            self._fail(request_id, run, f"TensorRT-LLM refused the request: {exc}")
            return
        self._submitted.set()
        with self._lock:
            if self._runs.get(request_id) is not run:  # cancelled before it was submitted
                result.abort()
                return
            run.result = result
        try:
            async for output in result:
                if not self._on_output(request_id, run, output):
                    break
        except Exception as exc:  # RequestError: the engine failed this request
            self._fail(request_id, run, str(exc))

    def _on_output(self, request_id: int, run: _Run, output: Any) -> bool:
        """One streamed response; False when no more are wanted."""
        with self._lock:
            if self._runs.get(request_id) is not run:
                return False
            completion = output.outputs[0]
            ids = list(completion.token_ids_diff)
            self._note_first(run.stream, completion)
            self._stats.count_generated(len(ids))
            if output.finished:
                del self._runs[request_id]
                self._outbox.put(self._final(run.stream, ids, completion.finish_reason))
                return False
            emitted = run.stream.on_tokens(ids)
            if emitted.stopped:  # a stop string: we are done; the engine stops next iteration
                del self._runs[request_id]
                output.abort()
            if emitted.delta is not None:
                self._outbox.put(emitted.delta)
            return not emitted.stopped

    @staticmethod
    def _final(stream: SequenceStream, ids: list[int], reason: str | None) -> TokenDelta:
        finish = FINISHES.get(reason or "")
        if finish is None:  # 'timeout', or none at all
            return stream.on_final(ids, FinishReason.ERROR, f"the engine ended the request: "
                                                            f"{reason}")
        return stream.on_final(ids, finish)

    def _note_first(self, stream: SequenceStream, completion: Any) -> None:
        if stream.prompt_counted:
            return
        tokens_per_block = self.capacity.tokens_per_block
        cached = reused_tokens(completion, tokens_per_block)
        stream.note_cached(cached)
        stream.prompt_counted = True
        context = len(stream.request.prompt_token_ids) + len(stream.request.resume_token_ids)
        self._stats.count_prompt(context, min(cached or 0, context))

    def _fail(self, request_id: int, run: _Run, message: str) -> None:
        with self._lock:
            if self._runs.get(request_id) is not run:
                return
            del self._runs[request_id]
            self._outbox.put(run.stream.failed(message))

    async def _probe(self) -> None:
        result = self._llm.generate_async([self._policy.end_id],
                                          sampling_params=probe_params(self._api, self._policy))
        self._submitted.set()
        await result

    async def _poll_stats(self) -> None:
        """Absorbs iteration stats as they come. The stats queue is drained per round; it
        reports nothing before the first request and, once a round ends, nothing until the
        next request is submitted (the LLM only then expects more)."""
        await self._submitted.wait()
        while True:
            try:
                async for item in self._llm.get_stats_async(timeout=self._stats_wait_s):
                    sample = from_json(json.loads(item) if isinstance(item, str) else item)
                    self._stats.absorb([sample])
                    if sample.kv is not None:
                        self._kv_reported.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading TensorRT-LLM iteration stats failed")
            await asyncio.sleep(self._stats_wait_s)


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
