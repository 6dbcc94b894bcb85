"""SimulatedExecutor: the executor protocol on a virtual clock, for the capacity planner.

It runs no model. It does what an in-flight batching engine does with its slots, its token
budget and its KV blocks, and takes as long as a step-cost model says each step takes:

- Requests wait in priority order (higher first, FIFO within a priority: TensorRT-LLM's queue
  semantics) and are admitted into free slots while the KV pool holds their context, reusing
  cached leading blocks (``kv.SimKvPool``).
- Each step carries every decode, then prefill chunks by priority within the engine's token
  budget (and the scheduler's ``StepPlan`` in ``PlanFollowingSimulatedExecutor``); a decode
  that needs a KV block when none is left preempts the newest sequence of the lowest priority,
  which later resumes from the prefix cache.
- A step lasts ``model.predict(shape)`` virtual seconds (times optional log-normal jitter); its
  output is ready when it ends, and the next step starts at once with what was enqueued before
  then, as an executor running on its own thread does (work enqueued in answer to a step's
  output joins the step after the next one).
- ``batching="static"`` is the baseline without in-flight batching: a batch is admitted only
  when the previous one has wholly finished; prompts are padded to the batch's longest and
  finished sequences keep their rows (padding) until the batch ends.

Output: an emitted token is a stable function of the original prompt and its position in the
output, so a preempted and resumed request continues the same stream; text is empty (there is
no tokenizer). Requests end at ``max_tokens`` (resumed tokens count), at the engine's
``max_seq_len``, or at a ``stop_token_ids`` token after ``min_tokens``; there is no
end-of-sequence token and stop strings never match, since a replayed trace says how long each
output is.

Time: the clock is shared (``SimClock``). A simulation loop that owns it moves it to
``step_end`` and calls ``finish_step``; an executor built without a clock owns a private one
and ``poll(timeout)`` advances it, running steps, up to ``timeout`` virtual seconds.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine_builder.step_cost import StepCostModel, StepSample, StepShape
from server.executor.base import (
    Capacity,
    ExecRequest,
    ExecutorStats,
    FinishReason,
    StepPlan,
    TokenDelta,
)
from server.planner.kv import SimKvPool

BATCHING = ("inflight", "static")
SAMPLES_KEPT = 4096  # step samples nobody took are dropped oldest first beyond this


class SimClock:
    """Virtual seconds; callable like ``time.monotonic`` so the scheduler can read it."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(slots=True, eq=False)
class _Seq:
    request: ExecRequest
    rid: int  # the request id
    tokens: list[int]  # prompt + resumed + generated in this run
    key: int  # names the output stream (the original prompt)
    num_done: int  # generated tokens counted against max_tokens, resumed ones included
    num_computed: int = 0  # tokens whose K/V exists
    blocks: int = 0
    cached_tokens: int | None = None  # set at first admission
    report_cached: bool = False
    fresh: bool = True  # no token emitted in this run yet
    finish: FinishReason | None = None
    error: str | None = None
    out: list[int] = field(default_factory=list)  # tokens since the last delta

    def take_delta(self) -> TokenDelta:
        """The output since the last delta; ``cached_prompt_tokens`` on a run's first delta
        and on the final one."""
        cached = (self.cached_tokens or 0) if self.report_cached else None
        self.report_cached = False
        delta = TokenDelta(self.rid, tuple(self.out), "", self.finish, self.error, cached)
        self.out.clear()
        return delta

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass(slots=True)
class _Step:
    end: float
    seconds: float
    shape: StepShape
    chunks: list[tuple[_Seq, int]]  # (sequence, tokens computed)


@dataclass(slots=True)
class _Counters:
    steps: int = 0
    busy_seconds: float = 0.0
    last_step_latency_s: float = 0.0
    last_step_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    computed_tokens: int = 0


@dataclass(slots=True)
class _StaticBatch:
    """The batch a static-batching engine runs until every member has finished."""

    size: int
    longest_prompt: int
    members: list[_Seq] = field(default_factory=list)


