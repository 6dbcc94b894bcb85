"""The speculation policy (server/scheduler/speculation.py): online requests speculate when the
step-cost model predicts a gain at the current batch, offline ones never; a request's own
``num_speculative_tokens`` wins; the plan carries the draft lengths down to the executor."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine_builder.step_cost import FEATURES, LinearStepCost, OnlineStepCost
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
