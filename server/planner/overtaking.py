"""The simulated CPU engine's overtaking: what the CPU executor's worker does between two layers
of the step it runs (server/executor/cpu/executor.py), on the virtual clock.

An online request marked ``overtake`` that arrives while a step runs does not wait for it. The
executor looks between two of the step's layers, in this order: the overtakers that came since
it last looked prefill together, in one step nested in the one in flight; then, in the same
gap, every overtaker decodes in one nested step if one's last token is the plan's overtake
interval old (never preempting); then the next layer runs. A nested step is never itself
interrupted, so overtakers that come during one wait for the next layer's end. After the last
layer a step runs the LM head over its sampled rows in one go: overtakers that come then are
in the next step, as any other request. ``layers`` splits a step's time before that tail
evenly (None: the executor looks at any moment); ``head_share`` sizes the tail.
"""

from __future__ import annotations

import math

from engine_builder.step_cost import StepCostModel, StepShape
from server.executor.base import Capacity
from server.planner.engine import SimEngine, SimSequence, SimStep


class OvertakingSimEngine(SimEngine):
    """A plan-following engine (the CPU executor's kind) whose overtakers nest steps in the
    one in flight."""

    def __init__(self, capacity: Capacity, model: StepCostModel, *, batching: str,
                 jitter: float, seed: int, layers: int | None = None,
                 head_share: float = 0.0) -> None:
        super().__init__(capacity, model, batching=batching, jitter=jitter, seed=seed,
                         plan_follower=True)
        if layers is not None and layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if not 0.0 <= head_share < 1.0:
            raise ValueError(f"head_share must be in [0, 1), got {head_share}")
        self._layers = layers
        # The tail after the last layer: that share of a decode of the sampled rows (the
        # LM head's share of the weights), by number of sampled rows.
        self._head_share = head_share if layers is not None else 0.0
        self._tails: dict[int, float] = {}
        self.overtakers: list[SimSequence] = []  # of the outer step in flight
        self.pending: list[int] = []  # ids marked overtake, enqueued since the last look

    def start_step(self, now: float) -> None:
        self.pending.clear()  # they are in the step that starts: a step of their own
        super().start_step(now)

    def stop(self) -> None:
        super().stop()
        self.pending.clear()
        self.overtakers.clear()

    def _tail(self, shape: StepShape, seconds: float) -> float:
        """Seconds of a step after its last layer: the LM head over its sampled rows."""
        if not self._head_share or not shape.samples:
            return 0.0
        tail = self._tails.get(shape.samples)
        if tail is None:
            head = StepShape()
            head.add_decodes(0, shape.samples)
            tail = self._tails[shape.samples] = self._head_share * self._model.predict(head)
        return min(tail, seconds)

    def overtake(self, now: float) -> None:
        """The CPU executor's overtaking, as it looks between two layers of the step in
        flight: every request marked overtake that came since it last looked has its prefill
        run when the layer in flight ends, all of them in one step nested in that one, which
        ends that much later (``resume``). Those that come before that nested step begins
        join it; those that come while it runs wait for it to end, then nest together. A
        request without a free slot and its blocks now waits for the next step as any
        other."""
        if self.step is None or self._static or not self.pending:
            return
        if self.suspended is None:
            left = self.step.end - now
            wait = self._look_in(self.step, left)
            if wait is not None:  # else: they are in the next step
                self._nest_prefills(now, self.step, left, wait=wait)
            return
        outer, left = self.suspended
        start = self.step.end - self.step.seconds
        if now < start:  # a nested step planned, not begun: the outer step runs until then
            joined = self.step.chunks if self.step.nested_prefills else []
            self._nest_prefills(now, outer, left + start - now, joined, wait=start - now)

    def _nest_prefills(self, now: float, outer: SimStep, left: float,
                       joined: list[tuple[SimSequence, int]] | None = None, *,
                       wait: float) -> bool:
        """One step of ``joined`` (prefills already admitted to nest) and the pending
        overtakers' prefills (in the order they came, within the slots, blocks and token
        budget) nested in ``outer``, which has ``left`` seconds to go at ``now``, after
        ``wait`` seconds; False when none could run."""
        pending, self.pending = set(self.pending), []
        chunks = list(joined or [])
        budget = self.capacity.max_tokens_per_step - sum(n for _, n in chunks)
        for seq in [s for s in self.inbox if s.rid in pending]:
            if len(self.running) >= self.capacity.max_slots:
                break
            cached = self.kv.admit(seq.tokens, self.kv.blocks_for(len(seq.tokens)))
            if cached is None:
                break
            self.inbox.remove(seq)
            self._run(seq, cached)
            n = min(seq.num_pending, budget)
            if n:  # admitted without room in this step: the next one prefills it
                chunks.append((seq, n))
                self.overtakers.append(seq)
                budget -= n
        if not chunks:
            return False
        self._nest(now, outer, left, wait, chunks, prefills=True)
        return True

    def _look_in(self, outer: SimStep, left: float, *, next_layer: bool = False,
                 not_before: float = 0.0) -> float | None:
        """Seconds until the executor next looks for overtakers in ``outer``, which has
        ``left`` seconds to go: the end of its layer in flight (``next_layer``: at a layer's
        end now, the end of the next one), at least ``not_before`` seconds away; None when
        it will not look again (its last layer is done, or ends too soon). Its layers take
        equal shares of what precedes its tail; the executor also looks after the last."""
        if self._layers is None:
            return max(0.0, not_before)
        layer = (outer.seconds - outer.tail) / self._layers
        if layer <= 0.0:
            return None
        elapsed = outer.seconds - left
        first = round(elapsed / layer) + 1 if next_layer else math.ceil(elapsed / layer - 1e-9)
        k = max(first, math.ceil((elapsed + not_before) / layer - 1e-9))
        return None if k > self._layers else max(0.0, k * layer - elapsed)

    def resume(self, now: float, ended: SimStep) -> bool:
        """After a nested step ``ended`` at ``now``, what the CPU executor does between two
        layers of the step it interrupted: after the overtakers' prefills, their decode at
        once if one's last token is the plan's overtake interval old; otherwise the next
        layer of the interrupted step, then the prefills of overtakers that came meanwhile,
        or the overtakers' decode at the first layer's end where one is an interval old
        (never preempting); otherwise the step goes on for what it had left. False when
        none was interrupted."""
        if self.suspended is None:
            self.overtakers.clear()
            self.pending.clear()
            return False
        step, left = self.suspended
        self.suspended = None
        interval = step.overtake_interval_s
        due = interval is not None and ended.nested_prefills and self._decode_due(now, interval)
        if due and self._nest_decodes(now, step, left, 0.0):
            return True
        look = self._look_in(step, left, next_layer=True)
        if self.pending and look is not None and self._nest_prefills(now, step, left, wait=look):
            return True
        if interval is not None and (oldest := self._oldest_token()) is not None:
            wait = self._look_in(step, left, next_layer=True, not_before=oldest + interval - now)
            if wait is not None and self._nest_decodes(now, step, left, wait):
                return True
        step.end = now + left
        self.step = step
        return True

    def _live_overtakers(self) -> list[SimSequence]:
        return [seq for seq in self.overtakers if seq.finish is None and seq.num_pending == 1]

    def _decode_due(self, now: float, interval: float) -> bool:
        return any(now - seq.token_s >= interval for seq in self._live_overtakers())

    def _oldest_token(self) -> float | None:
        """When the overtaker waiting longest for its next token got its last one."""
        return min((seq.token_s for seq in self._live_overtakers()), default=None)

    def _nest_decodes(self, now: float, outer: SimStep, left: float, wait: float) -> bool:
        """A decode of the overtakers nested in ``outer`` (``left`` seconds to go) after
        ``wait`` seconds; False when none can run."""
        chunks = self._nested_decodes()
        if not chunks:
            return False
        self._nest(now, outer, left, wait, chunks, prefills=False)
        return True

    def _nested_decodes(self) -> list[tuple[SimSequence, int]]:
        return [(seq, 1) for seq in self._live_overtakers()
                if seq.blocks and self._reserve_slot(seq, preempt=False)]

    def _nest(self, now: float, outer: SimStep, left: float, wait: float,
              chunks: list[tuple[SimSequence, int]], *, prefills: bool) -> None:
        """Suspends ``outer`` (``left`` seconds to go at ``now``) for a step of ``chunks``
        that begins ``wait`` seconds from now."""
        shape = self._shape(chunks)
        seconds = self._seconds(shape)
        self.suspended = (outer, left - wait)
        self.step = SimStep(now + wait + seconds, seconds, shape, chunks, nested_prefills=prefills)
