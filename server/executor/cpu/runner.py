"""The step loop: in-flight batching with chunked prefill over a paged, prefix-cached KV pool.

Each step (1) admits waiting sequences (FIFO) while slots and KV blocks allow, (2) schedules
every running decode plus prefill chunks up to the token budget, (3) runs one packed forward
pass and (4) samples, applies stops and frees finished sequences. A running sequence always
has `num_computed < len(token_ids)`: the tokens in between are what its next step computes
(a prefill chunk, or the one token sampled last step). When a decode needs a KV block and none
is left, the newest running sequence is preempted back to the head of the queue and later
recomputed (mostly from the prefix cache); its output stream is unaffected.

Priority (ExecRequest.priority, higher first): the waiting queue is ordered by it; a step in
which a higher-priority sequence prefills leaves lower-priority decodes out; and while a step
runs, its forward pass calls a hook between layers through which the executor hands over newly
arrived requests of higher priority than the step's lowest: `urgent_prefill_step` then runs
their prefill at once, nested in the layer loop, and their first token goes out before the long
step resumes. On a CPU a full step of background decodes takes hundreds of milliseconds, so this
is what keeps an online request's time to first token close to that of an idle engine, without
throwing away the background step's work.

Single-threaded: the executor's worker thread owns a Runner.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, FinishReason, TokenDelta
from server.executor.cpu.attention import DecodeGroup, PagedKvCache, PrefillSegment
from server.executor.cpu.model import ForwardBatch, LlamaModel
from server.executor.cpu.sampling import sample_token
from server.executor.cpu.stops import OutputTracker
from server.executor.kv_cache import BlockManager, NoFreeBlocksError


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    max_batch_size: int  # sequences holding a slot
    max_num_tokens: int  # tokens computed per step
    max_seq_len: int  # prompt + generated tokens
    # Prefill tokens of lower priority per step while a higher-priority sequence decodes in
    # it: every one of them lengthens that sequence's time per output token.
    background_prefill_tokens: int = 64


@dataclass(slots=True, eq=False)  # identity semantics: `in` and `remove` on lists
class Sequence:
    """One request's live state. `token_ids` = prompt + resumed + generated."""

    request: ExecRequest
    seed: int
    tracker: OutputTracker
    token_ids: list[int]
    num_computed: int = 0  # tokens whose K/V is in the cache
    cached_prompt_tokens: int | None = None  # set at first admission
    # Output since the last drain.
    out_ids: list[int] = field(default_factory=list)
    out_text: str = ""
    report_cached: bool = False
    # In the context phase: admitted and not sampled from since. Not the same as
    # num_pending > 1: a one-token prompt, or a prompt the prefix cache covers but for its
    # last token, is in its context phase with a single pending token.
    prefilling: bool = True
    finish: FinishReason | None = None
    error: str | None = None

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True, slots=True)
class Scheduled:
    seq: Sequence
    start: int  # first position computed
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass(slots=True)
class RunnerCounters:
    steps: int = 0
    last_step_latency_s: float = 0.0
    last_step_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    preemptions: int = 0
    computed_tokens: int = 0  # prefill + decode tokens run through the model


