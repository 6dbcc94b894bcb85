"""The speculation policy (server/scheduler/speculation.py): online requests speculate when the
step-cost model predicts a gain at the current batch, offline ones never; a request's own
``num_speculative_tokens`` wins; the plan carries the draft lengths down to the executor."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from engine_builder.step_cost import FEATURES, LinearStepCost, OnlineStepCost, StepShape
from server.executor.base import DrafterStats, SamplingParams
from server.scheduler import BackfillScheduler, SchedRequest, SchedulerConfig, Tier
from server.scheduler.live import LiveRequest, Phase
from server.scheduler.slo import SloPlanner
from server.scheduler.speculation import SpeculationPolicy
from tests.fakes import PlannedScriptedExecutor
from tests.unit.scheduler.helpers import Recorder, Shape

pytestmark = pytest.mark.unit

# A memory-bound step: 40 ms to stream the weights, 2 ms a token.
COST = LinearStepCost(0.040, [0.002 if name == "tokens" else 0.0 for name in FEATURES])
CAPACITY = replace(Shape(slots=32, kv_blocks=4096, max_seq_len=512).capacity(),
                   max_draft_len=4, drafter="ngram")


def policy(mode: str = "auto", tpot_slo_s: float | None = None,
           cost: LinearStepCost | None = COST) -> SpeculationPolicy:
    return SpeculationPolicy(OnlineStepCost(cost), CAPACITY, mode, tpot_slo_s)


def live(rid: int, tier: Tier, *, decoding: bool = True, k: int | None = None,
         proposed: int = 0, accepted: int = 0) -> LiveRequest:
    request = SchedRequest((1,) * 20, SamplingParams(num_speculative_tokens=k), tier)
    r = LiveRequest(rid, request, lambda _: None, arrival=0.0, phase=Phase.RUNNING,
                    exec_id=100 + rid, run_tokens=3 if decoding else 0)
    r.tokens = [2, 3, 4] if decoding else []
    r.draft_proposed, r.draft_accepted = proposed, accepted
    return r


def test_an_online_request_alone_speculates() -> None:
    # At the prior acceptance of 1/2, k drafts yield 2 - 2^-k tokens in 42 + 2k ms: k = 3 is
    # the best rate (1.875 tokens in 48 ms, against 1 in 42).
    assert policy().decide([live(1, Tier.ONLINE)], {}, None) == {101: 3}


def test_a_prefilling_online_request_gets_its_length_before_its_first_decode() -> None:
    assert policy().decide([live(1, Tier.ONLINE, decoding=False)], {}, None) == {101: 3}


def test_offline_requests_never_speculate_by_default() -> None:
    assert policy().decide([live(1, Tier.OFFLINE)], {}, None) == {}


def test_a_large_batch_turns_it_off() -> None:
    """16 offline decodes beside it: the verify rows would cost more than they yield."""
    running = [live(1, Tier.ONLINE), *(live(i, Tier.OFFLINE) for i in range(2, 18))]
    assert policy().decide(running, {}, None) == {}
    # Paused offline rows do not count: the step is small again.
    paused = {r.id: 0 for r in running[1:]}
    assert policy().decide(running, paused, None) == {101: 3}


def test_a_poor_acceptance_record_turns_it_off() -> None:
    assert policy().decide([live(1, Tier.ONLINE, proposed=200, accepted=10)], {}, None) == {}
    good = live(1, Tier.ONLINE, proposed=200, accepted=180)
    assert policy().decide([good], {}, None) == {101: 4}


def test_the_drafters_record_is_the_prior() -> None:
    poor = DrafterStats("ngram", proposed=1000, accepted=50, steps=300, seconds=0.0)
    assert policy().decide([live(1, Tier.ONLINE)], {}, poor) == {}


def test_drafting_time_counts() -> None:
    slow = DrafterStats("draft", proposed=100, accepted=70, steps=30, seconds=100 * 0.030)
    assert policy().decide([live(1, Tier.ONLINE)], {}, slow) == {}  # 30 ms a drafted token


def test_a_request_asks_for_itself() -> None:
    running = [live(1, Tier.OFFLINE, k=3), live(2, Tier.ONLINE, k=0), live(3, Tier.ONLINE, k=9),
               live(4, Tier.OFFLINE, k=2, decoding=False)]
    assert policy().decide(running, {}, None) == {101: 3, 103: 4, 104: 2}  # capped at K
    assert policy("off").decide([live(1, Tier.ONLINE), live(2, Tier.OFFLINE, k=3)], {},
                                None) == {102: 3}


def test_the_tpot_slo_bounds_the_verify_chunk() -> None:
    # Plain: 42 ms; with k drafts 42 + 2k ms. A 46 ms SLO leaves room for 2.
    assert policy(tpot_slo_s=0.046).decide([live(1, Tier.ONLINE)], {}, None) == {101: 2}


def test_the_planners_margined_budget_bounds_it_when_there_is_one() -> None:
    """The step plan is held to the SLO times the planner's margin; so is speculation."""
    cost = OnlineStepCost(COST)
    planner = SloPlanner(cost, 0.050, CAPACITY)
    planner.margin = 0.92  # a 46 ms budget: room for 2 drafts, as above
    spec = SpeculationPolicy(cost, CAPACITY, "auto", 0.050, planner)
    assert spec.decide([live(1, Tier.ONLINE)], {}, None) == {101: 2}
    planner.margin = 1.0  # the 50 ms SLO itself leaves room for 3, the unbounded best
    assert spec.decide([live(1, Tier.ONLINE)], {}, None) == {101: 3}


