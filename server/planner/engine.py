"""The simulated engine behind ``SimulatedExecutor``: its sequences, slots, token budget and
KV pool, and what each step computes and costs (server/planner/executor.py says what it models).

Single-threaded; the executor owns one and drives it on its virtual clock.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from engine_builder.step_cost import StepCostModel, StepSample, StepShape
from server.executor.base import Capacity, ExecRequest, FinishReason, StepPlan, TokenDelta
from server.planner.kv import SimKvPool

BATCHING = ("inflight", "static")
SAMPLES_KEPT = 4096  # step samples nobody took are dropped oldest first beyond this


@dataclass(slots=True, eq=False)
class SimSequence:
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
    token_s: float = 0.0  # when its last token was emitted (the end of that step)
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
class SimStep:
    end: float
    seconds: float
    shape: StepShape
    chunks: list[tuple[SimSequence, int]]  # (sequence, tokens computed)
    overtake_interval_s: float | None = None  # of the plan it started under
    nested_prefills: bool = False  # overtakers' prefills nested in another step
    tail: float = 0.0  # seconds after its last layer (LM head, sampling): no overtaking there


@dataclass(slots=True)
class Counters:
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
    members: list[SimSequence] = field(default_factory=list)


class SimEngine:
    """Waiting and running sequences, the step in flight, and the output not yet polled."""

    def __init__(self, capacity: Capacity, model: StepCostModel, *, batching: str,
                 jitter: float, seed: int, plan_follower: bool) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if not (math.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.capacity = capacity
        self._model = model
        self._static = batching == "static"
        self._jitter = jitter
        self._rng = random.Random(seed)
        self.plan_follower = plan_follower
        self.kv = SimKvPool(capacity.num_kv_blocks, capacity.tokens_per_block)
        self.plan = StepPlan()
        self.inbox: list[SimSequence] = []
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []  # admission order: the last is the newest
        self.live: dict[int, SimSequence] = {}  # every enqueued id without a final delta yet
        self.step: SimStep | None = None
        # The step that nested steps interrupted and the seconds it had left (an overtaking
        # engine's; see overtaking.py).
        self.suspended: tuple[SimStep, float] | None = None
        self._batch: _StaticBatch | None = None
        # Sequences with output since the last poll, in order; each becomes one delta (a
        # slow poller gets several tokens per delta). Keyed by sequence, not id: an id is
        # free for a new request as soon as its final output is here.
        self.ready: dict[SimSequence, None] = {}
        self.samples: deque[StepSample] = deque(maxlen=SAMPLES_KEPT)
        self.counters = Counters()

    def add(self, request: ExecRequest) -> None:
        """A validated request; it joins the waiting queue when the next step starts."""
        context = [*request.prompt_token_ids, *request.resume_token_ids]
        key = hash(request.prompt_token_ids) & 0x7FFFFFFF
        seq = SimSequence(request, request.request_id, context, key,
                          len(request.resume_token_ids))
        self.live[request.request_id] = seq
        if seq.num_done >= request.sampling.max_tokens:  # resumed with its budget spent
            self.end(seq, FinishReason.LENGTH)
            return
        self.inbox.append(seq)

    def advance_steady(self, step: SimStep) -> None:
        """``commit(step)`` then ``start_step(step.end)`` for a steady step (``steady``):
        the same result without the general path's per-sequence bookkeeping, since the next
        step decodes the same sequences, each one token further."""
        c, kv = self.counters, self.kv
        shape = step.shape
        c.steps += 1
        c.busy_seconds += step.seconds
        c.last_step_latency_s = step.seconds
        c.last_step_tokens = shape.tokens
        c.computed_tokens += shape.tokens
        c.generated_tokens += shape.tokens
        self.samples.append(StepSample(shape, step.seconds))
        vocab, room, ready = self.capacity.vocab_size, kv.tokens_per_block, self.ready
        for seq, _ in step.chunks:
            token = (seq.key + 7919 * seq.num_done + 1) % vocab
            seq.num_computed += 1
            seq.num_done += 1
            seq.tokens.append(token)
            seq.out.append(token)
            ready[seq] = None
            if len(seq.tokens) > seq.blocks * room:  # room checked by steady
                kv.take(1)
                seq.blocks += 1
        rows = shape.decode_rows
        nxt = StepShape(decode_rows=rows, samples=rows,
                        decode_context=shape.decode_context + rows,
                        decode_context_max=shape.decode_context_max + 1)
        seconds = self._seconds(nxt)
        self.step = SimStep(step.end + seconds, seconds, nxt, step.chunks, step.overtake_interval_s,
                            tail=self._tail(nxt, seconds))

    def take_out(self, seq: SimSequence) -> None:
        """Removes a live sequence from wherever it waits or runs, freeing its blocks."""
        if seq in self.running:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.inbox:
            self.inbox.remove(seq)

    def _release(self, seq: SimSequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.blocks, seq.tokens, seq.num_computed)
        seq.blocks = 0

    def _queue(self, seq: SimSequence, *, front: bool) -> None:
        """Behind every waiting sequence of its priority or higher (``front``: of higher
        priority only, so a preempted sequence resumes first)."""
        p = seq.request.priority
        index = next(
            (i for i, w in enumerate(self.waiting)
             if (w.request.priority <= p if front else w.request.priority < p)),
            len(self.waiting),
        )
        self.waiting.insert(index, seq)

    def steady(self, step: SimStep) -> bool:
        """Whether ending ``step`` and starting the next changes nothing a scheduler pass
        would act on: no new or waiting request, every running sequence decoding (none
        paused, prefilling or about to emit its first or last token), room in the KV pool
        for every sequence's next token, and for a plan follower one tier only (mixed tiers
        are what a plan re-decides as contexts grow)."""
        if (self.inbox or self.waiting or self._static or self.suspended is not None
                or len(step.chunks) != len(self.running)):
            return False
        max_seq_len, new_blocks = self.capacity.max_seq_len, 0
        tpb = self.kv.tokens_per_block
        priority = step.chunks[0][0].request.priority if step.chunks else None
        for seq, n in step.chunks:
            sampling = seq.request.sampling
            if (n != 1 or seq.fresh or seq.num_done + 2 > sampling.max_tokens
                    or len(seq.tokens) + 2 > max_seq_len or sampling.stop_token_ids):
                return False
            if self.plan_follower and seq.request.priority != priority:
                return False
            if len(seq.tokens) % tpb == 0:  # its next token starts a block
                new_blocks += 1
        return new_blocks <= self.kv.num_blocks - self.kv.used

    def start_step(self, now: float) -> None:
        for seq in self.inbox:
            self._queue(seq, front=False)
        self.inbox.clear()
        self._admit()
        chunks = self._schedule()
        if not chunks:
            return
        shape = self._shape(chunks)
        seconds = self._seconds(shape)
        self.step = SimStep(now + seconds, seconds, shape, chunks, self.plan.overtake_interval_s,
                            tail=self._tail(shape, seconds))

    def _tail(self, shape: StepShape, seconds: float) -> float:
        """Seconds of a step after its last layer where no overtaker nests (overtaking.py)."""
        return 0.0

    def resume(self, now: float, ended: SimStep) -> bool:
        """After step ``ended``: True when it was nested in another, which goes on (only an
        overtaking engine nests steps)."""
        return False

    def stop(self) -> None:
        """Drops the step in flight (shutdown)."""
        self.step = None
        self.suspended = None

    def _seconds(self, shape: StepShape) -> float:
        """How long a step of ``shape`` takes: the model's prediction, jittered."""
        seconds = self._model.predict(shape)
        if self._jitter:
            seconds *= math.exp(self._rng.gauss(0.0, self._jitter))
        return seconds

    def _run(self, seq: SimSequence, cached: int) -> None:
        """Moves an admitted sequence (its blocks taken, ``cached`` of them found) into the
        running set."""
        seq.blocks = self.kv.blocks_for(len(seq.tokens))
        seq.num_computed = cached
        self.running.append(seq)
        if seq.cached_tokens is None:  # first admission, not a re-admission
            seq.cached_tokens = cached
            seq.report_cached = True
            self.counters.prompt_tokens += len(seq.tokens)
            self.counters.cached_prompt_tokens += cached

    def _admit(self) -> None:
        if self._static and self.running:
            return
        batch: list[SimSequence] = []
        while self.waiting and len(self.running) < self.capacity.max_slots:
            seq = self.waiting[0]
            cached = self.kv.admit(seq.tokens, self.kv.blocks_for(len(seq.tokens)))
            if cached is None:
                if self.running:
                    break  # blocks come back as running sequences finish
                self.waiting.popleft()
                self.end(seq, FinishReason.ERROR, "prompt does not fit the KV-cache pool")
                continue
            self.waiting.popleft()
            self._run(seq, cached)
            batch.append(seq)
        if self._static and batch:
            longest = max(len(s.tokens) for s in batch)
            self._batch = _StaticBatch(len(batch), longest, batch)

    def _schedule(self) -> list[tuple[SimSequence, int]]:
        """Decodes first (each with a KV slot for the token sampled last), then prefill
        chunks by priority, within the token budget and the plan. The hottest loop of a
        simulation: plain locals, no per-sequence calls unless a block is needed."""
        budget = self.capacity.max_tokens_per_step
        caps = self.plan.token_caps
        room = self.kv.tokens_per_block
        chunks: list[tuple[SimSequence, int]] = []
        decodes: list[SimSequence] = []
        prefilling: list[SimSequence] = []
        for seq in self.running:
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

    def _reserve_slot(self, seq: SimSequence, *, preempt: bool = True) -> bool:
        """A KV block for the last sampled token when its block is full, preempting the
        newest sequence of the lowest priority while none is left (unless not ``preempt``);
        False when it got none: seq itself was preempted, or none was free."""
        while seq.blocks < self.kv.blocks_for(len(seq.tokens)):
            if self.kv.take(1):
                seq.blocks += 1
                return True
            if not preempt:
                return False
            lowest = min(s.request.priority for s in self.running)
            victim = next(s for s in reversed(self.running) if s.request.priority == lowest)
            self._release(victim)
            victim.num_computed = 0
            self._queue(victim, front=True)
            self.counters.preemptions += 1
            if victim is seq:
                return False
        return True

    def _shape(self, chunks: list[tuple[SimSequence, int]]) -> StepShape:
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

    def commit(self, step: SimStep) -> None:
        c = self.counters
        c.steps += 1
        c.busy_seconds += step.seconds
        c.last_step_latency_s = step.seconds
        c.last_step_tokens = step.shape.tokens
        c.computed_tokens += step.shape.tokens
        self.samples.append(StepSample(step.shape, step.seconds))
        max_seq_len, vocab = self.capacity.max_seq_len, self.capacity.vocab_size
        for seq, n in step.chunks:
            if seq.finish is not None or seq.blocks == 0:
                continue  # cancelled or preempted while the step ran: its work is lost
            seq.num_computed += n
            if seq.num_computed < len(seq.tokens):
                continue  # a prefill chunk short of the end samples nothing
            token = (seq.key + 7919 * seq.num_done + 1) % vocab
            seq.fresh = False
            seq.token_s = step.end
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
                self.end(seq, reason, token=token)
            else:
                seq.out.append(token)
                self.ready[seq] = None
        if self._batch is not None and not self.running:
            self._batch = None

    def end(self, seq: SimSequence, reason: FinishReason, error: str | None = None,
            token: int | None = None) -> None:
        """Marks seq finished; its final output goes out with the next poll."""
        seq.finish, seq.error, seq.report_cached = reason, error, True
        del self.live[seq.rid]
        if token is not None:
            seq.out.append(token)
        self.ready[seq] = None


