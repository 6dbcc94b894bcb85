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
- ``PlanFollowingSimulatedExecutor`` also follows the scheduler's step plans and overtakes
  as the CPU executor does (server/planner/overtaking.py: online prefills and decodes nested
  in the step in flight, between its layers). It looks when ``wake`` is called (after each
  scheduler pass), so the overtakers of one pass share a step.
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

from engine_builder.step_cost import StepCostModel, StepSample
from server.executor.base import (
    Capacity,
    ExecRequest,
    ExecutorStats,
    FinishReason,
    StepPlan,
    TokenDelta,
    check_fits,
)
from server.planner.engine import Counters, SimEngine
from server.planner.overtaking import OvertakingSimEngine


class SimClock:
    """Virtual seconds; callable like ``time.monotonic`` so the scheduler can read it."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
        self._setup(SimEngine(capacity, model, batching=batching, jitter=jitter, seed=seed,
                              plan_follower=False), clock)

    def _setup(self, engine: SimEngine, clock: SimClock | None) -> None:
        self._engine = engine
        self._owns_clock = clock is None
        self.clock = SimClock() if clock is None else clock
        self._shut = False

    @property
    def counters(self) -> Counters:
        """Cumulative step counters (steps, busy seconds, tokens...)."""
        return self._engine.counters

    # -- the protocol ---------------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return self._engine.capacity

    def enqueue(self, request: ExecRequest) -> None:
        self._validate(request)
        self._engine.add(request)

    def cancel(self, request_id: int) -> None:
        seq = self._engine.live.get(request_id)
        if seq is None or seq.finish is not None:
            return
        self._engine.take_out(seq)
        self._engine.end(seq, FinishReason.CANCELLED)

    def poll(self, timeout: float) -> list[TokenDelta]:
        ready = self._engine.ready
        if self._owns_clock and not ready and timeout > 0 and not self._shut:
            self._run_for(timeout)
        deltas = [seq.take_delta() for seq in ready]
        ready.clear()
        return deltas

    def stats(self) -> ExecutorStats:
        e = self._engine
        c, kv = e.counters, e.kv
        return ExecutorStats(
            active=len(e.running),
            queued=len(e.waiting) + len(e.inbox),
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
            context_requests=sum(1 for s in e.running if s.num_pending > 1),
            preemptions=c.preemptions,
        )

    def take_step_samples(self) -> list[StepSample]:
        samples = list(self._engine.samples)
        self._engine.samples.clear()
        return samples

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        e = self._engine
        for seq in [*e.running, *e.waiting, *e.inbox]:
            e.take_out(seq)
            e.end(seq, FinishReason.CANCELLED)
        e.stop()

    # -- driving the clock ----------------------------------------------------------------

    @property
    def step_end(self) -> float | None:
        """When the step in flight ends (None: idle)."""
        step = self._engine.step
        return None if step is None else step.end

    @property
    def step_start(self) -> float | None:
        step = self._engine.step
        return None if step is None else step.end - step.seconds

    @property
    def num_live(self) -> int:
        """Requests enqueued and not finished: the slots a scheduler counts as running."""
        return len(self._engine.live)

    def wake(self) -> None:
        """Starts a step now if none is in flight and there is something to run."""
        if self._engine.step is None and not self._shut:
            self._engine.start_step(self.clock.now)

    def finish_step(self) -> None:
        """Ends the step in flight (the clock must have reached its end) and starts the next
        one with what was enqueued until now."""
        e = self._engine
        step = e.step
        if step is None:
            raise RuntimeError("no step in flight")
        if self.clock.now < step.end:
            raise RuntimeError(f"the clock ({self.clock.now}) is before the step's end")
        e.step = None
        e.commit(step)
        if not e.resume(step.end, step):
            e.start_step(step.end)

    def run_ahead(self, before: float) -> int:
        """Runs steps whose output no scheduler pass needs to see when it comes: while the
        step in flight is a plain decode of every running sequence that neither starts nor
        ends a stream, and the next step would start before ``before`` (the next input the
        caller knows of), the step ends and the next starts, as if the pass in between had
        nothing to do. The caller makes sure of that: the scheduler holds no request the
        executor does not. The skipped output reaches the next poll as one delta per request.
        Returns how many steps ran."""
        e, steps = self._engine, 0
        while (step := e.step) is not None and step.end < before and e.steady(step):
            e.advance_steady(step)
            steps += 1
        return steps

    def check_integrity(self) -> None:
        """Slot and KV accounting (AssertionError); for tests."""
        e = self._engine
        e.kv.check_integrity()
        assert len(e.running) <= e.capacity.max_slots, "more running than slots"
        held = sum(s.blocks for s in e.running)
        assert held == e.kv.used, f"running sequences hold {held} blocks, pool says used"
        live = [*e.running, *e.waiting, *e.inbox]
        assert {s.rid for s in live} == set(e.live), "a live id is lost"

    # -- internals ------------------------------------------------------------------------

    def _validate(self, request: ExecRequest) -> None:
        cap = self.capacity
        if self._shut:
            raise ValueError("the executor is shut down")
        if request.request_id in self._engine.live:
            raise ValueError(f"request id {request.request_id} is already live")
        check_fits(request, cap)
        ids = request.prompt_token_ids
        if min(ids) < 0 or max(ids) >= cap.vocab_size:
            raise ValueError(f"a token id is outside the vocabulary [0, {cap.vocab_size})")

    def _run_for(self, timeout: float) -> None:
        """Standalone driving: runs steps until output is ready or ``timeout`` passes."""
        deadline = self.clock.now + timeout
        self.wake()
        e = self._engine
        while not e.ready and e.step is not None and e.step.end <= deadline:
            self.clock.now = e.step.end
            self.finish_step()
        if not e.ready:
            self.clock.now = max(self.clock.now, deadline)


class PlanFollowingSimulatedExecutor(SimulatedExecutor):
    """Also follows the scheduler's step plans (``PlanFollower``) and runs the prefills of
    requests marked ``overtake`` that arrive during a step nested in it, like the CPU
    executor."""

    def __init__(
        self,
        capacity: Capacity,
        model: StepCostModel,
        *,
        clock: SimClock | None = None,
        batching: str = "inflight",
        jitter: float = 0.0,
        seed: int = 0,
        layers: int | None = None,
        head_share: float = 0.0,
    ) -> None:
        """``layers`` and ``head_share``: see OvertakingSimEngine."""
        self._overtaking = OvertakingSimEngine(capacity, model, batching=batching,
                                               jitter=jitter, seed=seed, layers=layers,
                                               head_share=head_share)
        self._setup(self._overtaking, clock)

    def set_plan(self, plan: StepPlan) -> None:
        self._engine.plan = plan

    def enqueue(self, request: ExecRequest) -> None:
        super().enqueue(request)
        if request.overtake:
            self._overtaking.pending.append(request.request_id)

    def wake(self) -> None:
        """Also runs the prefills of the overtakers enqueued since the last look in a step
        nested in the one in flight (all of them in one step, as the CPU executor's worker
        finds them together between two layers)."""
        super().wake()
        if not self._shut:
            self._overtaking.overtake(self.clock.now)