class Runner:
    def __init__(
        self,
        model: LlamaModel,
        cache: PagedKvCache,
        blocks: BlockManager,
        tokenizer: EngineTokenizer,
        limits: RunnerLimits,
    ) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.counters = RunnerCounters()
        self._finished: list[Sequence] = []  # finished since the last drain
        # The step whose forward pass is in flight: its sequences and the lowest priority among
        # them. A request above that priority is delayed by the step's lower-priority work, so
        # it may overtake it (even if the step also carries decodes of its own priority).
        self._in_flight: set[int] = set()
        self.step_priority: float | None = None  # None between steps
        self._nested_s = 0.0  # time urgent steps took inside the step in flight

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished)

    # -- requests -------------------------------------------------------------------------

    def add(self, request: ExecRequest, seed: int) -> None:
        """Queues a validated request (the executor checks ids, lengths and vocabulary)."""
        context = [*request.prompt_token_ids, *request.resume_token_ids]
        tracker = OutputTracker(
            request.sampling, self.tokenizer, context, len(request.resume_token_ids)
        )
        seq = Sequence(request, seed, tracker, context)
        if tracker.reached_max_tokens:  # a resumed request that had already used its budget
            self._finish(seq, FinishReason.LENGTH)
            return
        # Higher priority first, FIFO within a priority (TensorRT-LLM's queue semantics).
        index = next(
            (i for i, w in enumerate(self.waiting) if w.request.priority < request.priority),
            len(self.waiting),
        )
        self.waiting.insert(index, seq)

    def cancel(self, request_id: int) -> None:
        """Ends a waiting or running sequence with CANCELLED; unknown ids are a no-op."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._end(seq, FinishReason.CANCELLED)
                return
        for seq in self.running:
            if seq.request_id == request_id:
                self._release(seq)
                self._end(seq, FinishReason.CANCELLED)
                return

    def cancel_all(
        self, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None
    ) -> None:
        """Ends every live sequence (shutdown, or an engine failure with ERROR)."""
        for seq in list(self.running):
            self._release(seq)
            self._end(seq, reason, error)
        while self.waiting:
            self._end(self.waiting.popleft(), reason, error)

    # -- the step -------------------------------------------------------------------------

    def step(self, between_layers: Callable[[], None] | None = None) -> list[TokenDelta]:
        """Runs one iteration (if anything can run) and returns the output it produced.
        ``between_layers`` is called between the layers of its forward pass (see the module
        docstring); it may call `urgent_prefill_step`."""
        t0 = time.perf_counter()
        self._admit()
        plan = self._schedule(self._step_members())
        if plan:
            self._in_flight = {item.seq.request_id for item in plan}
            self.step_priority = min(item.seq.request.priority for item in plan)
            self._nested_s = 0.0
            try:
                self._execute(plan, t0, between_layers)
            finally:
                self._in_flight, self.step_priority = set(), None
        return self.drain()

    def urgent_prefill_step(self, leaving: int = 0) -> list[TokenDelta]:
        """Inside a step's forward pass: admits waiting sequences of higher priority than the
        step's lowest-priority member, runs one prefill chunk of each such sequence not in the
        step, and returns their output (a first token where a prompt completes).

        ``leaving`` counts running sequences already cancelled (a preemption for this very
        request, typically) that release their slots when the step ends: their slots may be
        taken now. Never preempts: a sequence that does not fit waits for the next step."""
        if self.step_priority is None:
            raise RuntimeError("urgent_prefill_step runs only inside a step's forward pass")
        t0 = time.perf_counter()
        floor = self.step_priority
        self._admit(lambda seq: seq.request.priority > floor, extra_slots=leaving)
        members = [
            s
            for s in self.running
            if s.request.priority > floor and s.request_id not in self._in_flight
            and s.prefilling
        ]
        plan = self._schedule(members)
        if not plan:
            return []
        self._execute(plan, t0)
        self._nested_s += time.perf_counter() - t0  # not the enclosing step's own time
        return self.drain({item.seq.request_id for item in plan})

    def _execute(
        self, plan: list[Scheduled], t0: float, between_layers: Callable[[], None] | None = None
    ) -> None:
        """One forward pass over plan, its samples, and its counters. The time of urgent
        steps nested in it is counted by them, not again here."""
        self._copy_pending_blocks()
        logits = self.model.forward(self._build_batch(plan), self.cache, between_layers)
        self._commit(plan, logits)
        nested = self._nested_s if between_layers is not None else 0.0
        self._count_step(plan, time.perf_counter() - t0 - nested)

    def _admit(
        self, eligible: Callable[[Sequence], bool] | None = None, extra_slots: int = 0
    ) -> None:
        """Moves waiting sequences (in queue order) into slots while slots and KV blocks
        allow; with ``eligible``, stops at the first sequence that is not."""
        while self.waiting and len(self.running) < self.limits.max_batch_size + extra_slots:
            seq = self.waiting[0]
            if eligible is not None and not eligible(seq):
                return
            if not self.blocks.can_allocate(len(seq.token_ids)):
                if not self.running:  # nothing will ever free blocks for it
                    self.waiting.popleft()
                    self._end(seq, FinishReason.ERROR, "prompt does not fit the KV-cache pool")
                    continue
                return
            try:
                cached = self.blocks.allocate(seq.request_id, seq.token_ids)
            except NoFreeBlocksError:
                return
            self.waiting.popleft()
            seq.num_computed = cached
            seq.prefilling = True
            self.running.append(seq)
            if seq.cached_prompt_tokens is None:  # first admission, not a re-admission
                seq.cached_prompt_tokens = cached
                seq.report_cached = True
                self.counters.prompt_tokens += len(seq.token_ids)
                self.counters.cached_prompt_tokens += cached

    def _step_members(self) -> list[Sequence]:
        """The running sequences this step computes: all of them, except that while a
        sequence of higher priority is in prefill, lower-priority ones sit the step out.
        On a CPU a step's cost grows with its batch (unlike a memory-bound GPU step), so this
        keeps a full batch of background decodes from delaying a first token."""
        prefilling = [s.request.priority for s in self.running if s.prefilling]
        if not prefilling:
            return self.running
        top = max(prefilling)
        return [s for s in self.running if s.request.priority >= top]

    def _schedule(self, members: list[Sequence]) -> list[Scheduled]:
        """Decodes first, then prefill chunks, up to the step's token budget. Prefills of lower
        priority than a decode in the step share a smaller budget (background_prefill_tokens):
        on a CPU each token of a step adds to its time, so a long background prefill would
        stretch every online token's time."""
        budget = self.limits.max_num_tokens
        plan: list[Scheduled] = []
        for seq in [s for s in members if s.num_pending == 1]:
            if budget == 0:
                break
            if seq in self.running and self._reserve_slot(seq):
                plan.append(Scheduled(seq, seq.num_computed, 1))
                budget -= 1
        decoding = [item.seq.request.priority for item in plan if not item.seq.prefilling]
        top = max(decoding, default=None)
        background = self.limits.background_prefill_tokens
        for seq in members:
            if budget == 0:
                break
            if seq in self.running and seq.num_pending > 1:
                behind = top is not None and seq.request.priority < top
                n = min(seq.num_pending, min(budget, background) if behind else budget)
                if n == 0:
                    continue
                plan.append(Scheduled(seq, seq.num_computed, n))
                budget -= n
                if behind:
                    background -= n
        return plan

    def _reserve_slot(self, seq: Sequence) -> bool:
        """Gives the last sampled token a KV slot, preempting the newest sequences if the
        pool is full. False when seq itself had to be preempted."""
        if self.blocks.num_tokens(seq.request_id) == len(seq.token_ids):
            return True  # re-admitted: allocate() already covered every token
        while not self.blocks.can_append(seq.request_id):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append_token(seq.request_id, seq.token_ids[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    def _copy_pending_blocks(self) -> None:
        for src, dst in self.blocks.take_pending_copies():
            self.cache.copy_block(src, dst)

    def _build_batch(self, plan: list[Scheduled]) -> ForwardBatch:
        tpb = self.blocks.tokens_per_block
        ids, positions, slots = [], [], []
        prefills: list[PrefillSegment] = []
        dec_rows, dec_lens, dec_tables = [], [], []
        sample_rows = []
        row = 0
        for item in plan:
            seq, start, n = item.seq, item.start, item.num_tokens
            table = np.asarray(self.blocks.block_table(seq.request_id), dtype=np.int64)
            pos = np.arange(start, start + n)
            ids.append(np.asarray(seq.token_ids[start : start + n], dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // tpb] * tpb + pos % tpb)
            num_blocks = -(-(start + n) // tpb)
            if n == 1:  # one query over its context: the same math as a decode
                dec_rows.append(row)
                dec_lens.append(start + 1)
                dec_tables.append(table[:num_blocks])
            else:
                prefills.append(PrefillSegment(row, n, start, table[:num_blocks]))
            if item.samples:
                sample_rows.append(row + n - 1)
            row += n
        return ForwardBatch(
            token_ids=np.concatenate(ids),
            positions=np.concatenate(positions),
            slots=np.concatenate(slots),
            prefills=tuple(prefills),
            decode=_decode_group(dec_rows, dec_lens, dec_tables),
            sample_rows=np.asarray(sample_rows, dtype=np.int64),
        )

    def _commit(self, plan: list[Scheduled], logits: np.ndarray) -> None:
        sampled = 0
        for item in plan:
            seq = item.seq
            seq.num_computed += item.num_tokens
            self.blocks.mark_computed(seq.request_id, seq.num_computed)
            if item.samples:
                self._append_sample(seq, logits[sampled])
                sampled += 1

    def _append_sample(self, seq: Sequence, logits: np.ndarray) -> None:
        tracker = seq.tracker
        index = tracker.num_generated
        token = sample_token(
            logits, seq.request.sampling, seq.seed, index, tracker.banned_ids()
        )
        seq.token_ids.append(token)
        seq.prefilling = False
        seq.out_ids.append(token)
        self.counters.generated_tokens += 1
        text, finish = tracker.push(token)
        seq.out_text += text
        if finish is None and len(seq.token_ids) >= self.limits.max_seq_len:
            seq.out_text += tracker.flush()
            finish = FinishReason.LENGTH
        if finish is not None:
            self._release(seq)
            self._finish(seq, finish)

    def _count_step(self, plan: list[Scheduled], latency: float) -> None:
        c = self.counters
        c.steps += 1
        c.last_step_latency_s = latency
        c.last_step_tokens = sum(item.num_tokens for item in plan)
        c.computed_tokens += c.last_step_tokens
        c.busy_seconds += latency

    # -- endings and output ---------------------------------------------------------------

    def _release(self, seq: Sequence) -> None:
        """Gives back the slot and KV blocks of a running sequence."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        seq.finish, seq.error = reason, error
        seq.report_cached = True
        self._finished.append(seq)

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """A sequence stopped from outside (cancel, error): emit what was held back."""
        seq.out_text += seq.tracker.flush_held()
        self._finish(seq, reason, error)

    def drain(self, only: set[int] | None = None) -> list[TokenDelta]:
        """One delta per sequence with new output since the last drain; with ``only``, for
        those request ids alone (the others' output waits for their own step to end)."""
        def wanted(seq: Sequence) -> bool:
            return only is None or seq.request_id in only

        deltas = [_take_delta(seq) for seq in self.running if seq.out_ids and wanted(seq)]
        done = [seq for seq in self._finished if wanted(seq)]
        self._finished = [seq for seq in self._finished if not wanted(seq)]
        return deltas + [_take_delta(seq) for seq in done]

    def check_integrity(self) -> None:
        self.blocks.check_integrity()
        held = {seq.request_id for seq in self.running}
        assert len(held) == len(self.running), "a sequence runs twice"
        assert len(self.running) <= self.limits.max_batch_size, "more running than slots"
        for seq in self.running:
            assert seq.request_id in self.blocks, "a running sequence holds no blocks"
            assert 0 <= seq.num_computed < len(seq.token_ids), "nothing left to compute"
            assert self.blocks.num_computed(seq.request_id) == seq.num_computed
        for seq in self.waiting:
            assert seq.request_id not in self.blocks, "a waiting sequence holds blocks"


def _decode_group(rows: list[int], lens: list[int], tables: list[np.ndarray]) -> DecodeGroup | None:
    if not rows:
        return None
    width = max(len(t) for t in tables)
    padded = np.empty((len(tables), width), dtype=np.int64)  # [B, max_blocks]
    for i, table in enumerate(tables):
        padded[i, : len(table)] = table
        padded[i, len(table) :] = table[0]  # any valid block; masked by context_lens
    return DecodeGroup(np.asarray(rows), np.asarray(lens), padded)


def _take_delta(seq: Sequence) -> TokenDelta:
    delta = TokenDelta(
        request_id=seq.request_id,
        token_ids=tuple(seq.out_ids),
        text=seq.out_text,
        finish=seq.finish,
        error=seq.error,
        cached_prompt_tokens=(seq.cached_prompt_tokens or 0) if seq.report_cached else None,
    )
    seq.out_ids, seq.out_text, seq.report_cached = [], "", False
    return delta
