"""The simulation loop: the real scheduler over simulated executors on a virtual clock."""

from __future__ import annotations

import random

import pytest

from client.bench.trace import TraceRequest
from engine_builder.step_cost import FEATURES, LinearStepCost
from server.executor.base import Capacity
from server.planner.presets import accelerator, model_shape, weight_format
from server.planner.roofline import Deployment
from server.planner.simulate import Engine, Pool, Simulation, Workload
from server.scheduler import SchedulerConfig, Tier

pytestmark = pytest.mark.unit

PER_TOKEN = LinearStepCost(0.010, [0.0, 0.001] + [0.0] * (len(FEATURES) - 2))
ROOMY = Capacity(max_slots=8, num_kv_blocks=4096, tokens_per_block=16, max_tokens_per_step=256,
                 max_seq_len=4096, vocab_size=32000)


def linear_engine(**kw: object) -> Engine:
    return Engine("linear", ROOMY, PER_TOKEN, peak_tokens_per_s=8 / 0.018, **kw)  # type: ignore[arg-type]


def gpu_engine(follows_plans: bool) -> Engine:
    d = Deployment(accelerator("H100-SXM"), model_shape("Llama-3-8B"), weight_format("fp16"),
                   max_batch_size=16)
    return d.engine(follows_plans=follows_plans)


def trace(n: int, span: float, seed: int) -> tuple[TraceRequest, ...]:
    rng = random.Random(seed)
    times = sorted(rng.uniform(0, span) for _ in range(n))
    return tuple(TraceRequest(t, rng.randint(50, 900), rng.randint(2, 120)) for t in times)


def fingerprint(sim: Simulation) -> list[tuple[object, ...]]:
    return [(r.tier, r.arrival_s, r.first_token_s, r.end_s, r.tokens, r.outcome, r.replica)
            for r in sim.records]


@pytest.mark.parametrize("follows_plans", [False, True])
def test_running_ahead_changes_no_figure(follows_plans: bool) -> None:
    engine = gpu_engine(follows_plans)
    pool = Pool(replicas=2, scheduler=SchedulerConfig(tpot_slo_ms=25.0), offline_in_flight=6)
    work = Workload(trace(60, 20.0, 1), trace(40, 0.0, 2), duration_s=20.0)
    fast, slow = Simulation(engine, pool, work), Simulation(engine, pool, work, run_ahead=False)
    a, b = fast.run(), slow.run()
    assert fingerprint(fast) == fingerprint(slow)  # every request's times, to the bit
    assert (a.steps, a.offline_completed) == (b.steps, b.offline_completed)
    assert (a.online.ttft_ms, a.online.tpot_ms) == (b.online.ttft_ms, b.online.tpot_ms)
    # Tokens count when a pass delivers them: run-ahead output that spans the window's end
    # lands just past it.
    assert a.tokens_per_s == pytest.approx(b.tokens_per_s, rel=0.01)
    assert a.occupancy == pytest.approx(b.occupancy, rel=1e-9)
    assert a.online.requests == 60 and a.offline.tokens > 0


def test_a_saturated_engine_runs_at_the_rate_its_step_model_gives() -> None:
    backlog = tuple(TraceRequest(0.0, 1, 200) for _ in range(200))
    result = Simulation(linear_engine(), Pool(offline_in_flight=16),
                        Workload((), backlog, duration_s=60.0)).run()
    # 8 decodes a step: 10 ms + 8 x 1 ms.
    assert result.offline.tokens_per_s == pytest.approx(8 / 0.018, rel=0.03)
    assert result.occupancy == pytest.approx(1.0, abs=0.01)
    assert result.utilization == pytest.approx(1.0, rel=0.03)
    assert result.busy_fraction == pytest.approx(1.0, abs=0.01)
    assert result.cost_per_million_tokens == pytest.approx(
        2.0 / 3600 / result.tokens_per_s * 1e6)


def test_the_window_cuts_offline_work_and_lets_online_requests_finish() -> None:
    online = (TraceRequest(9.0, 20, 300),)  # ~3 s of decoding: ends after the window
    offline = tuple(TraceRequest(0.0, 20, 1000) for _ in range(4))
    sim = Simulation(linear_engine(), Pool(), Workload(online, offline, duration_s=10.0))
    result = sim.run()
    late = next(r for r in sim.records if r.tier is Tier.ONLINE)
    assert late.completed and late.end_s is not None and late.end_s > 10.0
    assert late.tokens == 300 and result.online.requests == 1
    assert all(r.cut and not r.completed for r in sim.records if r.tier is Tier.OFFLINE)
    assert result.online.tokens < 300  # only what came inside the window counts
    assert result.offline_done_s is None and result.offline_completed == 0


def test_until_done_measures_when_the_backlog_finishes() -> None:
    backlog = tuple(TraceRequest(0.0, 1, 50) for _ in range(16))
    result = Simulation(linear_engine(), Pool(),
                        Workload((), backlog, duration_s=1.0, offline_until_done=True)).run()
    assert result.offline_completed == 16 and result.offline_done_s == pytest.approx(
        result.end_s)
    # Two waves of 8, each ~50 steps of 18 ms (plus a prefill step each).
    assert 1.7 < result.offline_done_s < 2.0


def test_online_requests_spread_over_the_replicas() -> None:
    sim = Simulation(gpu_engine(False), Pool(replicas=3),
                     Workload(trace(90, 30.0, 3), duration_s=30.0))
    sim.run()
    per_replica = [sum(1 for r in sim.records if r.replica == i) for i in range(3)]
    assert sum(per_replica) == 90 and min(per_replica) >= 20


def test_right_sizing_finds_the_smallest_pool_that_meets_the_targets() -> None:
    from server.planner.pools import _smallest

    calls: list[int] = []

    def meets(n: int) -> bool:
        calls.append(n)
        return n >= 5

    assert _smallest(meets, 64) == 5 and calls == [1, 2, 4, 8, 6, 5]
    assert _smallest(lambda n: False, 6) is None
    assert _smallest(lambda n: True, 6) == 1


def test_an_overtaker_in_the_last_layer_nests_after_it_and_the_step_still_ends() -> None:
    """A 200-token offline prefill (210 ms, ten layers of 21 ms) is in flight when an online
    request comes in its last layer: the CPU executor looks after the last layer too, so the
    online prefill nests there and the outer step resumes with nothing left, ending at the
    very time the nested step did. The simulation must still end that step (its own event,
    not the spent one of the nested step) and run both requests to the end."""
    engine = linear_engine(follows_plans=True, layers=10)
    online = (TraceRequest(0.195, 20, 3),)
    offline = (TraceRequest(0.0, 200, 3),)
    sim = Simulation(engine, Pool(), Workload(online, offline, duration_s=5.0))
    sim.run()
    records = {r.tier: r for r in sim.records}
    assert records[Tier.ONLINE].first_token_s == pytest.approx(0.210 + 0.030)
    assert records[Tier.OFFLINE].first_token_s == pytest.approx(0.240)
    assert records[Tier.ONLINE].tokens == 3 and records[Tier.OFFLINE].tokens == 3
