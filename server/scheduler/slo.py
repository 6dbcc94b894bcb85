"""How much offline work rides in each step while online work is present: the TPOT budget.

Every online token waits for the step that carries it, and a step's cost grows with what it
carries, so while any online request runs or waits, the offline work in a step is bounded so
that the step-cost model predicts it within the TPOT SLO. Online work itself is never bounded
(it gets what it would get on an engine of its own); with no online work, offline fills every
step. The offline reserve is a floor that takes precedence over the SLO: the oldest
``keep_offline`` offline sequences keep their slots, compute first whenever the budget has
room, and compute at least one token every ``RESERVE_PERIOD_SLOS`` TPOT SLOs even when that
takes a step over the budget, so offline never starves. Where a step's cost grows with its
rows (a CPU: each row costs about what an online row does), a reserve that computed in every
step would add its rows to every online token's step; one that computes every few SLOs adds
them to one step in several.

With no online work, offline fills every step, but a step is still kept to several TPOT SLOs
(``IDLE_STEP_FACTOR``) by capping prefill chunks. An online request that arrives during such a
step overtakes it (its prefill, then its decodes, run in steps nested in it: the plan's
``overtake_interval_s``), but every nested step slows the step in flight and whatever it
carries. Without the cap, the prompts of every offline sequence paused while online work ran
are released together when it leaves: one step of a full token budget, seconds long on a CPU.
The cap is loose enough not to bind a steady offline load's steps (at 4 SLOs it cost 7% of
offline-only throughput on the default engine).

The result is data for the executor: a ``StepPlan`` (a token cap per offline sequence; 0 pauses
it, resident in KV) for executors that follow plans, and a number of offline rows for those
that plan their own steps (the scheduler then bounds how many offline requests they hold).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine_builder.step_cost import OnlineStepCost, StepShape
from server.executor.base import Capacity, StepPlan
from server.scheduler.live import LiveRequest
from server.scheduler.types import Tier

# Tokens per step that an offline sequence of the reserve always computes: the least that is
# progress, so the floor costs online work as little as it can.
RESERVE_TOKENS = 1


@dataclass(frozen=True, slots=True)
class SloDecision:
    """The outcome of planning one pass."""

    plan: StepPlan
    online_present: bool
    offline_rows: int | None  # offline sequences that fit in a step; None: no bound
    held_back: int  # offline sequences paused or capped below what they would compute
    predicted_s: float  # the planned step's predicted time (0 without a model)
    caps: dict[int, int] = field(default_factory=dict)  # the plan's caps, by scheduler id


class SloPlanner:
    """Fits offline work under the TPOT budget, oldest first (decodes before prefill chunks:
    a decode is a token out for a row's cost, a prefill chunk is tokens in for many).

    The budget a step is planned to is the SLO times a margin. The SLO bounds a request's mean
    time per output token, which also carries the model's prediction error and the online
    prefills that overtake steps, so steps are planned below it: the margin shrinks when an
    online request misses the TPOT SLO and creeps back while they meet it, settling where
    about one request in a hundred misses.
    """

    OVERTAKE_CONTEXT = 512  # tokens of context assumed for a nested decode's predicted time
    IDLE_STEP_FACTOR = 8.0  # a step without online work stays within this many TPOT SLOs
    MARGIN_START = 0.9
    MARGIN_MIN = 0.5
    MARGIN_MAX = 1.0
    MISS_FACTOR = 0.95  # the margin after a miss, relative
    HIT_STEP = 0.0005  # what a met request gives back (about MISS_FACTOR's share / 99)
    # A reserved offline sequence that has not computed for this many TPOT SLOs computes in
    # the next step, within the budget or not.
    RESERVE_PERIOD_SLOS = 4.0

    def __init__(self, cost: OnlineStepCost, tpot_slo_s: float, capacity: Capacity,
                 clock: Callable[[], float] = time.monotonic,
                 max_online_slowdown: float | None = None) -> None:
        if tpot_slo_s <= 0:
            raise ValueError(f"tpot_slo_s must be > 0, got {tpot_slo_s}")
        self.cost = cost
        self.tpot_slo_s = tpot_slo_s
        self.margin = self.MARGIN_START
        self._capacity = capacity
        self._clock = clock
        self.max_online_slowdown = max_online_slowdown
        self._computed_at: dict[int, float] = {}  # offline id -> when a plan last let it compute

    @property
    def reserve_period_s(self) -> float:
        """The longest a reserved offline sequence goes without computing."""
        return self.RESERVE_PERIOD_SLOS * self.tpot_slo_s

    @property
    def budget_s(self) -> float:
        """The predicted time a step with online work is planned to stay within."""
        return self.tpot_slo_s * self.margin

    @property
    def overtake_interval_s(self) -> float:
        """How old the last token of an online request that overtook a step may get before the
        executor nests a decode of it in that step (StepPlan.overtake_interval_s): what the
        slowdown bound lets offline work add to a lone decode, so that an overtaker's token
        costs about what a budgeted step's would; without that bound, the budget less the
        nested decode's own predicted time. Rounded to a millisecond, so that the plan changes
        only when this does."""
        lone = StepShape()
        lone.add_decode(self.OVERTAKE_CONTEXT)
        decode_s = self.cost.predict(lone)
        interval = self.budget_s - decode_s
        if self.max_online_slowdown is not None:
            interval = min(interval, (self.max_online_slowdown - 1.0) * decode_s)
        return round(max(0.0, interval), 3)

    def observe_tpot(self, met: bool) -> None:
        """One online request's TPOT attainment (called as each completes)."""
        if met:
            self.margin = min(self.MARGIN_MAX, self.margin + self.HIT_STEP)
        else:
            self.margin = max(self.MARGIN_MIN, self.margin * self.MISS_FACTOR)

    def decide(
        self,
        running: Iterable[LiveRequest],
        online_waiting: Iterable[LiveRequest],
        keep_offline: int,
    ) -> SloDecision:
        """Caps for the running offline sequences (in run start order), given the running
        online ones and the online requests about to be admitted."""
        running = list(running)
        online = [r for r in running if r.tier is Tier.ONLINE]
        waiting = list(online_waiting)
        if not self.cost.calibrated:
            return SloDecision(StepPlan(), False, None, 0, 0.0)
        now = self._clock()
        offline = [r for r in running if r.tier is Tier.OFFLINE]
        computed_at = {r.id: self._computed_at.get(r.id, now) for r in offline}
        if not online and not waiting:
            decision = self._idle(offline)
            self._computed_at = dict.fromkeys(computed_at, now)
            return decision
        shape = StepShape()
        budget_tokens = self._capacity.max_tokens_per_step
        for r in [*online, *waiting]:
            budget_tokens -= _add_whole(shape, r, budget_tokens)
        limit = self.budget_s
        if self.max_online_slowdown is not None:
            limit = min(limit, self.max_online_slowdown * self.cost.predict(shape))
        due = {r.id for r in offline[:keep_offline]
               if now - computed_at[r.id] >= self.reserve_period_s}
        floor = [r for r in offline if r.id in due]
        rest = [r for r in offline if r.id not in due]
        caps: dict[int, int] = {}
        for r in floor:
            if _decoding(r):
                caps[r.id] = 1
                _add(shape, r, 1)
        self._progressing_prefills(shape, [r for r in floor if not _decoding(r)], caps, limit)
        decoding = [r for r in rest if _decoding(r)]
        for r in decoding:
            trial = shape.copy()
            trial.add_decode(r.num_context_tokens)
            if self.cost.predict(trial) <= limit:
                shape = trial
                caps[r.id] = 1
            else:
                caps[r.id] = 0
        for r in rest:
            if not _decoding(r):
                n = self._largest_chunk(shape, r, limit)
                caps[r.id] = n
                if n:
                    _add(shape, r, n)
        held = sum(1 for r in rest if caps[r.id] < _pending(r))
        plan = StepPlan({r.exec_id: caps[r.id] for r in offline if r.exec_id is not None})
        self._computed_at = {r.id: now if caps[r.id] > 0 else computed_at[r.id]
                             for r in offline}
        # An executor that plans its own steps cannot pause: it runs every offline request
        # it holds, so the reserve counts in full.
        rows = min(len(offline), keep_offline) + sum(
            1 for r in offline[keep_offline:] if caps[r.id] > 0)
        predicted = self.cost.predict(shape)
        context = sum(r.num_context_tokens for r in offline) // len(offline) if offline else 64
        rows += self._more_decodes(shape, context, limit)
        return SloDecision(plan, True, rows, held, predicted, caps)

    def _idle(self, offline: list[LiveRequest]) -> SloDecision:
        """No online work: every offline decode runs, and prefill chunks (oldest first) take
        what is left of IDLE_STEP_FACTOR TPOT SLOs, one token each at the least."""
        shape = StepShape()
        for r in offline:
            if _decoding(r):
                shape.add_decode(r.num_context_tokens)
        limit = self.IDLE_STEP_FACTOR * self.tpot_slo_s
        caps: dict[int, int] = {}
        self._progressing_prefills(shape, [r for r in offline if not _decoding(r)], caps, limit)
        held = sum(1 for r in offline if r.id in caps and caps[r.id] < _pending(r))
        plan = StepPlan({r.exec_id: caps[r.id] for r in offline
                         if r.id in caps and r.exec_id is not None})
        return SloDecision(plan, False, None, held, self.cost.predict(shape), caps)

    def _progressing_prefills(
        self,
        shape: StepShape,
        prefills: list[LiveRequest],
        caps: dict[int, int],
        limit: float,
    ) -> None:
        """Caps for prefills that must progress: a token each at the least, and, oldest
        first, the largest chunk that keeps the step within ``limit`` seconds while leaving
        each later one its token. Adds them to ``shape`` and ``caps``."""
        undecided = list(prefills)
        while undecided:
            r = undecided.pop(0)
            others = shape.copy()
            for later in undecided:
                _add(others, later, RESERVE_TOKENS)
            caps[r.id] = max(RESERVE_TOKENS, self._largest_chunk(others, r, limit))
            _add(shape, r, caps[r.id])

    def _more_decodes(self, shape: StepShape, context: int, limit: float) -> int:
        """How many more offline decodes of ``context`` tokens would still fit: the room an
        executor that plans its own steps may fill with new offline requests. A binary
        search (a step's predicted cost never falls as it carries more): this runs every pass
        while online work is present, over up to all the slots."""
        lo, hi = 0, self._capacity.max_slots
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = shape.copy()
            trial.add_decodes(context, mid)
            if self.cost.predict(trial) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _largest_chunk(self, shape: StepShape, r: LiveRequest, limit: float) -> int:
        """The most prompt tokens of r that keep the step within ``limit`` seconds; 0 if
        none."""
        lo, hi = 0, min(_pending(r), self._capacity.max_tokens_per_step)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = shape.copy()
            _add(trial, r, mid)
            if self.cost.predict(trial) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def reserve_cost_s(self, keep_offline: int, context: int) -> float:
        """What the reserve adds to a one-online-decode step that it takes over the budget,
        at worst (its sequences all prefilling), for the start-up message."""
        base = StepShape()
        base.add_decode(context)
        with_reserve = base.copy()
        for _ in range(keep_offline):
            with_reserve.add_prefill(0, RESERVE_TOKENS, False)
        return self.cost.predict(with_reserve) - self.cost.predict(base)


def _decoding(r: LiveRequest) -> bool:
    """The run has streamed a token, so the executor has its whole context in KV."""
    return r.run_tokens > 0


def _pending(r: LiveRequest) -> int:
    """Tokens the next step could compute for r: one for a decode; for a prefill, its whole
    context (the scheduler cannot see how much of it is cached or already computed, so this
    is an upper bound)."""
    return 1 if _decoding(r) else r.num_context_tokens


def _add(shape: StepShape, r: LiveRequest, n: int) -> None:
    if _decoding(r):
        shape.add_decode(r.num_context_tokens)
    else:
        shape.add_prefill(0, n, n >= r.num_context_tokens)


def _add_whole(shape: StepShape, r: LiveRequest, budget_tokens: int) -> int:
    """Adds all a request would compute in a step (within the step's tokens); returns it."""
    n = min(_pending(r), max(1, budget_tokens))
    _add(shape, r, n)
    return n
