"""A scripted, deterministic, in-process fake of the ``Executor`` protocol for tests.

``ScriptedExecutor`` runs no model. Each ``poll`` runs at most one "step" (when there is work;
otherwise it waits up to ``timeout`` for an ``enqueue``), and in a step every running sequence
whose prefill is done emits exactly one token. What a sequence emits depends only on its
*original prompt* and the position in its output, never on the executor request id, so a
sequence preempted and resumed (new id, ``resume_token_ids`` = tokens so far) continues with the
same tokens it would have produced uninterrupted: ``expected_output`` says what that is, which is
what tests compare streams against.

Model of the engine (close enough to the real ones for scheduling tests):

- Slots: at most ``capacity.max_slots`` sequences run; the rest wait FIFO in the executor queue.
- Tokens per step: decodes cost 1 each, then new sequences prefill their uncached context in
  chunks out of what is left of ``capacity.max_tokens_per_step``; a sequence emits its first
  token in the step its prefill completes.
- KV blocks: a running sequence holds ``blocks_for(context + generated)`` blocks, where context is
  prompt + resume tokens. Admission from the queue needs ``blocks_for(context + 1)`` blocks (free
  plus evictable cached). A sequence that cannot grow by one block stalls for that step; if every
  running sequence stalls, the newest one ends with ERROR ("KV cache exhausted").
- Prefix cache (toy): when a sequence ends, each of its full blocks is kept as "cached", keyed by
  the whole token prefix up to the end of that block; a new sequence whose context starts with
  cached full blocks reuses them and reports them as ``cached_prompt_tokens``. Cached blocks are
  evicted least recently used when free blocks run out.
- Finishes: LENGTH at ``max_tokens`` (resume tokens count as generated) or when the sequence
  reaches ``max_seq_len``; STOP when the prompt's scripted output is exhausted (``script`` or
  ``stop_after``) or a token in ``sampling.stop_token_ids`` is emitted after ``min_tokens``;
  ERROR when ``error_fn`` says so; CANCELLED after ``cancel`` or ``shutdown``.

Steps are reported (``take_step_samples``) with the shape each step carried and, as its
duration, what ``step_cost`` predicts for it (a virtual clock: nothing sleeps). Plans: the base
class plans its own steps, like TensorRT-LLM; ``PlannedScriptedExecutor`` also follows the
scheduler's ``StepPlan`` (a cap per request; 0 pauses it, resident), like the CPU executor.

Text: each token's text is ``"<id>"`` (so a delta's text is its tokens, e.g. ``"<5><6>"``);
``cached_prompt_tokens`` is set on a run's first and last delta, as the protocol says.
Construct with ``ScriptedExecutor(capacity, token_fn=..., stop_after=..., error_fn=...,
reject_fn=..., step_hook=..., record=...)``; every hook is optional (``DEFAULT_CAPACITY``: 4
slots).

Everything is recorded for assertions: ``enqueued`` (every accepted ExecRequest), ``rejected``,
``cancels`` (every cancel call), ``step_log`` (per-step occupancy), ``outputs`` and ``finishes``
per executor request id. The fake is thread-safe (one lock) so a scheduler thread can drive it.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine_builder.step_cost import LinearStepCost, StepSample, StepShape
from server.executor.base import (
    Capacity,
    ExecRequest,
    ExecutorStats,
    FinishReason,
    SamplingParams,
    StepPlan,
    TokenDelta,
)

# (original prompt, output position) -> token id.
TokenFn = Callable[[tuple[int, ...], int], int]
# original prompt -> number of generated tokens after which it STOPs (None: never by itself).
StopFn = Callable[[tuple[int, ...]], int | None]
# (request, tokens generated so far including resumed ones) -> error message or None.
ErrorFn = Callable[[ExecRequest, int], str | None]
# request -> message of a ValueError to raise from enqueue, or None to accept it.
RejectFn = Callable[[ExecRequest], str | None]

DEFAULT_CAPACITY = Capacity(
    max_slots=4,
    num_kv_blocks=64,
    tokens_per_block=4,
    max_tokens_per_step=64,
    max_seq_len=128,
    vocab_size=1000,
)


def default_token(prompt: tuple[int, ...], position: int, vocab_size: int) -> int:
    """A stable token id from the prompt and the output position (no Python hash salting)."""
    return (_prompt_seed(prompt) * 31 + position * 7919 + 1) % vocab_size


@functools.lru_cache(maxsize=4096)
def _prompt_seed(prompt: tuple[int, ...]) -> int:
    # Cached: called once per generated token, and a benchmark's prompts repeat.
    seed = 0
    for t in prompt:
        seed = (seed * 1_000_003 + t + 1) % 2_147_483_647
    return seed


@dataclass(frozen=True, slots=True)
class StepRecord:
    """Occupancy of one executor step, recorded after the step ran."""

    step: int
    running: tuple[int, ...]  # executor request ids holding a slot during the step
    queued: tuple[int, ...]  # ids waiting in the executor queue after the step
    kv_blocks_used: int
    kv_blocks_cached: int
    tokens: int  # prefill + decode tokens computed in the step
    shape: StepShape  # what the step computed
    computed: tuple[int, ...]  # ids that computed anything in the step


@dataclass(slots=True)
class _Seq:
    request: ExecRequest
    context: tuple[int, ...]  # prompt + resume tokens
    generated: list[int] = field(default_factory=list)  # this run only
    blocks: int = 0
    prefill_left: int = 0
    cached_tokens: int = 0
    emitted_first: bool = False

    @property
    def num_done(self) -> int:
        """Generated tokens counted against max_tokens (resumed ones included)."""
        return len(self.request.resume_token_ids) + len(self.generated)

    @property
    def num_tokens(self) -> int:
        return len(self.context) + len(self.generated)


class ScriptedExecutor:
    """Deterministic fake executor; see the module docstring for its model of an engine."""

    def __init__(
        self,
        capacity: Capacity = DEFAULT_CAPACITY,
        *,
        token_fn: TokenFn | None = None,
        stop_after: StopFn | None = None,
        error_fn: ErrorFn | None = None,
        reject_fn: RejectFn | None = None,
        step_hook: Callable[[int], None] | None = None,
        step_cost: LinearStepCost | None = None,
        record: bool = True,
    ) -> None:
        self._capacity = capacity
        self._step_cost = step_cost  # the virtual duration of each step; 1 ms without one
        self._plan = StepPlan()
        self._samples: list[StepSample] = []
        # False: keep no records (a long benchmark would otherwise hold every request).
        self._record = record
        self._token_fn = token_fn
        self._stop_after = stop_after
        self._error_fn = error_fn
        self._reject_fn = reject_fn
        self._step_hook = step_hook  # called with the step number after each step
        self._scripts: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._cond = threading.Condition()
        self._queue: deque[_Seq] = deque()
        # Running sequences by executor request id, in admission order; queued ones by id too.
        self._running: dict[int, _Seq] = {}
        self._queued_ids: dict[int, _Seq] = {}
        self._used_blocks = 0  # sum of the running sequences' blocks, kept up to date
        self._pending: list[TokenDelta] = []
        self._cache: OrderedDict[tuple[int, ...], None] = OrderedDict()  # LRU block prefixes
        self._shut = False
        self._steps = 0
        self._last_step_tokens = 0
        self._prompt_tokens = 0
        self._cached_prompt_tokens = 0
        self._generated_tokens = 0
        # Records for assertions.
        self.enqueued: list[ExecRequest] = []
        self.rejected: list[tuple[ExecRequest, str]] = []
        self.cancels: list[int] = []
        self.step_log: list[StepRecord] = []
        self.outputs: dict[int, list[int]] = {}
        self.finishes: dict[int, FinishReason] = {}

    # ---- scripting -------------------------------------------------------------------------

    def script(self, prompt: Sequence[int], tokens: Sequence[int]) -> None:
        """Sequences with this prompt emit exactly ``tokens`` and then STOP (or hit LENGTH)."""
        self._scripts[tuple(prompt)] = tuple(tokens)

    def token_at(self, prompt: tuple[int, ...], position: int) -> int:
        script = self._scripts.get(prompt)
        if script is not None and position < len(script):
            return script[position]
        if self._token_fn is not None:
            return self._token_fn(prompt, position)
        return default_token(prompt, position, self._capacity.vocab_size)

    def stop_length(self, prompt: tuple[int, ...]) -> int | None:
        """Generated tokens after which this prompt STOPs on its own, if ever."""
        if prompt in self._scripts:
            return len(self._scripts[prompt])
        return self._stop_after(prompt) if self._stop_after is not None else None

    def expected_output(
        self, prompt: Sequence[int], sampling: SamplingParams
    ) -> tuple[tuple[int, ...], FinishReason]:
        """What an uninterrupted run of this prompt emits, and how it ends (errors aside)."""
        prompt = tuple(prompt)
        out: list[int] = []
        while True:
            last = out[-1] if out else None
            reason = self._finish_reason(prompt, sampling, len(prompt) + len(out), len(out), last)
            if reason is not None:
                return tuple(out), reason
            out.append(self.token_at(prompt, len(out)))

    # ---- the Executor protocol -------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return self._capacity

    def enqueue(self, request: ExecRequest) -> None:
        with self._cond:
            message = self._validate(request)
            if message is not None:
                self.rejected.append((request, message))
                raise ValueError(message)
            context = request.prompt_token_ids + request.resume_token_ids
            seq = _Seq(request=request, context=context)
            if self._record:
                self.enqueued.append(request)
                self.outputs[request.request_id] = []
            if seq.num_done >= request.sampling.max_tokens:
                # Resumed with its budget spent: it ends at once, with no token (as the CPU
                # engine ends it).
                self._finish_unstarted(seq, FinishReason.LENGTH)
            else:
                self._queue.append(seq)
                self._queued_ids[request.request_id] = seq
            self._cond.notify_all()

    def cancel(self, request_id: int) -> None:
        with self._cond:
            if self._record:
                self.cancels.append(request_id)
            seq = self._find(request_id)
            if seq is not None:
                self._finish(seq, FinishReason.CANCELLED, ())
                self._cond.notify_all()

    def poll(self, timeout: float) -> list[TokenDelta]:
        with self._cond:
            if not self._pending and not self._has_work() and timeout > 0 and not self._shut:
                self._cond.wait(timeout)
            stepped = self._has_work() and not self._shut
            if stepped:
                self._step()
            out, self._pending = self._pending, []
            step = self._steps
        if stepped and self._step_hook is not None:
            self._step_hook(step)
        return out

    def stats(self) -> ExecutorStats:
        with self._cond:
            used = self._used_blocks
            cached = len(self._cache)
            return ExecutorStats(
                active=len(self._running),
                queued=len(self._queue),
                kv_blocks_total=self._capacity.num_kv_blocks,
                kv_blocks_used=used,
                kv_blocks_free=self._capacity.num_kv_blocks - used - cached,
                kv_blocks_cached=cached,
                steps=self._steps,
                last_step_latency_s=0.0,
                last_step_tokens=self._last_step_tokens,
                prompt_tokens=self._prompt_tokens,
                cached_prompt_tokens=self._cached_prompt_tokens,
                generated_tokens=self._generated_tokens,
            )

    def take_step_samples(self) -> list[StepSample]:
        with self._cond:
            samples, self._samples = self._samples, []
            return samples

    def shutdown(self) -> None:
        with self._cond:
            for seq in [*self._running.values(), *self._queue]:
                self._finish(seq, FinishReason.CANCELLED, ())
            self._shut = True
            self._cond.notify_all()

    # ---- conveniences for tests ------------------------------------------------------------

    @property
    def live_ids(self) -> tuple[int, ...]:
        with self._cond:
            return (*self._running, *(s.request.request_id for s in self._queue))

    def is_idle(self) -> bool:
        """No sequence queued or running and no KV block referenced."""
        st = self.stats()
        return st.active == 0 and st.queued == 0 and st.kv_blocks_used == 0

    # ---- internals (called with the lock held) ---------------------------------------------

    def _validate(self, request: ExecRequest) -> str | None:
        cap = self._capacity
        context_len = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if self._shut:
            return "executor is shut down"
        if not request.prompt_token_ids:
            return "empty prompt"
        if self._find(request.request_id) is not None:
            return f"duplicate request id {request.request_id}"
        if context_len + 1 > cap.max_seq_len:
            return f"prompt of {context_len} tokens leaves no room in max_seq_len {cap.max_seq_len}"
        if cap.blocks_for(context_len + 1) > cap.num_kv_blocks:
            return f"prompt of {context_len} tokens needs more KV blocks than the pool holds"
        if any(not 0 <= t < cap.vocab_size for t in request.prompt_token_ids):
            return "token id out of vocabulary"
        if self._reject_fn is not None:
            return self._reject_fn(request)
        return None

    def _find(self, request_id: int) -> _Seq | None:
        return self._running.get(request_id) or self._queued_ids.get(request_id)

    def _has_work(self) -> bool:
        if self._queue:
            return True
        return any(self._plan.cap(rid) != 0 for rid in self._running)

    def _free_blocks(self) -> int:
        return self._capacity.num_kv_blocks - self._used_blocks - len(self._cache)

    def _take_blocks(self, n: int, pinned: int = 0) -> bool:
        """Makes n blocks free (evicting cached ones, LRU first); False if impossible.
        ``pinned`` blocks were just claimed from the cache and are not free either."""
        while self._free_blocks() - pinned < n and self._cache:
            self._cache.popitem(last=False)
        return self._free_blocks() - pinned >= n

    def _step(self) -> None:
        budget = self._capacity.max_tokens_per_step
        plan = self._plan
        decoders = [
            s for rid, s in self._running.items() if s.prefill_left == 0 and plan.cap(rid) != 0
        ]
        budget -= len(decoders)
        self._admit_from_queue()
        shape = StepShape()
        for seq in decoders:
            shape.add_decode(seq.num_tokens)
        emitters = list(decoders)
        computed = [s.request.request_id for s in decoders]
        for rid, seq in self._running.items():
            cap = plan.cap(rid)
            if seq.prefill_left > 0 and budget > 0 and cap != 0:
                chunk = min(seq.prefill_left, budget, seq.prefill_left if cap is None else cap)
                shape.add_prefill(len(seq.context) - seq.prefill_left, chunk,
                                  chunk == seq.prefill_left)
                seq.prefill_left -= chunk
                budget -= chunk
                computed.append(rid)
                if seq.prefill_left == 0:
                    emitters.append(seq)
        tokens = shape.tokens
        running_ids = tuple(self._running)
        seconds = self._step_cost.predict(shape) if self._step_cost is not None else 0.001
        self._samples.append(StepSample(shape, seconds))
        self._emit(emitters)
        self._steps += 1
        self._last_step_tokens = tokens
        if not self._record:
            return
        self.step_log.append(
            StepRecord(
                step=self._steps,
                running=running_ids,
                queued=tuple(s.request.request_id for s in self._queue),
                kv_blocks_used=self._used_blocks,
                kv_blocks_cached=len(self._cache),
                tokens=tokens,
                shape=shape,
                computed=tuple(computed),
            )
        )

    def _admit_from_queue(self) -> None:
        cap = self._capacity
        while self._queue and len(self._running) < cap.max_slots:
            seq = self._queue[0]
            # Claim the cached prefix first, so that making room below cannot evict it.
            hits = self._claim_prefix(seq.context)
            need = cap.blocks_for(len(seq.context) + 1) - len(hits)
            if not self._take_blocks(need, pinned=len(hits)):
                for key in hits:
                    self._cache[key] = None
                return
            self._queue.popleft()
            seq.cached_tokens = len(hits) * cap.tokens_per_block
            seq.prefill_left = len(seq.context) - seq.cached_tokens
            seq.blocks = cap.blocks_for(len(seq.context) + 1)  # room for the first token
            self._used_blocks += seq.blocks
            del self._queued_ids[seq.request.request_id]
            self._prompt_tokens += len(seq.context)
            self._cached_prompt_tokens += seq.cached_tokens
            self._running[seq.request.request_id] = seq

    def _claim_prefix(self, context: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Takes the leading full blocks of context out of the cache (at least one token is
        left to compute) and returns their keys."""
        tpb = self._capacity.tokens_per_block
        hits: list[tuple[int, ...]] = []
        while (len(hits) + 1) * tpb < len(context):
            key = context[: (len(hits) + 1) * tpb]
            if key not in self._cache:
                break
            del self._cache[key]
            hits.append(key)
        return hits

    def _emit(self, emitters: list[_Seq]) -> None:
        stalled = 0
        for seq in emitters:
            if not self._grow(seq):
                stalled += 1
                continue
            self._emit_one(seq)
        if emitters and stalled == len(emitters):
            self._finish(emitters[-1], FinishReason.ERROR, (), "KV cache exhausted")

    def _grow(self, seq: _Seq) -> bool:
        """Makes room for one more token's KV; False (stall) when no block can be had."""
        need = self._capacity.blocks_for(seq.num_tokens + 1) - seq.blocks
        if need > 0 and not self._take_blocks(need):
            return False
        if need > 0:
            seq.blocks += need
            self._used_blocks += need
        return True

    def _emit_one(self, seq: _Seq) -> None:
        req = seq.request
        if self._error_fn is not None:
            message = self._error_fn(req, seq.num_done)
            if message is not None:
                self._finish(seq, FinishReason.ERROR, (), message)
                return
        token = self.token_at(req.prompt_token_ids, seq.num_done)
        seq.generated.append(token)
        self._generated_tokens += 1
        if self._record:
            self.outputs[req.request_id].append(token)
        reason = self._finish_reason(
            req.prompt_token_ids, req.sampling, seq.num_tokens, seq.num_done, token
        )
        if reason is not None:
            self._finish(seq, reason, (token,))
            return
        self._pending.append(
            TokenDelta(
                request_id=req.request_id,
                token_ids=(token,),
                text=f"<{token}>",
                cached_prompt_tokens=None if seq.emitted_first else seq.cached_tokens,
            )
        )
        seq.emitted_first = True

    def _finish_reason(
        self,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        num_tokens: int,
        done: int,
        last: int | None,
    ) -> FinishReason | None:
        """How a sequence ends after ``done`` generated tokens (resumed ones included), the
        last of them ``last``; None while it goes on."""
        if done and last in sampling.stop_token_ids and done >= sampling.min_tokens:
            return FinishReason.STOP
        stop_len = self.stop_length(prompt)
        if stop_len is not None and done >= max(stop_len, sampling.min_tokens):
            return FinishReason.STOP
        if done >= sampling.max_tokens or num_tokens >= self._capacity.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _finish(
        self,
        seq: _Seq,
        reason: FinishReason,
        tokens: tuple[int, ...],
        error: str | None = None,
    ) -> None:
        rid = seq.request.request_id
        if self._running.pop(rid, None) is not None:
            self._release_blocks(seq)
        else:
            self._queue.remove(seq)
            del self._queued_ids[rid]
        if self._record:
            self.finishes[rid] = reason
        self._pending.append(
            TokenDelta(
                request_id=rid,
                token_ids=tokens,
                text="".join(f"<{t}>" for t in tokens),
                finish=reason,
                error=error,
                cached_prompt_tokens=seq.cached_tokens,
            )
        )

    def _finish_unstarted(self, seq: _Seq, reason: FinishReason) -> None:
        if self._record:
            self.finishes[seq.request.request_id] = reason
        self._pending.append(TokenDelta(seq.request.request_id, (), "", reason,
                                        cached_prompt_tokens=0))

    def _release_blocks(self, seq: _Seq) -> None:
        """Keeps the sequence's full blocks as cached prefixes; the partial tail is freed."""
        tpb = self._capacity.tokens_per_block
        tokens = seq.context + tuple(seq.generated)
        full = min(len(tokens) // tpb, seq.blocks)
        self._used_blocks -= seq.blocks
        seq.blocks = 0
        for i in range(1, full + 1):
            key = tokens[: i * tpb]
            self._cache[key] = None
            self._cache.move_to_end(key)
        while self._free_blocks() < 0:  # duplicate prefixes shrink the cache, never grow it
            self._cache.popitem(last=False)


class PlannedScriptedExecutor(ScriptedExecutor):
    """A ScriptedExecutor that follows step plans (server.executor.base.PlanFollower): their
    caps, not their draft lengths (it does not speculate); ``plans`` records every plan."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plans: list[StepPlan] = []

    def set_plan(self, plan: StepPlan) -> None:
        with self._cond:
            self._plan = plan
            self.plans.append(plan)
            self._cond.notify_all()
