"""Draft-target speculative decoding over two TensorRT-LLM executors.

Per step of one sequence: the draft engine proposes up to K tokens (one non-streaming request,
greedy), then the target engine runs ``Request(context, max_tokens=len(draft) + 1,
external_draft_tokens_config=ExternalDraftTokensConfig(draft))`` and returns the accepted
prefix of the draft plus one token of its own (the correction, or a bonus when all were
accepted); those tokens become one ``TokenDelta`` and the next step's context. The target
engine must be built with ``--speculative_decoding_mode draft_tokens_external --max_draft_len K``
and runs with KV block reuse, so each step re-reads the cached prefix instead of recomputing it.

Two facts of the engines shape the bookkeeping:

- Every executor numbers its requests from 1, so the draft's and the target's ids collide:
  a sequence's request in flight is keyed by (phase, engine id), never by id alone.
- ``LlmRequest::validate`` keeps ``prompt + max_new_tokens + draft length`` within the engine's
  max_seq_len, counting the engine's built max_draft_len for a request sent without draft tokens.
  ``_plan`` sizes each step so that no request is clamped to nothing: near the end of the
  sequence it sends one draft token (or stops with LENGTH at one token of room) rather than
  a request the engine would end at once, which would resubmit forever.

All sequences advance concurrently: each engine batches whatever steps are in flight, and the
two response threads move a sequence from one phase to the next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer
from server.executor.base import ExecRequest, FinishReason, TokenDelta
from server.executor.trtllm.base import GpuExecutorBase
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.pump import ResponsePump
from server.executor.trtllm.request import (
    Remaining,
    build_request,
    finish_reason,
    remaining,
    reused_tokens,
    sampling_config,
    validate,
)
from server.executor.trtllm.stats import IterationSample, from_bindings
from server.executor.trtllm.stream import SequenceStream

TARGET = "target"
DRAFT = "draft"


@dataclass(eq=False, slots=True)
class _Spec:
    """One sequence's draft-target progress (mutable, guarded by the executor lock)."""

    request: ExecRequest
    stream: SequenceStream
    seed: int  # one seed for all target steps, so a seeded request is reproducible
    generated: list[int] = field(default_factory=list)
    draft: tuple[int, ...] = ()  # the proposal the target is verifying now
    in_flight: tuple[str, int] | None = None  # (phase, engine request id)

    def left(self) -> Remaining:
        return remaining(self.request, tuple(self.generated))


