"""The step budget on the TensorRT-LLM executor, which plans its own steps: the scheduler bounds
it by admission (how many offline requests it holds while online work is present), and the
executor's iteration stats feed the step-cost model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from engine_builder.step_cost import FEATURES, LinearStepCost, OnlineStepCost
from server.executor.base import PlanFollower, SamplingParams, StepReporter
from server.scheduler import BackfillScheduler, SchedRequest, SchedulerConfig, Tier
from tests.unit.scheduler.helpers import Recorder
from tests.unit.trtllm.conftest import make_engine_dir
from tests.unit.trtllm.helpers import open_plain

pytestmark = pytest.mark.unit

# 10 ms a step plus 5 ms a token.
COST = LinearStepCost(0.010, [0.005 if name == "tokens" else 0.0 for name in FEATURES])


def _req(tier: Tier, first: int, max_tokens: int) -> SchedRequest:
    prompt = tuple(100 + (first + i) % 100 for i in range(6))
    return SchedRequest(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), tier)


@pytest.mark.parametrize(("slowdown", "rows"), [(None, 5), (1.7, 2)])
def test_offline_admission_is_bounded_while_online_work_runs(
    bindings: Any, tmp_path: Path, slowdown: float | None, rows: int
) -> None:
    """The budget's rows: 10 + 5 x (1 + 5) ms within the 40 ms SLO; at most 1.7x the online
    decode alone (25.5 ms), 10 + 5 x (1 + 2)."""
    root = make_engine_dir(tmp_path / "e", max_batch_size=12, max_seq_len=2048,
                           fake={"num_blocks": 1024})
    ex, _ = open_plain(bindings, root)
    assert not isinstance(ex, PlanFollower) and isinstance(ex, StepReporter)
    ex.take_step_samples = list  # type: ignore[method-assign]  # the fake's steps take ~1 ms
    config = SchedulerConfig(offline_reserve=0.1, tpot_slo_ms=40.0, max_online_slowdown=slowdown)
    sched = BackfillScheduler(ex, config, step_cost=OnlineStepCost(COST))
    assert sched.planner is not None
    sched.planner.margin = 1.0  # plan to the SLO itself: round numbers below
    rec = Recorder()
    try:
        online = sched.submit(_req(Tier.ONLINE, 0, 2000), rec)
        deadline = time.monotonic() + 10
        while not rec.tokens(online):
            assert time.monotonic() < deadline
            sched.run_pass(0.01)
        for i in range(10):
            sched.submit(_req(Tier.OFFLINE, 10 * i, 2000), rec)
        held = []
        for _ in range(30):
            sched.run_pass(0.01)
            held.append(sched.snapshot().offline.running)
        assert max(held) == rows  # the budget's rows, never more, while the online one runs
        sched.cancel(online)
        deadline = time.monotonic() + 10
        while sched.snapshot().offline.running < 10:
            assert time.monotonic() < deadline, "no online work: offline takes every slot"
            sched.run_pass(0.01)
    finally:
        sched.stop(0.0)


def test_iteration_stats_become_step_samples(bindings: Any, tmp_path: Path) -> None:
    ex, _ = open_plain(bindings, make_engine_dir(tmp_path / "e"))
    sched = BackfillScheduler(ex, SchedulerConfig())
    rec = Recorder()
    try:
        rid = sched.submit(_req(Tier.OFFLINE, 0, 8), rec)
        deadline = time.monotonic() + 10
        while not rec.finals(rid):
            assert time.monotonic() < deadline
            sched.run_pass(0.01)
        sched.run_pass(0.01)
        assert sched.step_cost.observed_steps >= 8  # a prefill, then a step per token
    finally:
        sched.stop(0.0)
