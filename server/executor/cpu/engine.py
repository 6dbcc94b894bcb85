"""The step loop of the CPU engine: in-flight batching with chunked prefill over a paged,
prefix-cached KV pool.

Each step (1) admits waiting sequences into free slots (``Batcher.admit``), (2) drafts tokens
for the decodes the plan lets speculate (``Speculator.propose``), (3) packs every decode (a
speculating one with its drafted tokens: a verify chunk) plus prefill chunks within the token
budget and the scheduler's plan (``Batcher.schedule``), (4) runs one packed forward pass
(``ModelRunner.start``), a layer at a time, and (5) samples, keeps the drafted tokens the
target accepts (``verify.pick``), rolls back the KV slots of the rest, applies stops and frees
finished sequences (``_commit``). Every step's shape and duration is kept as a ``StepSample``
for the step-cost model.

A step is begun and finished separately (``begin_step`` / ``finish_step``) so that its driver
can run a second, small step between two of its layers: the prefill of requests that overtake
it (``begin_step(only=...)``: new sequences only, disjoint from the step in flight).

Single-threaded: the executor's worker thread owns an engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine_builder.step_cost import StepSample, StepShape
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, FinishReason, SamplingParams, StepPlan, TokenDelta
from server.executor.cpu.batcher import Batcher
from server.executor.cpu.drafter import Draft
from server.executor.cpu.logprobs import SCORE_ROWS, token_logprobs
from server.executor.cpu.model import LlamaModel
from server.executor.cpu.model_runner import ModelRunner, StepOutput, StepPass
from server.executor.cpu.sequence import Chunk, Sequence
from server.executor.cpu.speculation import Speculator
from server.executor.cpu.stops import OutputTracker
from server.executor.cpu.verify import logprob_of, pick


@dataclass(slots=True)
class EngineCounters:
    steps: int = 0
    last_step_latency_s: float = 0.0
    last_step_tokens: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    computed_tokens: int = 0  # prefill + decode tokens run through the model


@dataclass(slots=True, eq=False)
class StepRun:
    """A step begun and not finished: its chunks, its shape and its forward pass."""

    chunks: list[Chunk]
    shape: StepShape
    forward: StepPass
    seconds: float = 0.0  # its own compute time so far (not that of steps run in between)
    ids: set[int] = field(default_factory=set)  # the sequences it computes
    drafts: dict[int, Draft] = field(default_factory=dict)  # what it verifies, by request id

    @property
    def layers_done(self) -> bool:
        return self.forward.forward.done

    def advance(self) -> None:
        """Runs its next layer."""
        t0 = time.perf_counter()
        self.forward.forward.advance()
        self.seconds += time.perf_counter() - t0


class CpuEngine:
    def __init__(
        self,
        runner: ModelRunner,
        batcher: Batcher,
        tokenizer: EngineTokenizer,
        speculator: Speculator | None = None,
    ) -> None:
        self.runner = runner
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.speculator = speculator or Speculator(None, 0)
        self.counters = EngineCounters()
        self._finished: list[Sequence] = []  # finished since the last drain
        self._samples: list[StepSample] = []  # steps since the last take_step_samples

    @property
    def model(self) -> LlamaModel:
        return self.runner.model

    @property
    def running(self) -> list[Sequence]:
        return self.batcher.running

    @property
    def has_work(self) -> bool:
        """Anything waiting, running or not yet reported (paused sequences count)."""
        b = self.batcher
        return bool(b.waiting or b.running or self._finished)

    def set_plan(self, plan: StepPlan) -> None:
        self.batcher.plan = plan

    @property
    def plan(self) -> StepPlan:
        return self.batcher.plan

    # -- requests -------------------------------------------------------------------------

    def add(self, request: ExecRequest, seed: int) -> None:
        """Queues a validated request (the executor checks ids, lengths and vocabulary)."""
        context = [*request.prompt_token_ids, *request.resume_token_ids]
        tracker = OutputTracker(
            request.sampling, self.tokenizer, context, len(request.resume_token_ids)
        )
        seq = Sequence(request, seed, tracker, context)
        if tracker.reached_max_tokens:  # a resumed request that had already used its budget
            seq.end(FinishReason.LENGTH)
            self._finished.append(seq)
            return
        self.batcher.add(seq)

    def cancel(self, request_id: int) -> None:
        """Ends a waiting or running sequence with CANCELLED; unknown ids are a no-op."""
        seq = self.batcher.remove(request_id)
        if seq is not None:
            seq.end_early(FinishReason.CANCELLED)
            self._finished.append(seq)

    def knows(self, request_id: int) -> bool:
        b = self.batcher
        return any(s.request_id == request_id for s in (*b.running, *b.waiting))

    def cancel_all(
        self, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None
    ) -> None:
        """Ends every live sequence (shutdown, or an engine failure with ERROR)."""
        for seq in list(self.batcher.running):
            self.batcher.release(seq)
            seq.end_early(reason, error)
            self._finished.append(seq)
        while self.batcher.waiting:
            seq = self.batcher.waiting.popleft()
            seq.end_early(reason, error)
            self._finished.append(seq)

    def warm_up(self) -> None:
        """Runs two short requests through each kind of step (a prefill of two chunks,
        decodes of two rows and of one) and forgets them, so that the first real request does
        not pay for loading the compiled kernels, starting the BLAS threads and faulting in
        the weights (the default engine's first TTFT over gRPC: 496 ms, against 71 ms for
        the next). Their tokens stay within one KV block, so nothing enters the prefix cache;
        the counters and step samples start from zero. Call it with nothing queued."""
        if self.has_work:
            raise RuntimeError("warm_up needs an idle engine")
        prompt = tuple(range(1, 1 + max(1, self.batcher.blocks.tokens_per_block - 4)))
        for request_id, max_tokens in ((0, 3), (1, 2)):
            sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                      num_speculative_tokens=0)
            self.add(ExecRequest(request_id, prompt, sampling), seed=0)
        while self.step():
            pass
        self.drain()
        self.counters = EngineCounters()
        self.batcher.reset_counts()
        self._samples.clear()

    # -- the step -------------------------------------------------------------------------

    def step(self) -> bool:
        """Runs one iteration if anything can run; False when nothing could (all paused, or
        no work). Output waits in ``drain``."""
        run = self.begin_step()
        if run is None:
            return False
        self.finish_step(run)
        return True

    def begin_step(
        self, only: set[int] | None = None, extra_slots: int = 0, *, preempt: bool = True
    ) -> StepRun | None:
        """Admits, drafts, packs and starts a step (of just the ``only`` ids: the overtaking
        kind, which may use ``extra_slots`` that cancelled sequences give back when the step
        in flight ends); None when nothing can run. ``preempt=False``: a decode that finds no
        free KV slot sits the step out instead of preempting (a step nested in another must
        not take the blocks of a sequence the outer one computes)."""
        t0 = time.perf_counter()
        for seq in self.batcher.admit(only, extra_slots):
            seq.end(FinishReason.ERROR, "prompt does not fit the KV-cache pool")
            self._finished.append(seq)
        running = self.batcher.running
        if only is None:
            self.speculator.retain({seq.request_id for seq in running})
        members = running if only is None else [s for s in running if s.request_id in only]
        drafts, drafting = self.speculator.propose(
            members, self.batcher.plan, self.batcher.limits.max_seq_len
        )
        chunks = self.batcher.schedule(only, drafts, preempt=preempt)
        if not chunks:
            return None
        shape = StepShape()
        for chunk in chunks:
            if chunk.draft:
                shape.add_verify(chunk.start, chunk.num_tokens)
            else:
                shape.add(chunk.start, chunk.num_tokens, chunk.samples)
        run = StepRun(chunks, shape, self.runner.start(chunks), drafts=drafts)
        run.ids = {chunk.seq.request_id for chunk in chunks}
        run.seconds = time.perf_counter() - t0 - drafting
        return run

    def finish_step(self, run: StepRun) -> None:
        """Runs what is left of the step, then samples and commits its output."""
        t0 = time.perf_counter()
        output = self.runner.finish(run.forward)
        self._score_prompts(run.chunks, output)
        row = 0
        for chunk in run.chunks:
            rows = output.logits[row : row + chunk.num_sample_rows]  # [rows, vocab]
            row += len(rows)
            draft = run.drafts.get(chunk.seq.request_id) if chunk.draft else None
            self._commit(chunk, rows, None if draft is None else draft.probs)
        self._count(run.shape, run.seconds + time.perf_counter() - t0)

    def _commit(self, chunk: Chunk, rows: np.ndarray, probs: np.ndarray | None) -> None:
        """The tokens a chunk's rows give its sequence: a sampled token, or the drafted tokens
        the target keeps and one of its own. Only the K/V of kept tokens counts as computed;
        the slots of rejected ones go back to the pool."""
        seq, draft = chunk.seq, chunk.draft
        accepted, finish = 0, None
        for i, logits in enumerate(rows):
            drafted = i < len(draft)  # the last row has no drafted token to judge
            token, kept = pick(seq, logits, draft[i] if drafted else None,
                               probs[i] if drafted and probs is not None else None)
            finish = seq.append_sample(
                token, self.batcher.limits.max_seq_len, logprob_of(seq, logits, token)
            )
            self.counters.generated_tokens += 1
            accepted += kept
            if not kept or finish is not None:
                break
        blocks = self.batcher.blocks
        computed = chunk.start + chunk.num_tokens - len(draft) + accepted
        if draft:
            blocks.truncate(seq.request_id, computed)
            seq.count_verified(self.speculator.name or "", len(draft), accepted)
            self.speculator.count(len(draft), accepted)
        seq.num_computed = computed
        blocks.mark_computed(seq.request_id, computed)
        if finish is not None:
            self.batcher.release(seq)
            seq.end(finish)
            self._finished.append(seq)

    def _score_prompts(self, chunks: list[Chunk], output: StepOutput) -> None:
        """Prompt logprobs of the positions this step computed, SCORE_ROWS at a time through
        the LM head (a long prefill chunk never holds all its logits at once)."""
        row = 0
        for span in output.spans:
            seq = chunks[span.chunk].seq
            k = seq.request.sampling.prompt_logprobs
            assert seq.prompt_logprobs is not None and k is not None
            for first in range(0, span.count, SCORE_ROWS):
                count = min(SCORE_ROWS, span.count - first)
                h = output.scored[row + first : row + first + count]  # [count, hidden]
                start = span.first + first + 1  # the tokens these positions predict
                targets = np.asarray(seq.token_ids[start : start + count], dtype=np.int64)
                seq.prompt_logprobs += token_logprobs(self.runner.model.lm_head(h), targets, k)
            row += span.count

    def _count(self, shape: StepShape, latency: float) -> None:
        c = self.counters
        c.steps += 1
        c.last_step_latency_s = latency
        c.last_step_tokens = shape.tokens
        c.computed_tokens += shape.tokens
        c.busy_seconds += latency
        self._samples.append(StepSample(shape, latency))

    # -- output ---------------------------------------------------------------------------

    def drain(self) -> list[TokenDelta]:
        """One delta per sequence with new output since the last drain."""
        deltas = [seq.take_delta() for seq in self.batcher.running if seq.has_output]
        done, self._finished = self._finished, []
        return deltas + [seq.take_delta() for seq in done]

    def take_step_samples(self) -> list[StepSample]:
        samples, self._samples = self._samples, []
        return samples

    def check_integrity(self) -> None:
        self.batcher.check_integrity()