def test_nothing_without_a_model_or_a_drafter() -> None:
    assert policy(cost=None).decide([live(1, Tier.ONLINE)], {}, None) == {}
    none = SpeculationPolicy(OnlineStepCost(COST), replace(CAPACITY, max_draft_len=0), "auto",
                             None)
    assert none.decide([live(1, Tier.ONLINE, k=3)], {}, None) == {}


def test_the_scheduler_hands_draft_lengths_down_in_the_plan() -> None:
    ex = PlannedScriptedExecutor(CAPACITY, step_cost=COST)
    sched = BackfillScheduler(ex, SchedulerConfig(), step_cost=OnlineStepCost(COST))
    rec = Recorder()
    on = sched.submit(SchedRequest((1, 2, 3), SamplingParams(max_tokens=30), Tier.ONLINE), rec)
    off = sched.submit(SchedRequest((4, 5, 6), SamplingParams(max_tokens=30), Tier.OFFLINE), rec)
    for _ in range(6):
        sched.run_pass()
    ids = {r.prompt_token_ids: r.request_id for r in ex.enqueued}
    plan = ex.plans[-1]
    assert plan.draft_len(ids[(1, 2, 3)]) == 3 and plan.draft_len(ids[(4, 5, 6)]) == 0
    assert rec.events[on] and rec.events[off]


class CountingCost(OnlineStepCost):
    def __init__(self, prior: LinearStepCost) -> None:
        super().__init__(prior)
        self.predictions = 0

    def predict(self, shape: StepShape) -> float:
        self.predictions += 1
        return super().predict(shape)


def test_a_pass_that_changed_nothing_reuses_the_last_decision() -> None:
    """The scheduler asks every collection window; only a step changes the answer."""
    cost = CountingCost(COST)
    spec = SpeculationPolicy(cost, CAPACITY, "auto", None)
    running = [live(1, Tier.ONLINE), live(2, Tier.ONLINE)]
    first = spec.decide(running, {}, None)
    asked = cost.predictions
    assert asked > 0
    assert spec.decide(running, {}, None) == first and cost.predictions == asked
    running[0].tokens.append(5)  # a step: one more token of context
    spec.decide(running, {}, None)
    assert cost.predictions > asked
    asked = cost.predictions
    spec.decide(running, {running[1].id: 0}, None)  # the plan paused one
    assert cost.predictions > asked
    asked = cost.predictions
    step = StepShape()
    step.add_decodes(30, 3)
    cost.observe(step, 0.05)  # a step observed: the model moved
    spec.decide(running, {running[1].id: 0}, None)
    assert cost.predictions > asked


