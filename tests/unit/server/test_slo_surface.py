"""The step budget as users see it: SLO flags and their defaults, ListModels, GetStats and
/metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from engine_builder.manifest import Manifest
from engine_builder.profile import BatchPoint, make_profile
from engine_builder.step_cost import FEATURES, LinearStepCost, StepShape
from server.executor.base import Capacity
from server.slo_defaults import engine_step_cost, resolve_slos
from tests.fakes import PlannedScriptedExecutor
from tests.unit.server.conftest import MakeServer, tiny_capacity
from tests.unit.server.test_ops import request, scrape

M = ("model", "tiny-llama")  # the label every engine figure carries
pytestmark = pytest.mark.unit

COST = LinearStepCost(0.010, [0.005 if name == "tokens" else 0.0 for name in FEATURES])
CAP = Capacity(8, 256, 16, 64, 512, 1000)


def test_slos_default_from_the_step_cost_model() -> None:
    slos = resolve_slos(0.0, 0.0, COST, CAP)
    lone = StepShape()
    lone.add_decode(128)
    assert slos.tpot_ms == pytest.approx(3 * 1000 * COST.predict(lone))  # 45 ms
    assert slos.ttft_ms == pytest.approx(10 + 5 * 64 + slos.tpot_ms)  # a full prefill + TPOT
    assert "derived" in slos.how
    given = resolve_slos(120.0, -1.0, COST, CAP)
    assert (given.tpot_ms, given.ttft_ms) == (120.0, None)
    off = resolve_slos(-1.0, 0.0, None, CAP)
    assert (off.tpot_ms, off.ttft_ms) == (None, None)
    assert "no profile" not in off.how
    unprofiled = resolve_slos(0.0, 0.0, None, CAP)
    assert unprofiled.tpot_ms is None and "no profile" in unprofiled.how


def test_an_old_profile_still_gives_a_model(tiny_engine: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(tiny_engine)
    assert engine_step_cost(manifest) is None
    old = manifest.with_profile(make_profile([BatchPoint(1, 20.0, 50.0),
                                              BatchPoint(4, 64.0, 62.5)], 1000, 10.0))
    model = engine_step_cost(old)
    assert model is not None
    shape = StepShape()
    shape.add_decode(16)
    assert model.predict(shape) == pytest.approx(0.050, rel=0.02)


async def test_list_models_get_stats_and_metrics_show_the_budget(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = PlannedScriptedExecutor(tiny_capacity(tiny_engine), step_cost=COST)
    server = await make_server(executor, metrics_port=0, tpot_slo_ms=40.0, ttft_slo_ms=500.0)
    assert server.metrics_url is not None
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        (model,) = (await stub.ListModels(pb.ListModelsRequest())).models
        assert (model.tpot_slo_ms, model.ttft_slo_ms) == (40.0, 500.0)

        async def run(r: pb.GenerateRequest) -> None:
            _ = [c async for c in stub.Generate(r)]

        calls = [request([i + 1, 3], 6) for i in range(3)]
        calls += [request([i + 9, 4], 30, pb.TIER_OFFLINE) for i in range(6)]
        await asyncio.gather(*(run(r) for r in calls))
        stats = await stub.GetStats(pb.GetStatsRequest())
    budget = stats.step_budget
    assert (budget.tpot_slo_ms, budget.ttft_slo_ms) == (40.0, 500.0)
    assert budget.steps_observed > 0
    # The model learns the fake's costs (the tiny engine has no profile to start from).
    assert budget.step_prediction_error < 0.5
    online = {t.tier: t for t in stats.tiers}[pb.TIER_ONLINE]
    assert online.slo_judged == 3 and online.ttft_slo_met == 3
    m = await scrape(server.metrics_url)
    assert m["backfill_slo_seconds"][(M, ("slo", "tpot"))] == pytest.approx(0.040)
    assert m["backfill_slo_judged_requests_total"][(M, ("tier", "online"))] == 3
    assert m["backfill_step_seconds_count"][(M,)] == budget.steps_observed
    assert "backfill_offline_held_back" in m and "backfill_step_prediction_error_ratio" in m