class SimulatedExecutor:
    """Plans its own steps, like TensorRT-LLM: the scheduler bounds it by admission."""

    def __init__(
        self,
        capacity: Capacity,
        model: StepCostModel,
        *,
        clock: SimClock | None = None,
        batching: str = "inflight",
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if not (math.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self._capacity = capacity
        self._model = model
        self._owns_clock = clock is None
        self.clock = SimClock() if clock is None else clock
        self._static = batching == "static"
        self._jitter = jitter
        self._rng = random.Random(seed)
        self._kv = SimKvPool(capacity.num_kv_blocks, capacity.tokens_per_block)
        self._plan = StepPlan()
        self._inbox: list[_Seq] = []
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # admission order: the last is the newest
        self._live: dict[int, _Seq] = {}  # every enqueued id without a final delta yet
        self._step: _Step | None = None
        self._batch: _StaticBatch | None = None
        # Sequences with output since the last poll, in order; each becomes one delta (a
        # slow poller gets several tokens per delta). Keyed by sequence, not id: an id is
        # free for a new request as soon as its final output is here.
        self._ready: dict[_Seq, None] = {}
        self._samples: deque[StepSample] = deque(maxlen=SAMPLES_KEPT)
        self._shut = False
        self._plan_follower = False
        self.counters = _Counters()

    # -- the protocol ---------------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return self._capacity

    def enqueue(self, request: ExecRequest) -> None:
        self._validate(request)
        context = [*request.prompt_token_ids, *request.resume_token_ids]
        key = hash(request.prompt_token_ids) & 0x7FFFFFFF
        seq = _Seq(request, request.request_id, context, key, len(request.resume_token_ids))
        self._live[request.request_id] = seq
        if seq.num_done >= request.sampling.max_tokens:  # resumed with its budget spent
            self._end(seq, FinishReason.LENGTH)
            return
        self._inbox.append(seq)

    def cancel(self, request_id: int) -> None:
        seq = self._live.get(request_id)
        if seq is None or seq.finish is not None:
            return
        self._take_out(seq)
        self._end(seq, FinishReason.CANCELLED)

    def poll(self, timeout: float) -> list[TokenDelta]:
        if self._owns_clock and not self._ready and timeout > 0 and not self._shut:
            self._run_for(timeout)
        deltas = [seq.take_delta() for seq in self._ready]
        self._ready.clear()
        return deltas

    def stats(self) -> ExecutorStats:
        c, kv = self.counters, self._kv
        return ExecutorStats(
            active=len(self._running),
            queued=len(self._waiting) + len(self._inbox),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.used,
            kv_blocks_free=kv.num_free,
            kv_blocks_cached=kv.num_cached,
            steps=c.steps,
            last_step_latency_s=c.last_step_latency_s,
            last_step_tokens=c.last_step_tokens,
            prompt_tokens=c.prompt_tokens,
            cached_prompt_tokens=c.cached_prompt_tokens,
            generated_tokens=c.generated_tokens,
            busy_seconds=c.busy_seconds,
            context_requests=sum(1 for s in self._running if s.num_pending > 1),
            preemptions=c.preemptions,
        )

    def take_step_samples(self) -> list[StepSample]:
        samples = list(self._samples)
        self._samples.clear()
        return samples

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        for seq in [*self._running, *self._waiting, *self._inbox]:
            self._take_out(seq)
            self._end(seq, FinishReason.CANCELLED)
        self._step = None

    # -- driving the clock ----------------------------------------------------------------

    @property
    def step_end(self) -> float | None:
        """When the step in flight ends (None: idle)."""
        return None if self._step is None else self._step.end

    @property
    def step_start(self) -> float | None:
        return None if self._step is None else self._step.end - self._step.seconds

    @property
    def num_live(self) -> int:
        """Requests enqueued and not finished: the slots a scheduler counts as running."""
        return len(self._live)

    def wake(self) -> None:
        """Starts a step now if none is in flight and there is something to run."""
        if self._step is None and not self._shut:
            self._start_step(self.clock.now)

    def finish_step(self) -> None:
        """Ends the step in flight (the clock must have reached its end) and starts the next
        one with what was enqueued until now."""
        step = self._step
        if step is None:
            raise RuntimeError("no step in flight")
        if self.clock.now < step.end:
            raise RuntimeError(f"the clock ({self.clock.now}) is before the step's end")
        self._step = None
        self._commit(step)
        self._start_step(step.end)

    def run_ahead(self, before: float) -> int:
        """Runs steps whose output no scheduler pass needs to see when it comes: while the
        step in flight is a plain decode of every running sequence that neither starts nor
        ends a stream, and the next step would start before ``before`` (the next input the
        caller knows of), the step ends and the next starts, as if the pass in between had
        nothing to do. The caller makes sure of that: the scheduler holds no request the
        executor does not. The skipped output reaches the next poll as one delta per request.
        Returns how many steps ran."""
        steps = 0
        while (step := self._step) is not None and step.end < before and self._steady(step):
            self._advance_steady(step)
            steps += 1
        return steps

    def _advance_steady(self, step: _Step) -> None:
        """``_commit(step)`` then ``_start_step(step.end)`` for a steady step (``_steady``):
        the same result without the general path's per-sequence bookkeeping, since the next
        step decodes the same sequences, each one token further."""
        c, kv = self.counters, self._kv
        shape = step.shape
        c.steps += 1
        c.busy_seconds += step.seconds
        c.last_step_latency_s = step.seconds
        c.last_step_tokens = shape.tokens
        c.computed_tokens += shape.tokens
        c.generated_tokens += shape.tokens
        self._samples.append(StepSample(shape, step.seconds))
        vocab, room, ready = self._capacity.vocab_size, kv.tokens_per_block, self._ready
        for seq, _ in step.chunks:
            token = (seq.key + 7919 * seq.num_done + 1) % vocab
            seq.num_computed += 1
            seq.num_done += 1
            seq.tokens.append(token)
            seq.out.append(token)
            ready[seq] = None
            if len(seq.tokens) > seq.blocks * room:  # room checked by _steady
                kv.take(1)
                seq.blocks += 1
        rows = shape.decode_rows
        nxt = StepShape(decode_rows=rows, samples=rows,
                        decode_context=shape.decode_context + rows,
                        decode_context_max=shape.decode_context_max + 1)
        seconds = self._model.predict(nxt)
        if self._jitter:
            seconds *= math.exp(self._rng.gauss(0.0, self._jitter))
        self._step = _Step(step.end + seconds, seconds, nxt, step.chunks)

    def check_integrity(self) -> None:
        """Slot and KV accounting (AssertionError); for tests."""
        self._kv.check_integrity()
        assert len(self._running) <= self._capacity.max_slots, "more running than slots"
        held = sum(s.blocks for s in self._running)
        assert held == self._kv.used, f"running sequences hold {held} blocks, pool says used"
        live = [*self._running, *self._waiting, *self._inbox]
        assert {s.rid for s in live} == set(self._live), "a live id is lost"

    # -- internals ------------------------------------------------------------------------

    def _validate(self, request: ExecRequest) -> None:
        cap = self._capacity
        if self._shut:
            raise ValueError("the executor is shut down")
        if request.request_id in self._live:
            raise ValueError(f"request id {request.request_id} is already live")
        if not request.prompt_token_ids:
            raise ValueError("empty prompt")
        context = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if context + 1 > cap.max_seq_len:
            raise ValueError(
                f"prompt of {context} tokens leaves no room to generate "
                f"(max_seq_len {cap.max_seq_len})"
            )
        if cap.blocks_for(context + 1) > cap.num_kv_blocks:
            raise ValueError(f"prompt of {context} tokens exceeds the KV-cache pool")
        ids = request.prompt_token_ids
        if min(ids) < 0 or max(ids) >= cap.vocab_size:
            raise ValueError(f"a token id is outside the vocabulary [0, {cap.vocab_size})")

    def _run_for(self, timeout: float) -> None:
        """Standalone driving: runs steps until output is ready or ``timeout`` passes."""
        deadline = self.clock.now + timeout
        self.wake()
        while not self._ready and self._step is not None and self._step.end <= deadline:
            self.clock.now = self._step.end
            self.finish_step()
        if not self._ready:
            self.clock.now = max(self.clock.now, deadline)

    def _take_out(self, seq: _Seq) -> None:
        """Removes a live sequence from wherever it waits or runs, freeing its blocks."""
        if seq in self._running:
            self._release(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        elif seq in self._inbox:
            self._inbox.remove(seq)

    def _release(self, seq: _Seq) -> None:
        self._running.remove(seq)
        self._kv.release(seq.blocks, seq.tokens, seq.num_computed)
        seq.blocks = 0

    def _queue(self, seq: _Seq, *, front: bool) -> None:
        """Behind every waiting sequence of its priority or higher (``front``: of higher
        priority only, so a preempted sequence resumes first)."""
        p = seq.request.priority
        index = next(
            (i for i, w in enumerate(self._waiting)
             if (w.request.priority <= p if front else w.request.priority < p)),
            len(self._waiting),
        )
        self._waiting.insert(index, seq)

    def _steady(self, step: _Step) -> bool:
        """Whether ending ``step`` and starting the next changes nothing a scheduler pass
        would act on: no new or waiting request, every running sequence decoding (none
        paused, prefilling or about to emit its first or last token), room in the KV pool
        for every sequence's next token, and for a plan follower one tier only (mixed tiers
        are what a plan re-decides as contexts grow)."""
        if self._inbox or self._waiting or self._static or len(step.chunks) != len(self._running):
            return False
        max_seq_len, new_blocks = self._capacity.max_seq_len, 0
        tpb = self._kv.tokens_per_block
        priority = step.chunks[0][0].request.priority if step.chunks else None
        for seq, n in step.chunks:
            sampling = seq.request.sampling
            if (n != 1 or seq.fresh or seq.num_done + 2 > sampling.max_tokens
                    or len(seq.tokens) + 2 > max_seq_len or sampling.stop_token_ids):
                return False
            if self._plan_follower and seq.request.priority != priority:
                return False
            if len(seq.tokens) % tpb == 0:  # its next token starts a block
                new_blocks += 1
        return new_blocks <= self._kv.num_blocks - self._kv.used

    def _start_step(self, now: float) -> None:
        for seq in self._inbox:
            self._queue(seq, front=False)
        self._inbox.clear()
        self._admit()
        chunks = self._schedule()
        if not chunks:
            return
        shape = self._shape(chunks)
        seconds = self._model.predict(shape)
        if self._jitter:
            seconds *= math.exp(self._rng.gauss(0.0, self._jitter))
        self._step = _Step(now + seconds, seconds, shape, chunks)

    def _admit(self) -> None:
        if self._static and self._running:
            return
        batch: list[_Seq] = []
        while self._waiting and len(self._running) < self._capacity.max_slots:
            seq = self._waiting[0]
            cached = self._kv.admit(seq.tokens, self._kv.blocks_for(len(seq.tokens)))
            if cached is None:
                if self._running:
                    break  # blocks come back as running sequences finish
                self._waiting.popleft()
                self._end(seq, FinishReason.ERROR, "prompt does not fit the KV-cache pool")
                continue
            self._waiting.popleft()
            seq.blocks = self._kv.blocks_for(len(seq.tokens))
            seq.num_computed = cached
            self._running.append(seq)
            batch.append(seq)
            if seq.cached_tokens is None:  # first admission, not a re-admission
                seq.cached_tokens = cached
                seq.report_cached = True
                self.counters.prompt_tokens += len(seq.tokens)
                self.counters.cached_prompt_tokens += cached
        if self._static and batch:
            longest = max(len(s.tokens) for s in batch)
            self._batch = _StaticBatch(len(batch), longest, batch)

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """Decodes first (each with a KV slot for the token sampled last), then prefill
        chunks by priority, within the token budget and the plan. The hottest loop of a
        simulation: plain locals, no per-sequence calls unless a block is needed."""
        budget = self._capacity.max_tokens_per_step
        caps = self._plan.token_caps
        room = self._kv.tokens_per_block
        chunks: list[tuple[_Seq, int]] = []
        decodes: list[_Seq] = []
        prefilling: list[_Seq] = []
        for seq in self._running:
            (decodes if len(seq.tokens) - seq.num_computed == 1 else prefilling).append(seq)
        for seq in decodes:
            if budget == 0:
                break
            if seq.blocks == 0 or (caps and caps.get(seq.rid) == 0):
                continue  # preempted just now, or paused
            if len(seq.tokens) > seq.blocks * room and not self._reserve_slot(seq):
                continue
            chunks.append((seq, 1))
            budget -= 1
        if prefilling:
            prefilling.sort(key=lambda s: -s.request.priority)  # stable: admission order
        for seq in prefilling:
            if budget == 0 and not self._static:
                break
            if seq.blocks == 0:
                continue
            pending = len(seq.tokens) - seq.num_computed
            n = pending if self._static else min(pending, budget)
            cap = caps.get(seq.rid) if caps else None
            if cap is not None:
                n = min(n, cap)
            if n > 0:
                chunks.append((seq, n))
                budget = max(0, budget - n)
        return chunks

    def _reserve_slot(self, seq: _Seq) -> bool:
        """A KV block for the last sampled token when its block is full, preempting the
        newest sequence of the lowest priority while none is left; False when seq itself
        was preempted."""
        while seq.blocks < self._kv.blocks_for(len(seq.tokens)):
            if self._kv.take(1):
                seq.blocks += 1
                return True
            lowest = min(s.request.priority for s in self._running)
            victim = next(s for s in reversed(self._running) if s.request.priority == lowest)
            self._release(victim)
            victim.num_computed = 0
            self._queue(victim, front=True)
            self.counters.preemptions += 1
            if victim is seq:
                return False
        return True

    def _shape(self, chunks: list[tuple[_Seq, int]]) -> StepShape:
        shape = StepShape()
        batch = self._batch
        rows = context = longest = 0
        for seq, n in chunks:
            pending = len(seq.tokens) - seq.num_computed
            if n == 1 and pending == 1:  # a decode (StepShape.add_decode, summed here)
                rows += 1
                context += len(seq.tokens)
                if len(seq.tokens) > longest:
                    longest = len(seq.tokens)
            elif batch is not None:  # static: every prompt padded to the batch's longest
                shape.add_prefill(0, batch.longest_prompt, True)
            else:
                shape.add_prefill(seq.num_computed, n, n == pending)
        shape.decode_rows += rows
        shape.samples += rows
        shape.decode_context += context
        shape.decode_context_max = max(shape.decode_context_max, longest)
        if batch is not None:  # finished members keep their rows: padding
            shape.add_decodes(shape.decode_context_max or batch.longest_prompt,
                              batch.size - len(chunks))
        return shape

    def _commit(self, step: _Step) -> None:
        c = self.counters
        c.steps += 1
        c.busy_seconds += step.seconds
        c.last_step_latency_s = step.seconds
        c.last_step_tokens = step.shape.tokens
        c.computed_tokens += step.shape.tokens
        self._samples.append(StepSample(step.shape, step.seconds))
        max_seq_len, vocab = self._capacity.max_seq_len, self._capacity.vocab_size
        for seq, n in step.chunks:
            if seq.finish is not None or seq.blocks == 0:
                continue  # cancelled or preempted while the step ran: its work is lost
            seq.num_computed += n
            if seq.num_computed < len(seq.tokens):
                continue  # a prefill chunk short of the end samples nothing
            token = (seq.key + 7919 * seq.num_done + 1) % vocab
            seq.fresh = False
            seq.tokens.append(token)
            seq.num_done += 1
            c.generated_tokens += 1
            sampling = seq.request.sampling
            if seq.num_done >= sampling.max_tokens or len(seq.tokens) >= max_seq_len:
                reason: FinishReason | None = FinishReason.LENGTH
            elif sampling.stop_token_ids and token in sampling.stop_token_ids and (
                seq.num_done >= sampling.min_tokens
            ):
                reason = FinishReason.STOP
            else:
                reason = None
            if reason is not None:
                self._release(seq)
                self._end(seq, reason, token=token)
            else:
                seq.out.append(token)
                self._ready[seq] = None
        if self._batch is not None and not self._running:
            self._batch = None

    def _end(
        self, seq: _Seq, reason: FinishReason, error: str | None = None, token: int | None = None
    ) -> None:
        seq.finish, seq.error, seq.report_cached = reason, error, True
        del self._live[seq.rid]
        if token is not None:
            seq.out.append(token)
        self._ready[seq] = None


class PlanFollowingSimulatedExecutor(SimulatedExecutor):
    """Also follows the scheduler's step plans (``PlanFollower``), like the CPU executor."""

    def __init__(self, capacity: Capacity, model: StepCostModel, **kwargs: Any) -> None:
        super().__init__(capacity, model, **kwargs)
        self._plan_follower = True

    def set_plan(self, plan: StepPlan) -> None:
        self._plan = plan