def reference_decide(spec: SpeculationPolicy, running: list[LiveRequest],
                     caps: dict[int, int]) -> dict[int, int]:
    """The policy's rule written out directly: each candidate in turn is judged against the
    step rebuilt from every other part, as earlier candidates' choices left it."""
    limit = CAPACITY.max_draft_len
    lens: dict[int, int] = {}
    parts: list[tuple[LiveRequest, bool, int]] = []
    candidates = []
    for r in running:
        cap = caps.get(r.id)
        if cap == 0:
            continue
        if r.run_tokens > 0:
            part = (r, True, 1)
        else:
            pending = min(r.num_context_tokens, CAPACITY.max_tokens_per_step)
            part = (r, False, pending if cap is None else min(cap, pending))
        asked = r.request.sampling.num_speculative_tokens
        if asked is not None:
            if asked:
                lens[r.exec_id] = min(asked, limit)
                if part[1]:
                    part = (r, True, 1 + lens[r.exec_id])
        elif r.tier is Tier.ONLINE:
            candidates.append(len(parts))
        parts.append(part)

    def shape_of(items: list[tuple[LiveRequest, bool, int]]) -> StepShape:
        shape = StepShape()
        for r, decoding, tokens in items:
            context = r.num_context_tokens
            if not decoding:
                shape.add_prefill(0, tokens, tokens >= context)
            elif tokens == 1:
                shape.add_decode(context)
            else:
                shape.add_verify(context - 1, tokens)
        return shape

    for i in candidates:
        r = parts[i][0]
        others = [p for j, p in enumerate(parts) if j != i]
        out = 1 + sum(1 for p in others if p[1])
        context = r.num_context_tokens
        plain = shape_of(others)
        plain.add_decode(context)
        plain_s = spec.cost.predict(plain)
        best, best_rate = 0, 1.1 * out / plain_s
        a = min((r.draft_accepted + 4.0 * 0.5) / (r.draft_proposed + 4.0), 0.95)
        for k in range(1, limit + 1):
            trial = shape_of(others)
            trial.add_verify(context - 1, k + 1)
            rate = (out - 1 + sum(a**n for n in range(k + 1))) / spec.cost.predict(trial)
            if rate > best_rate:
                best, best_rate = k, rate
        if best:
            lens[r.exec_id] = best
            parts[i] = (r, True, 1 + best)
    return lens


@pytest.mark.parametrize("seed", range(40))
def test_the_incremental_step_decides_as_a_rebuilt_one(seed: int) -> None:
    """Random running sets: decodes of mixed contexts (ties at the longest included), prefills,
    requests that ask for drafts, paused ones; a cost with every feature, decode padding too."""
    rng = random.Random(seed)
    cost = LinearStepCost(0.020, [0.0005, 0.0004, 0.0003, 0.002, 1e-6, 4e-5, 1e-7])
    spec = SpeculationPolicy(OnlineStepCost(cost), CAPACITY, "auto", None)
    running, caps = [], {}
    for i in range(rng.randint(1, 24)):
        decoding = rng.random() < 0.8
        r = live(i, rng.choice((Tier.ONLINE, Tier.OFFLINE)), decoding=decoding,
                 k=rng.choice((None, None, None, 0, 2)),
                 proposed=rng.randint(0, 40), accepted=0)
        r.draft_accepted = rng.randint(0, r.draft_proposed)
        r.tokens = [7] * rng.choice((1, 5, 5, 40, 200)) if decoding else []
        if rng.random() < 0.1:
            caps[r.id] = 0
        running.append(r)
    assert spec.decide(running, caps, None) == reference_decide(spec, running, caps)


def test_a_step_where_no_draft_can_pay_stops_at_the_first_trial() -> None:
    """Compute-bound: every token costs what the intercept does. Once a one-draft step is so
    dear that even the longest draft's tokens could not pay for it, longer drafts (which the
    model never makes cheaper) are not tried: two predictions per candidate, not K + 1."""
    steep = LinearStepCost(0.002, [0.002 if name == "tokens" else 0.0 for name in FEATURES])
    cost = CountingCost(steep)
    spec = SpeculationPolicy(cost, CAPACITY, "auto", None)
    running = [live(i, Tier.ONLINE) for i in range(32)]
    assert spec.decide(running, {}, None) == {}
    assert cost.predictions == 2 * len(running)