class SpeculativeExecutor(GpuExecutorBase):
    """The Executor protocol over a target and a draft engine. Thread-safe."""

    def __init__(self, target: Any, draft: Any, bindings: Any, tokenizer: EngineTokenizer,
                 manifest: Manifest, config: TrtllmConfig | None = None, *,
                 kv_blocks: int | None = None, target_max_draft_len: int | None = None) -> None:
        if manifest.draft is None:
            raise ValueError("a speculative executor needs manifest.draft")
        super().__init__(manifest, tokenizer, kv_blocks=kv_blocks)
        cfg = config or TrtllmConfig()
        self._b = bindings
        self._engines: dict[str, Any] = {TARGET: target, DRAFT: draft}
        self._max_draft_len = manifest.draft.max_draft_len
        # What validate() reserves on the target for a request without draft tokens.
        self._reserved = target_max_draft_len or self._max_draft_len
        self._live: dict[int, _Spec] = {}
        self._in_flight: dict[tuple[str, int], _Spec] = {}
        self._pumps = [
            ResponsePump(target, self._target_responses, self._absorb_stats,
                         timeout_s=cfg.await_timeout_s, name="trtllm-target"),
            ResponsePump(draft, self._draft_responses, lambda: None,
                         timeout_s=cfg.await_timeout_s, name="trtllm-draft"),
        ]

    # -- the protocol ---------------------------------------------------------------------

    def enqueue(self, request: ExecRequest) -> None:
        validate(request, self._policy)
        with self._lock:
            self._check_new(request.request_id, self._live)
            context = request.prompt_token_ids + request.resume_token_ids
            stream = SequenceStream(request, IncrementalDetokenizer(self._tokenizer, context))
            seed = request.sampling.seed
            spec = _Spec(request, stream, random.getrandbits(63) if seed is None else seed)
            self._live[request.request_id] = spec
            self._next_step(spec)

    def cancel(self, request_id: int) -> None:
        """Ends the sequence now; the engine holding its current step stops that step."""
        with self._lock:
            spec = self._live.get(request_id)
            if spec is None:
                return
            if spec.in_flight is not None:
                phase, engine_id = spec.in_flight
                self._engines[phase].cancel_request(engine_id)
            self._end(spec, spec.stream.cancelled())

    # -- GpuExecutorBase hooks ------------------------------------------------------------

    def _read_stats(self) -> list[IterationSample]:
        # The target's iterations are the serving figures; the draft engine is overhead.
        return [from_bindings(it) for it in self._engines[TARGET].get_latest_iteration_stats()]

    def _end_all(self) -> list[TokenDelta]:
        finals = [s.stream.cancelled() for s in self._live.values()]
        self._live.clear()
        self._in_flight.clear()
        return finals

    def _release_engines(self) -> None:
        for pump in self._pumps:
            pump.stop()
        for engine in self._engines.values():
            engine.shutdown()
        self._engines.clear()

    # -- phases (called with the lock held) -----------------------------------------------

    def _plan(self, left: Remaining) -> int | None:
        """Draft tokens to ask for next (0: the target alone), None when no request can
        produce a token (one token of room: the engine's draft reservation leaves none)."""
        room = self._room(left)
        k = min(self._max_draft_len, left.max_tokens - 1, (room - 1) // 2)
        if k > 0:
            return k
        if room > self._reserved:
            return 0
        return 1 if room >= 2 else None

    def _next_step(self, spec: _Spec) -> None:
        left = spec.left()
        k = self._plan(left)
        if k is None:
            self._end(spec, spec.stream.on_final((), FinishReason.LENGTH))
        elif k == 0:
            self._start_target(spec, ())
        else:
            self._start_draft(spec, left, k)

    def _start_draft(self, spec: _Spec, left: Remaining, k: int) -> None:
        # Greedy drafts: the target's most likely tokens are the ones it accepts most often.
        sampling = self._b.SamplingConfig(1, top_k=1, seed=spec.seed)
        request = build_request(self._b, spec.request, left, self._policy, streaming=False,
                                max_tokens=k, sampling=sampling)
        self._submit(spec, DRAFT, request)

    def _start_target(self, spec: _Spec, draft: tuple[int, ...]) -> None:
        left = spec.left()
        room = self._room(left)
        draft = draft[:max(0, min(left.max_tokens, room) - 1)]
        max_tokens = min(len(draft) + 1, left.max_tokens, room - len(draft)) if draft else 1
        spec.draft = draft
        sampling = sampling_config(self._b, spec.request.sampling, left.min_tokens,
                                   seed=spec.seed)
        request = build_request(self._b, spec.request, left, self._policy, streaming=False,
                                max_tokens=max_tokens, draft_tokens=draft, sampling=sampling)
        self._submit(spec, TARGET, request)

    def _submit(self, spec: _Spec, phase: str, request: Any) -> None:
        try:
            engine_id = self._engines[phase].enqueue_request(request)
        except Exception as exc:  # queue full, engine shut down: the sequence ends here
            self._end(spec, spec.stream.failed(f"TensorRT-LLM refused the request: {exc}"))
            return
        spec.in_flight = (phase, engine_id)
        self._in_flight[spec.in_flight] = spec

    def _room(self, left: Remaining) -> int:
        return self._policy.max_seq_len - len(left.context)

    def _end(self, spec: _Spec, delta: TokenDelta) -> None:
        self._live.pop(spec.request.request_id, None)
        if spec.in_flight is not None:
            self._in_flight.pop(spec.in_flight, None)
            spec.in_flight = None
        self._outbox.put(delta)

    # -- the response threads -------------------------------------------------------------

    def _draft_responses(self, responses: list[Any]) -> None:
        with self._lock:
            for response in responses:
                spec = self._step_done(DRAFT, response)
                if spec is None:
                    continue
                self._propose(spec, response.result)

    def _target_responses(self, responses: list[Any]) -> None:
        with self._lock:
            for response in responses:
                spec = self._step_done(TARGET, response)
                if spec is not None:
                    self._verified(spec, response.result)

    def _step_done(self, phase: str, response: Any) -> _Spec | None:
        """The sequence whose step this final response ends, or None (cancelled, failed)."""
        spec = self._in_flight.pop((phase, response.request_id), None)
        if spec is None:
            return None
        spec.in_flight = None
        if response.has_error():
            self._end(spec, spec.stream.failed(response.error_msg))
            return None
        return spec

    def _propose(self, spec: _Spec, result: Any) -> None:
        """Sends the draft's tokens to the target. A draft that ended at once with EOS
        proposed nothing; where the target alone cannot produce a token (see ``_plan``), its
        EOS itself is the one-token proposal."""
        tokens = tuple(result.output_token_ids[0]) if result.output_token_ids else ()
        if tokens or self._room(spec.left()) > self._reserved:
            self._start_target(spec, tokens)
            return
        reason, _ = finish_reason(self._b, result.finish_reasons[0])
        if reason is FinishReason.STOP and not spec.request.sampling.ignore_eos:
            self._start_target(spec, (self._policy.end_id,))
        else:
            self._end(spec, spec.stream.on_final((), FinishReason.LENGTH))

    def _verified(self, spec: _Spec, result: Any) -> None:
        tokens = list(result.output_token_ids[0]) if result.output_token_ids else []
        accepted = _common_prefix(tokens, spec.draft)
        proposed = len(spec.draft)
        self._count(spec, result, len(tokens), proposed, accepted)
        spec.generated.extend(tokens)
        finish, error = finish_reason(self._b, result.finish_reasons[0])
        # LENGTH only means this step's max_tokens; the sequence goes on while it may.
        if finish is FinishReason.LENGTH and spec.left().max_tokens > 0:
            emitted = spec.stream.on_tokens(tokens, proposed=proposed, accepted=accepted)
            if emitted.stopped:
                assert emitted.delta is not None
                self._end(spec, emitted.delta)
                return
            if emitted.delta is not None:
                self._outbox.put(emitted.delta)
            self._next_step(spec)
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
