"""Which sequences hold slots, and what each computes in the next step.

The batcher admits waiting sequences into slots while slots and KV blocks allow (higher
priority first, FIFO within a priority: TensorRT-LLM's queue semantics), then packs a step:
every decode (with the tokens drafted for it, when it speculates), then prefill chunks, up to
the engine's token budget, each sequence limited by the scheduler's standing ``StepPlan`` (a
cap of 0 pauses it: it keeps its slot and blocks but sits the step out). It applies the plan;
it does not decide what matters more.

When a decode needs a KV block and none is left, the newest sequence of the lowest priority is
preempted back to the head of the queue and later recomputed (mostly from the prefix cache);
its output stream is unaffected.

Sequences with the same prompt (the n choices of one request) share its KV blocks: one that
finds its prompt being prefilled by a running sequence waits until that prefill is done, then
starts from the prefix cache, so the prompt is computed once, not n times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from server.executor.base import StepPlan
from server.executor.cpu.drafter import Draft
from server.executor.cpu.sequence import Chunk, Sequence
from server.executor.kv import BlockManager, NoFreeBlocksError


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int  # sequences holding a slot
    max_num_tokens: int  # tokens computed per step
    max_seq_len: int  # prompt + generated tokens


class Batcher:
    """Waiting and running sequences and their KV blocks. Single-threaded (the engine's)."""

    def __init__(self, blocks: BlockManager, limits: BatchLimits) -> None:
        self.blocks = blocks
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.plan = StepPlan()
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # of sequences admitted for the first time
        self.num_cached_prompt_tokens = 0  # of which the prefix cache held

    def reset_counts(self) -> None:
        """Zeroes the preemption and prompt-token counts (after a warm-up)."""
        self.num_preemptions = self.num_prompt_tokens = self.num_cached_prompt_tokens = 0

    def add(self, seq: Sequence) -> None:
        """Queues a sequence behind every waiting one of its priority or higher."""
        index = next(
            (i for i, w in enumerate(self.waiting) if w.priority < seq.priority),
            len(self.waiting),
        )
        self.waiting.insert(index, seq)

    def remove(self, request_id: int) -> Sequence | None:
        """Takes a waiting or running sequence out (freeing its blocks); None if unknown."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.release(seq)
                return seq
        return None

    def release(self, seq: Sequence) -> None:
        """Gives back the slot and KV blocks of a running sequence."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)

    # -- admission ------------------------------------------------------------------------

    def admit(self, only: set[int] | None = None, extra_slots: int = 0) -> list[Sequence]:
        """Moves waiting sequences (in queue order; with ``only``, just those ids) into free
        slots while KV blocks allow. ``extra_slots``: slots that sequences already cancelled
        give back when the step in flight ends, usable now. Returns the sequences that can
        never fit the pool (none is running to free blocks): the caller ends them."""
        unfit: list[Sequence] = []
        for seq in [s for s in self.waiting if only is None or s.request_id in only]:
            if len(self.running) >= self.limits.max_batch_size + extra_slots:
                break
            if self._prompt_in_prefill(seq):
                continue  # waits for a sibling's prefill, keeping its place in the queue
            if not self.blocks.can_allocate(len(seq.token_ids)):
                if self.running:
                    break  # blocks come back as running sequences finish
                self.waiting.remove(seq)
                unfit.append(seq)
                continue
            try:
                cached = self.blocks.allocate(
                    seq.request_id, seq.token_ids, reuse=not seq.scores_prompt
                )
            except NoFreeBlocksError:
                break
            self.waiting.remove(seq)
            seq.num_computed = cached
            seq.prefilling = True
            self.running.append(seq)
            if seq.cached_prompt_tokens is None:  # first admission, not a re-admission
                seq.cached_prompt_tokens = cached
                seq.report_cached = True
                self.num_prompt_tokens += len(seq.token_ids)
                self.num_cached_prompt_tokens += cached
        return unfit

    def _prompt_in_prefill(self, seq: Sequence) -> bool:
        """A running sequence is computing the same prompt's blocks right now: seq would find
        them in the prefix cache a step or two later instead of computing them again."""
        prompt = seq.request.prompt_token_ids
        if len(prompt) <= self.blocks.tokens_per_block or seq.scores_prompt:
            return False  # no full block to share, or it must compute every position anyway
        return any(
            r.prefilling and r.num_computed < len(prompt) - 1
            and r.request.prompt_token_ids == prompt
            for r in self.running
        )

    # -- the step -------------------------------------------------------------------------

    def schedule(
        self,
        only: set[int] | None = None,
        drafts: Mapping[int, Draft] | None = None,
        *,
        preempt: bool = True,
    ) -> list[Chunk]:
        """The chunks of the next step (with ``only``, of just those ids): decodes first (each
        needs one KV slot for the token sampled last, and one per drafted token it verifies),
        then prefill chunks by priority, within the token budget and the plan. Without
        ``preempt`` a decode that finds no free slot sits the step out."""
        budget = self.limits.max_num_tokens
        drafts = drafts or {}
        chunks: list[Chunk] = []
        members = [s for s in self.running if only is None or s.request_id in only]
        for seq in [s for s in members if s.num_pending == 1]:
            if budget == 0:
                break
            if self._cap(seq) == 0 or seq not in self.running:  # paused, or preempted below
                continue
            if self._reserve_slot(seq, preempt):
                draft = self._reserve_draft(seq, drafts.get(seq.request_id), budget - 1)
                chunks.append(Chunk(seq, seq.num_computed, 1 + len(draft), draft))
                budget -= 1 + len(draft)
        # A decode's KV slot may have come from preempting a sequence already packed.
        chunks = [c for c in chunks if c.seq in self.running]
        prefilling = sorted(
            (s for s in members if s.num_pending > 1 and s in self.running),
            key=lambda s: -s.priority,
        )  # stable: admission order within a priority
        for seq in prefilling:
            if budget == 0:
                break
            cap = self._cap(seq)
            n = min(seq.num_pending, budget, seq.num_pending if cap is None else cap)
            if n > 0:
                chunks.append(Chunk(seq, seq.num_computed, n))
                budget -= n
        return chunks

    def _reserve_draft(self, seq: Sequence, draft: Draft | None, budget: int) -> tuple[int, ...]:
        """KV slots for as much of the draft as the budget, the plan's cap and free blocks
        allow (never preempting: drafted tokens are a bet, not work owed); returns that
        much. The slots hold unverified tokens, so they are never marked computed before the
        step verifies them (``BlockManager.truncate`` gives back the rejected ones)."""
        if draft is None:
            return ()
        cap = self._cap(seq)
        room = min(len(draft.tokens), budget, len(draft.tokens) if cap is None else cap - 1)
        kept: list[int] = []
        for token in draft.tokens[: max(0, room)]:
            if not self.blocks.can_append(seq.request_id):
                break
            self.blocks.append_token(seq.request_id, token)
            kept.append(token)
        return tuple(kept)

    def _cap(self, seq: Sequence) -> int | None:
        return self.plan.cap(seq.request_id)

    def _reserve_slot(self, seq: Sequence, preempt: bool = True) -> bool:
        """Gives the last sampled token a KV slot, preempting if the pool is full (unless not
        ``preempt``). False when it got none: seq itself was preempted, or sits out."""
        if self.blocks.num_tokens(seq.request_id) == len(seq.token_ids):
            return True  # re-admitted: allocate() already covered every token
        if not preempt and not self.blocks.can_append(seq.request_id):
            return False
        while not self.blocks.can_append(seq.request_id):
            victim = self._victim()
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append_token(seq.request_id, seq.token_ids[-1])
        return True

    def _victim(self) -> Sequence:
        """The newest running sequence of the lowest priority."""
        lowest = min(s.priority for s in self.running)
        return next(s for s in reversed(self.running) if s.priority == lowest)

    def _preempt(self, seq: Sequence) -> None:
        """Back to the head of its priority in the queue, so it resumes first."""
        self.release(seq)
        seq.num_computed = 0
        index = next(
            (i for i, w in enumerate(self.waiting) if w.priority <= seq.priority),
            len(self.waiting),
        )
        self.waiting.insert(index, seq)
        self.num_preemptions += 1

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
