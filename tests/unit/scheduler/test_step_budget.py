"""The step budget (server/scheduler/slo.py): while online work is present, offline work per
step is bounded so the predicted step stays within the TPOT SLO; the reserve is a floor."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_builder.step_cost import FEATURES, LinearStepCost, OnlineStepCost, StepShape
from server.executor.base import SamplingParams
from server.scheduler import BackfillScheduler, Outcome, SchedRequest, SchedulerConfig, Tier
from server.scheduler.live import LiveRequest
from server.scheduler.slo import RESERVE_TOKENS, SloPlanner
from tests.fakes import PlannedScriptedExecutor, ScriptedExecutor
from tests.unit.scheduler.helpers import FakeClock, Recorder, Shape, offline, online

pytestmark = pytest.mark.unit

# 10 ms a step plus 5 ms a token: easy arithmetic for budgets.
COST = LinearStepCost(0.010, [0.005 if name == "tokens" else 0.0 for name in FEATURES])
SHAPE = Shape(slots=16, kv_blocks=1024, tokens_per_block=4, max_tokens_per_step=256,
              max_seq_len=128)


def scheduler(
    executor: ScriptedExecutor, tpot_ms: float, reserve: float = 0.1, **config: object
) -> tuple[BackfillScheduler, Recorder, FakeClock]:
    clock = FakeClock()
    config.setdefault("max_online_slowdown", None)  # the SLO's arithmetic alone, unless given
    sched = BackfillScheduler(
        executor,
        SchedulerConfig(offline_reserve=reserve, tpot_slo_ms=tpot_ms, **config),  # type: ignore[arg-type]
        clock=clock,
        step_cost=OnlineStepCost(COST),
    )
    assert sched.planner is not None
    sched.planner.margin = 1.0  # plan to the SLO itself: round numbers below
    return sched, Recorder(), clock


def offline_computing(executor: ScriptedExecutor, offline_ids: set[int]) -> int:
    return sum(1 for rid in executor.step_log[-1].computed if rid in offline_ids)


def exec_ids(executor: ScriptedExecutor, prompts: set[tuple[int, ...]]) -> set[int]:
    return {r.request_id for r in executor.enqueued if r.prompt_token_ids in prompts}


def test_offline_fills_every_step_while_no_online_work_is_present() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=50)
    for i in range(12):
        sched.submit(offline((100 + i, 1), max_tokens=40), rec)
    for _ in range(4):
        sched.run_pass()
    assert len(ex.step_log[-1].computed) == 12
    assert not sched.snapshot().step_budget.online_present  # type: ignore[union-attr]


def test_an_online_request_bounds_the_offline_rows_of_each_step() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=50)  # 10 ms + 5 ms a token: 8 tokens a step
    offline_prompts = {(100 + i, 1) for i in range(12)}
    for prompt in offline_prompts:
        sched.submit(offline(prompt, max_tokens=60), rec)
    for _ in range(4):
        sched.run_pass()
    rid = sched.submit(online((7, 7), max_tokens=20), rec)
    sched.run_pass()  # admits it, plans
    sched.run_pass()  # its prefill step: 2 tokens, so 6 offline rows fit
    offline_ids = exec_ids(ex, offline_prompts)
    assert offline_computing(ex, offline_ids) == 6
    for _ in range(5):
        sched.run_pass()  # it decodes: 1 token, so 7 offline rows fit
        assert offline_computing(ex, offline_ids) == 7
        assert COST.predict(ex.step_log[-1].shape) <= 0.050 + 1e-9
    budget = sched.snapshot().step_budget
    assert budget is not None and budget.online_present and budget.offline_held_back == 5
    while not rec.finals(rid):
        sched.run_pass()
    sched.run_pass()
    sched.run_pass()  # the plan that lifts the bound reached the executor
    assert offline_computing(ex, offline_ids) == 12
    assert rec.final(rid).outcome is Outcome.LENGTH
    assert len(rec.tokens(rid)) == 20


@pytest.mark.parametrize(("slowdown", "rows"), [(None, 7), (1.7, 2), (1.5, 1), (1.0, 0)])
def test_the_slowdown_bound_keeps_a_step_near_its_online_work_alone(
    slowdown: float | None, rows: int
) -> None:
    """An online decode alone: 10 + 5 ms. Within a 50 ms SLO 7 offline rows fit; at most
    1.7x its cost (25.5 ms) 2 fit, at 1.5x (22.5 ms) 1, at 1x none."""
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=50, reserve=0.0, max_online_slowdown=slowdown)
    offline_prompts = {(100 + i, 1) for i in range(12)}
    for prompt in offline_prompts:
        sched.submit(offline(prompt, max_tokens=60), rec)
    for _ in range(4):
        sched.run_pass()
    sched.submit(online((7, 7), max_tokens=20), rec)
    for _ in range(6):
        sched.run_pass()
    assert offline_computing(ex, exec_ids(ex, offline_prompts)) == rows


def test_the_slowdown_bound_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_online_slowdown"):
        SchedulerConfig(tpot_slo_ms=50, max_online_slowdown=0.9)


def test_paused_offline_streams_continue_exactly() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=30)
    ids = [sched.submit(offline((200 + i, 3), max_tokens=25), rec) for i in range(10)]
    for _ in range(3):
        sched.run_pass()
    ids.append(sched.submit(online((9, 9), max_tokens=30), rec))
    for _ in range(400):
        if all(rec.finals(i) for i in ids):
            break
        sched.run_pass()
    for rid in ids:
        final = rec.final(rid)
        assert final.outcome is Outcome.LENGTH
    prompts = [(200 + i, 3) for i in range(10)] + [(9, 9)]
    for rid, prompt in zip(ids, prompts, strict=True):
        expected, _ = ex.expected_output(prompt, SamplingParams(max_tokens=len(rec.tokens(rid))))
        assert rec.tokens(rid) == expected
    assert sched.snapshot().offline.preemptions == 0  # paused, never recomputed


def test_the_reserve_progresses_every_few_slos_even_when_online_work_fills_the_budget() -> None:
    """Online work alone over budget: offline sits steps out, but the reserve's sequences
    compute a token each once RESERVE_PERIOD_SLOS TPOT SLOs (4 x 20 ms) have passed since
    they last did, then sit out again."""
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, clock = scheduler(ex, tpot_ms=20, reserve=0.25)  # 4 of 16 slots
    offline_prompts = {(300 + i, 1) for i in range(10)}
    for prompt in offline_prompts:
        sched.submit(offline(prompt, max_tokens=60), rec)
    for _ in range(3):
        sched.run_pass()
    offline_ids = exec_ids(ex, offline_prompts)
    for prompt in ((1, 2), (3, 4)):  # two online decodes: 10 + 2 x 5 ms, the whole budget
        sched.submit(online(prompt, max_tokens=40), rec)
    computing = []
    for _ in range(12):
        sched.run_pass()
        computing.append(offline_computing(ex, offline_ids))
        clock.advance(0.030)
    # Offline last computed in the first pass's step (no online work yet); the plan a pass
    # makes reaches the step after it: due at 90 ms (>= 80), computing in the fourth step
    # after, and every third step from then on.
    assert computing[1:] == [0, 0, 0, 4, 0, 0, 4, 0, 0, 4, 0], computing


def test_offline_prefill_gets_the_largest_chunk_that_fits() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=62, reserve=0.0)
    sched.submit(online((5, 5), max_tokens=50), rec)
    for _ in range(3):
        sched.run_pass()
    sched.submit(offline(tuple(range(1, 60)), max_tokens=5), rec)
    sched.run_pass()
    sched.run_pass()
    # 10 ms + 5 ms x (1 online decode + n) <= 62 ms: n = 9 prompt tokens a step.
    assert ex.step_log[-1].tokens == 1 + 9


def test_without_online_work_a_step_stays_within_a_few_slos() -> None:
    """IDLE_STEP_FACTOR (8) x 20 ms: 160 ms. Three offline decodes (25 ms) leave 135 ms: 27
    prompt tokens of the newcomer a step; the decodes are never capped."""
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=20, reserve=0.0)
    for i in range(3):
        sched.submit(offline((7, i), max_tokens=50), rec)
    for _ in range(3):
        sched.run_pass()
    sched.submit(offline(tuple(range(1, 100)), max_tokens=5), rec)
    sched.run_pass()
    sched.run_pass()
    assert SloPlanner.IDLE_STEP_FACTOR == 8.0
    assert ex.step_log[-1].tokens == 3 + 27
    assert not sched.snapshot().step_budget.online_present  # type: ignore[union-attr]


def test_an_executor_that_plans_its_own_steps_is_bounded_by_admission() -> None:
    ex = ScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=50, reserve=0.1)
    rid = sched.submit(online((5, 5), max_tokens=20), rec)
    for _ in range(3):
        sched.run_pass()
    for i in range(14):
        sched.submit(offline((400 + i, 1), max_tokens=100), rec)
    for _ in range(4):
        sched.run_pass()
        assert sched.snapshot().offline.running <= 7  # 10 + 5 x (1 + 7) = 50 ms
    assert sched.snapshot().offline.running == 7
    while not rec.finals(rid):
        sched.run_pass()
    for _ in range(3):
        sched.run_pass()
    assert sched.snapshot().offline.running > 7  # no online work: offline fills the slots


def test_without_a_tpot_slo_nothing_is_bounded() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched = BackfillScheduler(ex, SchedulerConfig(), step_cost=OnlineStepCost(COST))
    rec = Recorder()
    sched.submit(online((5, 5), max_tokens=50), rec)
    for i in range(12):
        sched.submit(offline((500 + i, 1), max_tokens=40), rec)
    for _ in range(4):
        sched.run_pass()
    assert len(ex.step_log[-1].computed) == 13
    assert sched.planner is None


def test_slo_attainment_is_counted_per_tier() -> None:
    ex = ScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    clock = FakeClock()
    sched = BackfillScheduler(ex, SchedulerConfig(tpot_slo_ms=100, ttft_slo_ms=500), clock=clock)
    rec = Recorder()
    fast = sched.submit(online((1, 2), max_tokens=3), rec)
    for _ in range(6):
        clock.advance(0.05)
        sched.run_pass()
    slow = sched.submit(online((3, 4), max_tokens=3), rec)
    clock.advance(0.6)  # misses the TTFT SLO
    for _ in range(6):
        clock.advance(0.3)  # and the TPOT SLO
        sched.run_pass()
    assert rec.final(fast).outcome is Outcome.LENGTH and rec.final(slow).outcome is Outcome.LENGTH
    t = sched.snapshot().online
    assert (t.slo_judged, t.ttft_met, t.tpot_met, t.both_met) == (2, 1, 1, 1)


def test_the_scheduler_learns_step_costs_from_the_executor() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched = BackfillScheduler(ex, SchedulerConfig(tpot_slo_ms=50))  # no prior model
    rec = Recorder()
    assert not sched.step_cost.calibrated
    for i in range(60):
        sched.submit(offline((600 + i, 1, 2, 3, i % 5), max_tokens=4 + i % 7), rec)
        sched.run_pass()
    assert sched.step_cost.calibrated and sched.step_cost.observed_steps > 14
    shape = StepShape()
    for _ in range(5):
        shape.add_decode(12)
    assert sched.step_cost.predict(shape) == pytest.approx(COST.predict(shape), rel=0.05)
    budget = sched.snapshot().step_budget
    assert budget is not None and budget.prediction_error < 0.05


# -- the planner alone, on random running sets ------------------------------------------------


def _live(rid: int, tier: Tier, context: int, decoding: bool) -> LiveRequest:
    request = SchedRequest(tuple(range(1, context + 1)), SamplingParams(), tier)
    seq = LiveRequest(rid, request, Recorder(), arrival=0.0)
    seq.exec_id = 1000 + rid
    seq.run_tokens = 1 if decoding else 0
    return seq


entries = st.lists(
    st.tuples(st.sampled_from(Tier), st.integers(1, 120), st.booleans()), max_size=20
)


def _check_idle(planner: SloPlanner, offline: list[LiveRequest], caps: dict[int, int]) -> None:
    """No online work: decodes run uncapped; every prefill progresses, and beyond one token
    each the step stays within IDLE_STEP_FACTOR SLOs."""
    assert set(caps) == {s.exec_id for s in offline if not s.run_tokens}
    assert all(n >= RESERVE_TOKENS for n in caps.values())
    shape, base = StepShape(), StepShape()
    for s in offline:
        if s.run_tokens:
            shape.add_decode(s.num_context_tokens)
            base.add_decode(s.num_context_tokens)
        else:
            n = caps[s.exec_id]
            shape.add_prefill(0, n, n >= s.num_context_tokens)
            base.add_prefill(0, RESERVE_TOKENS, s.num_context_tokens <= RESERVE_TOKENS)
    limit = SloPlanner.IDLE_STEP_FACTOR * planner.tpot_slo_s
    if COST.predict(shape) > limit + 1e-12:
        assert COST.predict(base) > limit - 1e-12


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(running=entries, slo_ms=st.sampled_from([15.0, 40.0, 100.0, 400.0]),
       keep=st.integers(0, 4), margin=st.sampled_from([0.5, 0.9, 1.0]),
       reserve_due=st.booleans(), slowdown=st.sampled_from([None, 1.0, 1.3]))
def test_every_planned_step_respects_the_budget_or_only_the_floor_exceeds_it(
    running: list[tuple[Tier, int, bool]], slo_ms: float, keep: int, margin: float,
    reserve_due: bool, slowdown: float | None,
) -> None:
    """The floor (the reserve's sequences that have not computed for RESERVE_PERIOD_SLOS)
    always progresses; a step goes over the budget only when online work and the floor's
    minimum alone would."""
    clock = FakeClock()
    planner = SloPlanner(OnlineStepCost(COST), slo_ms / 1000, SHAPE.capacity(), clock,
                         slowdown)
    planner.margin = margin
    seqs = [_live(i, *entry) for i, entry in enumerate(running)]
    planner.decide(seqs, [], keep)  # when the planner first sees them
    clock.advance(planner.reserve_period_s if reserve_due else planner.reserve_period_s / 2)
    decision = planner.decide(seqs, [], keep)
    online_seqs = [s for s in seqs if s.tier is Tier.ONLINE]
    offline_seqs = [s for s in seqs if s.tier is Tier.OFFLINE]
    if not online_seqs:
        _check_idle(planner, offline_seqs, decision.plan.token_caps)
        assert not decision.online_present
        return
    caps = decision.plan.token_caps
    assert all(s.exec_id not in caps for s in online_seqs)  # online work is never bounded
    assert set(caps) == {s.exec_id for s in offline_seqs}
    floor = offline_seqs[:keep] if reserve_due else []
    for s in floor:
        assert caps[s.exec_id] >= RESERVE_TOKENS  # the reserve progresses when due
    # Rebuild the planned step from the caps, independently of the planner; ``base`` is what
    # online work and the floor's minimum alone cost.
    shape, base, alone = StepShape(), StepShape(), StepShape()
    budget = SHAPE.max_tokens_per_step
    for s in online_seqs:
        n = 1 if s.run_tokens else min(s.num_context_tokens, max(1, budget))
        budget -= n
        for target in (shape, base, alone):
            target.add(0, n, True) if n > 1 else target.add_decode(s.num_context_tokens)
    for s in offline_seqs:
        n = caps[s.exec_id]
        for target, tokens in ((shape, n), (base, RESERVE_TOKENS if s in floor else 0)):
            if not tokens:
                continue
            if s.run_tokens:
                target.add_decode(s.num_context_tokens)
            else:
                target.add_prefill(0, tokens, tokens >= s.num_context_tokens)
    budget = planner.budget_s
    assert budget <= slo_ms / 1000
    if slowdown is not None:
        budget = min(budget, slowdown * COST.predict(alone))
    if COST.predict(shape) > budget + 1e-12:
        # Over budget only when online work plus the floor alone already is, and then
        # nothing beyond the floor runs.
        assert COST.predict(base) > budget - 1e-12
        assert all(caps[s.exec_id] == 0 for s in offline_seqs if s not in floor)


@pytest.mark.parametrize("policy", ["backfill", "fcfs"])
def test_online_requests_may_overtake_a_step_in_flight_under_backfill(policy: str) -> None:
    ex = ScriptedExecutor(SHAPE.capacity())
    sched = BackfillScheduler(ex, SchedulerConfig(policy=policy))
    rec = Recorder()
    sched.submit(online((1, 2)), rec)
    sched.submit(offline((3, 4)), rec)
    sched.run_pass()
    flags = {r.prompt_token_ids: r.overtake for r in ex.enqueued}
    assert flags == {(1, 2): policy == "backfill", (3, 4): False}


@pytest.mark.parametrize("policy", ["backfill", "fcfs"])
def test_the_plan_tells_how_often_an_overtaking_request_gets_a_token(policy: str) -> None:
    """Under backfill, in steps planned without online work (only those outlast an online
    token): the budget less a nested lone decode's predicted time (50 ms SLO, 10 ms a step,
    5 ms a token: 35 ms), following the margin; none where nothing overtakes."""
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=50, policy=policy)
    sched.submit(offline((5, 6), max_tokens=40), rec)
    sched.run_pass()
    assert sched.planner is not None
    sched.planner.margin = 0.8  # 40 ms: 25 ms
    sched.run_pass()
    sched.submit(online((7, 8), max_tokens=40), rec)
    sched.run_pass()
    intervals = [plan.overtake_interval_s for plan in ex.plans]
    if policy == "backfill":
        assert intervals[:2] == [0.035, 0.025] and intervals[2:] and intervals[-1] is None
    else:
        assert intervals == [None] * len(ex.plans)


def test_with_a_slowdown_bound_an_overtaker_gets_a_token_about_as_often_as_in_a_budgeted_step(
) -> None:
    """With max_online_slowdown 1.2, an overtaker's decode (15 ms predicted: 10 ms a step, 5 a
    token) waits at most 0.2 x 15 = 3 ms of the step it overtook, not the budget's 35 ms: the
    same bound a step with online work is planned to, whatever the step in flight costs. The
    budget still caps it: at 1.2 with a 16 ms SLO, 1 ms."""
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    sched, rec, _ = scheduler(ex, tpot_ms=50, max_online_slowdown=1.2)
    sched.submit(offline((5, 6), max_tokens=40), rec)
    sched.run_pass()
    assert ex.plans[-1].overtake_interval_s == 0.003
    assert sched.planner is not None
    sched.planner.max_online_slowdown = 3.0  # 30 ms, under the budget's 35
    assert sched.planner.overtake_interval_s == 0.030
    sched.planner.tpot_slo_s = 0.016
    assert sched.planner.overtake_interval_s == 0.001


def test_the_margin_follows_tpot_attainment() -> None:
    planner = SloPlanner(OnlineStepCost(COST), 0.100, SHAPE.capacity())
    assert planner.budget_s == pytest.approx(0.090)  # planned below the SLO from the start
    planner.observe_tpot(False)
    assert planner.budget_s == pytest.approx(0.0855)  # a miss: 5% less
    for _ in range(99):
        planner.observe_tpot(True)
    assert planner.budget_s == pytest.approx(0.0855 + 99 * 0.00005)  # 99 hits give most back
    for _ in range(100):
        planner.observe_tpot(False)
    assert planner.margin == SloPlanner.MARGIN_MIN
    for _ in range(10_000):
        planner.observe_tpot(True)
    assert planner.margin == SloPlanner.MARGIN_MAX


def test_online_tpot_misses_tighten_the_budget_of_the_next_steps() -> None:
    ex = PlannedScriptedExecutor(SHAPE.capacity(), step_cost=COST)
    clock = FakeClock()
    sched = BackfillScheduler(ex, SchedulerConfig(tpot_slo_ms=50.0), clock=clock,
                              step_cost=OnlineStepCost(COST))
    rec = Recorder()
    assert sched.planner is not None
    before = sched.planner.budget_s
    rid = sched.submit(online((1, 2), max_tokens=4), rec)
    while not rec.finals(rid):
        clock.advance(0.2)  # every token far slower than 50 ms
        sched.run_pass()
    assert sched.planner.budget_s < before
    budget = sched.snapshot().step_budget
    assert budget is not None and budget.step_budget_ms == pytest.approx(
        1000 * sched.planner.budget_s)
