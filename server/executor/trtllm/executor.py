"""The ``trtllm`` backend: the Executor protocol over ``tensorrt_llm.bindings.executor``.

TensorRT-LLM's executor already is an in-flight batching engine with a queue, paged KV cache
and KV block reuse (prefix caching), so this adapter is thin: it maps our requests onto its
``Request`` (streaming, input = prompt + resume tokens, max tokens = what is left, priority
passed through), turns its ``Response``s into ``TokenDelta``s on one response thread, and maps
``IterationStats`` onto ``ExecutorStats``.

A cancel ends the sequence here at once: the engine only terminates a request at the start of
an iteration in which it is active (``terminateCancelledRequests`` scans active requests), so a
request still in the engine's queue would otherwise hold its stream open until it is scheduled.
The engine's late responses for it are swallowed.
"""

from __future__ import annotations

from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer
from server.executor.base import ExecRequest, TokenDelta
from server.executor.trtllm.base import GpuExecutorBase
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.pump import ResponsePump
from server.executor.trtllm.request import (
    build_request,
    finish_reason,
    remaining,
    reused_tokens,
    validate,
)
from server.executor.trtllm.stats import IterationSample, from_bindings
from server.executor.trtllm.stream import SequenceStream


class TrtllmExecutor(GpuExecutorBase):
    """One TensorRT-LLM engine behind the Executor protocol. Thread-safe."""

    def __init__(self, engine: Any, bindings: Any, tokenizer: EngineTokenizer,
                 manifest: Manifest, config: TrtllmConfig | None = None, *,
                 kv_blocks: int | None = None) -> None:
        super().__init__(manifest, tokenizer, kv_blocks=kv_blocks)
        self._b = bindings
        self._engine: Any = engine
        self._streams: dict[int, SequenceStream] = {}  # our request id -> its stream
        self._engine_ids: dict[int, int] = {}  # our request id -> engine request id
        self._owners: dict[int, int | None] = {}  # engine id -> our id (None: already ended)
        cfg = config or TrtllmConfig()
        self._pump = ResponsePump(engine, self._on_responses, self._absorb_stats,
                                  timeout_s=cfg.await_timeout_s, name="trtllm-responses")

    # -- the protocol ---------------------------------------------------------------------

    def enqueue(self, request: ExecRequest) -> None:
        validate(request, self._policy)
        left = remaining(request)
        trt_request = build_request(self._b, request, left, self._policy, streaming=True)
        with self._lock:
            self._check_new(request.request_id, self._streams)
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
        """Ends the sequence now; the engine stops it when it next schedules it."""
        with self._lock:
            engine_id = self._engine_ids.get(request_id)
            if engine_id is None:
                return
            stream = self._streams[request_id]
            self._forget(request_id, engine_id, keep_owner=True)
            self._engine.cancel_request(engine_id)
            self._outbox.put(stream.cancelled())

    # -- GpuExecutorBase hooks ------------------------------------------------------------

    def _read_stats(self) -> list[IterationSample]:
        return [from_bindings(it) for it in self._engine.get_latest_iteration_stats()]

    def _end_all(self) -> list[TokenDelta]:
        finals = [s.cancelled() for s in self._streams.values()]
        self._streams.clear()
        self._engine_ids.clear()
        self._owners.clear()
        return finals

    def _release_engines(self) -> None:
        self._pump.stop()
        self._engine.shutdown()
        self._engine = None

    # -- the response thread --------------------------------------------------------------

    def _on_responses(self, responses: list[Any]) -> None:
        with self._lock:
            for response in responses:
                delta = self._on_response(response)
                if delta is not None:
                    self._outbox.put(delta)

    def _on_response(self, response: Any) -> TokenDelta | None:
        engine_id = response.request_id
        owner = self._owners.get(engine_id)
        if owner is None:  # ended on our side (cancel, stop string, shutdown) or unknown
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
            self._owners[engine_id] = None  # swallow the engine's late responses
        else:
            self._owners.pop(engine_id, None)
