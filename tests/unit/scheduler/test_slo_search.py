"""The SLO planner's count of offline decodes that still fit a step (the bound on how many
offline requests an executor that plans its own steps may hold): a binary search, which must
find what adding decodes one at a time would."""

from __future__ import annotations

import random

import pytest

from engine_builder.step_cost import FEATURES, LinearStepCost, OnlineStepCost, StepShape
from server.executor.base import Capacity
from server.scheduler.slo import SloPlanner

pytestmark = pytest.mark.unit


def one_at_a_time(planner: SloPlanner, shape: StepShape, context: int, slots: int) -> int:
    extra, trial = 0, shape.copy()
    while extra < slots:
        trial.add_decode(context)
        if planner.cost.predict(trial) > planner.budget_s:
            break
        extra += 1
    return extra


@pytest.mark.parametrize("seed", range(20))
def test_the_search_finds_what_adding_one_at_a_time_finds(seed: int) -> None:
    rng = random.Random(seed)
    model = LinearStepCost(rng.uniform(0.001, 0.03),
                           [rng.choice([0.0, rng.uniform(0, 2e-3)]) for _ in FEATURES[:3]]
                           + [rng.choice([0.0, rng.uniform(0, 1e-5)]) for _ in FEATURES[3:]])
    slots = rng.choice([1, 8, 64, 256])
    capacity = Capacity(slots, 10_000, 16, 8192, 8192, 1000)
    planner = SloPlanner(OnlineStepCost(model), rng.uniform(0.005, 0.2), capacity)
    shape = StepShape()
    for _ in range(rng.randint(0, 8)):
        shape.add_decode(rng.randint(1, 4000))
    context = rng.randint(1, 4000)
    assert planner._more_decodes(shape, context, planner.budget_s) == one_at_a_time(
        planner, shape, context, slots)
