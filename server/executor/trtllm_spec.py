"""Draft-target speculative decoding over two TensorRT-LLM executors.

Per step of one sequence: the draft engine proposes up to K tokens (one non-streaming request,
greedy), then the target engine runs ``Request(context, max_tokens=len(draft) + 1,
external_draft_tokens_config=ExternalDraftTokensConfig(draft))`` and returns the accepted
prefix of the draft plus one token of its own (the correction, or a bonus when all were
accepted); those tokens become one ``TokenDelta`` and the next step's context. The target
engine must be built with ``--speculative_decoding_mode draft_tokens_external --max_draft_len K``
and runs with KV block reuse, so each step re-reads the cached prefix instead of recomputing it.

All sequences advance concurrently: each engine batches whatever steps are in flight, and the
two response threads move a sequence from one phase to the next.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer
from server.executor.base import Capacity, ExecRequest, ExecutorStats, FinishReason, TokenDelta
from server.executor.trtllm import (
    TrtllmConfig,
    engine_capacity,
    open_engine,
    probe_kv_blocks,
    token_policy,
)
from server.executor.trtllm_pump import Outbox, ResponsePump
from server.executor.trtllm_request import (
    Remaining,
    build_request,
    finish_reason,
    remaining,
    reused_tokens,
    sampling_config,
    validate,
)
from server.executor.trtllm_stats import StatsAccumulator
from server.executor.trtllm_stream import SequenceStream


@dataclass(eq=False, slots=True)
class _Spec:
    """One sequence's draft-target progress (mutable, guarded by the executor lock)."""

    request: ExecRequest
    stream: SequenceStream
    seed: int  # one seed for all target steps, so a seeded request is reproducible
    generated: list[int] = field(default_factory=list)
    draft: tuple[int, ...] = ()  # the proposal the target is verifying now
    engine_id: int | None = None  # the request in flight, on whichever engine
    cancel_requested: bool = False

    def left(self) -> Remaining:
        return remaining(self.request, tuple(self.generated))


class SpeculativeExecutor:
    """The Executor protocol over a target and a draft engine. Thread-safe."""

    def __init__(self, target: Any, draft: Any, bindings: Any, tokenizer: EngineTokenizer,
                 manifest: Manifest, config: TrtllmConfig | None = None, *,
                 kv_blocks: int | None = None) -> None:
        if manifest.draft is None:
            raise ValueError("a speculative executor needs manifest.draft")
        cfg = config or TrtllmConfig()
        self._b = bindings
        self._target = target
        self._draft = draft
        self._tokenizer = tokenizer
        self._manifest = manifest
        self._max_draft_len = manifest.draft.max_draft_len
        self._policy = token_policy(manifest)
        self._stats = StatsAccumulator(kv_blocks or manifest.limits.num_kv_blocks)
        self._lock = threading.Lock()
        self._live: dict[int, _Spec] = {}
        self._on_target: dict[int, _Spec] = {}  # engine request id -> sequence
        self._on_draft: dict[int, _Spec] = {}
        self._outbox = Outbox()
        self._closed = False
        self._pumps = [
            ResponsePump(target, self._target_responses, self._absorb_stats,
                         timeout_s=cfg.await_timeout_s, name="trtllm-target"),
            ResponsePump(draft, self._draft_responses, lambda: None,
                         timeout_s=cfg.await_timeout_s, name="trtllm-draft"),
        ]

    @classmethod
    def open(cls, b: Any, engine_dir: Path, manifest: Manifest, tokenizer: EngineTokenizer,
             config: TrtllmConfig) -> SpeculativeExecutor:
        assert manifest.draft is not None
        draft_dir = engine_dir / manifest.draft.path
        draft_manifest = Manifest.load(draft_dir)
        target = open_engine(b, engine_dir, manifest, config)
        draft = open_engine(b, draft_dir, draft_manifest, config)
        kv_blocks = probe_kv_blocks(b, target, manifest.tokenizer.eos_token_ids[0])
        return cls(target, draft, b, tokenizer, manifest, config, kv_blocks=kv_blocks)

    # -- the protocol ---------------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return engine_capacity(self._manifest, self._stats.kv_blocks_total)

    def enqueue(self, request: ExecRequest) -> None:
        validate(request, self._policy)
        with self._lock:
            if self._closed:
                raise ValueError("the executor is shut down")
            if request.request_id in self._live:
                raise ValueError(f"duplicate request id {request.request_id}")
            context = request.prompt_token_ids + request.resume_token_ids
            stream = SequenceStream(request, IncrementalDetokenizer(self._tokenizer, context))
            seed = request.sampling.seed
            spec = _Spec(request, stream, random.getrandbits(63) if seed is None else seed)
            self._live[request.request_id] = spec
            self._start_draft(spec)

    def cancel(self, request_id: int) -> None:
        with self._lock:
            spec = self._live.get(request_id)
            if spec is None or spec.engine_id is None:
                return
            spec.cancel_requested = True
            engine = self._target if spec.engine_id in self._on_target else self._draft
            engine.cancel_request(spec.engine_id)

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
            finals = [s.stream.on_final((), FinishReason.CANCELLED) for s in self._live.values()]
            self._live.clear()
            self._on_target.clear()
            self._on_draft.clear()
        self._outbox.put(*finals)
        for pump in self._pumps:
            pump.stop()
        self._target.shutdown()
        self._draft.shutdown()

    # -- phases (called with the lock held) -----------------------------------------------

    def _start_draft(self, spec: _Spec) -> None:
        left = spec.left()
        k = min(self._max_draft_len, left.max_tokens - 1, self._room(left) - 1)
        if k <= 0:  # only one token may still come: the target alone decides it
            self._start_target(spec, ())
            return
        # Greedy drafts: the target's most likely tokens are the ones it accepts most often.
        sampling = self._b.SamplingConfig(1, top_k=1, seed=spec.seed)
        request = build_request(self._b, spec.request, left, self._policy, streaming=False,
                                max_tokens=k, sampling=sampling)
        self._submit(spec, self._draft, self._on_draft, request)

    def _start_target(self, spec: _Spec, draft: tuple[int, ...]) -> None:
        left = spec.left()
        draft = draft[:max(0, min(left.max_tokens, self._room(left)) - 1)]
        spec.draft = draft
        params = spec.request.sampling
        sampling = sampling_config(self._b, params, left.min_tokens)
        sampling.seed = spec.seed
        request = build_request(self._b, spec.request, left, self._policy, streaming=False,
                                max_tokens=len(draft) + 1, draft_tokens=draft,
                                sampling=sampling)
        self._submit(spec, self._target, self._on_target, request)

    def _submit(self, spec: _Spec, engine: Any, owners: dict[int, _Spec], request: Any) -> None:
        try:
            spec.engine_id = engine.enqueue_request(request)
        except Exception as exc:  # queue full, engine shut down: the sequence ends here
            self._end(spec, spec.stream.failed(f"TensorRT-LLM refused the request: {exc}"))
            return
        owners[spec.engine_id] = spec

    def _room(self, left: Remaining) -> int:
        return self._policy.max_seq_len - len(left.context)

    def _end(self, spec: _Spec, delta: TokenDelta) -> None:
        self._live.pop(spec.request.request_id, None)
        spec.engine_id = None
        self._outbox.put(delta)

    # -- the response threads -------------------------------------------------------------

    def _absorb_stats(self) -> None:
        # The target's iterations are the serving figures; the draft engine is overhead.
        self._stats.absorb(self._target.get_latest_iteration_stats())

    def _draft_responses(self, responses: list[Any]) -> None:
        with self._lock:
            for response in responses:
                spec = self._on_draft.pop(response.request_id, None)
                if spec is None or not self._final_ok(spec, response):
                    continue
                tokens = tuple(response.result.output_token_ids[0])
                self._start_target(spec, tokens)

    def _target_responses(self, responses: list[Any]) -> None:
        with self._lock:
            for response in responses:
                spec = self._on_target.pop(response.request_id, None)
                if spec is None or not self._final_ok(spec, response):
                    continue
                self._verified(spec, response.result)

    def _final_ok(self, spec: _Spec, response: Any) -> bool:
        """Ends the sequence on an error or a cancel; True when the step may go on."""
        if spec.request.request_id not in self._live:
            return False
        if response.has_error():
            self._end(spec, spec.stream.failed(response.error_msg))
            return False
        if spec.cancel_requested:
            self._end(spec, spec.stream.on_final((), FinishReason.CANCELLED))
            return False
        return True

    def _verified(self, spec: _Spec, result: Any) -> None:
        tokens = list(result.output_token_ids[0]) if result.output_token_ids else []
        accepted = _common_prefix(tokens, spec.draft)
        proposed = len(spec.draft)
        self._count(spec, result, len(tokens), proposed, accepted)
        spec.generated.extend(tokens)
        finish, error = finish_reason(self._b, result.finish_reasons[0])
        left = spec.left()
        # LENGTH only means this step's max_tokens; the sequence goes on while room is left.
        if finish is FinishReason.LENGTH and left.max_tokens > 0 and self._room(left) > 0:
            emitted = spec.stream.on_tokens(tokens, proposed=proposed, accepted=accepted)
            if emitted.stopped:
                assert emitted.delta is not None
                self._end(spec, emitted.delta)
                return
            if emitted.delta is not None:
                self._outbox.put(emitted.delta)
            self._start_draft(spec)
            return
        self._end(spec, spec.stream.on_final(tokens, finish, error, proposed=proposed,
                                             accepted=accepted))

    def _count(self, spec: _Spec, result: Any, num_tokens: int, proposed: int,
               accepted: int) -> None:
        if not spec.stream.prompt_counted:
            cached = reused_tokens(result, self._manifest.limits.tokens_per_block)
            spec.stream.note_cached(cached)
            spec.stream.prompt_counted = True
            context = len(spec.request.prompt_token_ids) + len(spec.request.resume_token_ids)
            self._stats.count_prompt(context, min(cached or 0, context))
        self._stats.count_generated(num_tokens)
        self._stats.count_drafts(proposed, accepted)


def _common_prefix(tokens: list[int], draft: tuple[int, ...]) -> int:
    n = 0
    for got, proposed in zip(tokens, draft, strict=False):
        if got != proposed:
            break
        n += 1
    return n
