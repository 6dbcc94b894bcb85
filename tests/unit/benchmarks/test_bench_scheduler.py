"""bench_scheduler's goal checks, their median over rounds, the sweep table and the load."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.slo_goals import Run, check_goals, format_sweep, median_round, plot_sweep
from client.bench.loadgen import RequestRecord
from client.bench.report import Summary, TierSummary
from client.types import Tier

pytestmark = pytest.mark.unit


def _tier(tier: Tier, tps: float, ttft_p99: float | None, tpot_p99: float | None) -> TierSummary:
    return TierSummary(
        tier=tier.value, requests=10, unserved=0, errors=0, tokens=300, tokens_per_s=tps,
        requests_per_s=1.0, ttft_ms=(None, None, ttft_p99), tpot_ms=(None, None, tpot_p99),
        server_ttft_ms=(None, None, ttft_p99),
    )


def _run(name: str, online_tps: float, offline_tps: float, ttft: float | None = None,
         tpot: float | None = None, occupancy: float = 0.95, multiplier: float | None = None,
         attainment: float | None = None, error: float | None = None) -> Run:
    tiers = {Tier.ONLINE.value: _tier(Tier.ONLINE, online_tps, ttft, tpot),
             Tier.OFFLINE.value: _tier(Tier.OFFLINE, offline_tps, None, None)}
    summary = Summary(name=name, window_s=30.0, tiers=tiers,
                      tokens_per_s=online_tps + offline_tps, requests_per_s=2.0,
                      occupancy=occupancy, online_occupancy=None, offline_occupancy=None,
                      slots_total=32, price_per_hour=2.0, cost_per_million_tokens=None)
    tpot_slo = None if multiplier is None else multiplier * 100.0
    return Run(summary, multiplier, tpot_slo, 625.0 if multiplier else None, attainment, None,
               error)


def _round(offline: float, ttft: float, tpot: float, attainment: float = 0.995) -> dict[str, Run]:
    runs = [
        _run("online-only", 10.0, 0.0, ttft=500.0, tpot=100.0, occupancy=0.05),
        _run("offline-only", 0.0, 110.0, occupancy=1.0),
        _run("offline-only+slo", 0.0, 106.0, occupancy=1.0, multiplier=1.25),
        _run("backfill", 10.0, offline, ttft=ttft, tpot=tpot, multiplier=1.25,
             attainment=attainment, error=0.10),
        _run("backfill-3x", 10.0, 85.0, ttft=520.0, tpot=250.0, multiplier=3.0),
    ]
    return {r.summary.name: r for r in runs}


def test_goals_are_ratios_against_the_baselines() -> None:
    checks = {goal: (ok, detail) for goal, ok, detail, _ in check_goals(_round(55.0, 600.0, 120))}
    assert checks["online TTFT p99 <= 1.25x online-only"] == (True, "600 ms vs 500 ms = 1.20x")
    assert checks["online TPOT p99 <= 1.25x online-only"][0]
    assert checks[">= 99% of online requests meet both SLOs"][0]
    ok, detail = checks["offline tok/s >= 50% of unused"]
    assert ok and "55.0 of 100.0 tok/s unused = 55%" in detail  # unused = 110 - 10
    assert checks["offline tok/s >= 80% of unused, SLO at 3x"][0]  # 85 of 100
    assert checks["no online work: offline within 5% of offline-only"][0]  # 106 vs 110
    assert checks["slot occupancy >= 90%"][0]
    assert checks["median step-time prediction error <= 15%"][0]
    failing = {goal: ok for goal, ok, _, _ in check_goals(_round(45.0, 700.0, 130, 0.9))}
    assert not any(failing[g] for g in (
        "online TTFT p99 <= 1.25x online-only", "online TPOT p99 <= 1.25x online-only",
        ">= 99% of online requests meet both SLOs", "offline tok/s >= 50% of unused"))


def test_the_offline_shares_show_the_no_budget_ceiling() -> None:
    ceiling = _run("backfill-no-budget", 10.0, 77.0, 530.0, 400.0)
    details = {goal: detail for goal, _, detail, _ in check_goals(_round(55.0, 600.0, 120),
                                                                  ceiling)}
    assert details["offline tok/s >= 50% of unused"].endswith("; no budget: 77%")
    assert details["offline tok/s >= 80% of unused, SLO at 3x"].endswith("; no budget: 77%)")
    alone = check_goals(_round(55.0, 600.0, 120))
    assert not any("no budget" in detail for _, _, detail, _ in alone)


def test_the_no_budget_variant_runs_as_long_as_the_goal_variants() -> None:
    from benchmarks.bench_scheduler import NO_BUDGET, sweep_variants

    base = _run("online-only", 10.0, 0.0, ttft=500.0, tpot=100.0)
    long = {v.name: v.long for v in sweep_variants(base, [2.0], fcfs=True)}
    assert long == {"backfill-2x": False, NO_BUDGET: True, "fcfs": False}


def test_median_round_judges_each_goal_by_its_middle_round() -> None:
    rounds = [check_goals(_round(offline, ttft, 110))
              for offline, ttft in [(35.0, 650.0), (70.0, 500.0), (60.0, 600.0)]]
    by_goal = {goal: (ok, detail) for goal, ok, detail, _ in median_round(rounds)}
    assert "60.0 of 100.0" in by_goal["offline tok/s >= 50% of unused"][1]  # 35, 70, 60 -> 60
    assert "1.20x" in by_goal["online TTFT p99 <= 1.25x online-only"][1]  # 1.3, 1.0, 1.2
    two = {goal: ok for goal, ok, _, _ in median_round(rounds[:2])}
    assert not two["offline tok/s >= 50% of unused"]  # an even count takes the worse middle


def test_attainment_counts_online_requests_that_met_both_slos() -> None:
    records = [
        RequestRecord(Tier.ONLINE, 5, 0.1, 0.05, 1.0),  # met both
        RequestRecord(Tier.ONLINE, 5, 0.9, 0.05, 1.0),  # TTFT missed
        RequestRecord(Tier.ONLINE, 5, 0.1, 0.50, 1.0),  # TPOT missed
        RequestRecord(Tier.ONLINE, 0, None, None, 1.0, "cut", 2.0),  # never served: missed
        RequestRecord(Tier.ONLINE, 3, 0.1, 0.05, 1.0, "cut"),  # cut mid-stream: not judged
        RequestRecord(Tier.OFFLINE, 5, 9.0, 9.0, 1.0),  # offline: not judged
    ]
    base = _run("online-only", 10.0, 0.0, ttft=400.0, tpot=80.0)
    from client.types import Stats, TierStats

    stats = Stats({Tier.ONLINE: TierStats(Tier.ONLINE, 0, 0, 4, 20, 0, 0.0, 4, 2, 3, 1)}, 32, 32,
                  0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, False)
    run = Run.of(base.summary, records, stats, 1.25, base)
    assert run.tpot_slo_ms == 100.0 and run.ttft_slo_ms == 500.0
    assert run.attainment == pytest.approx(1 / 4)
    assert run.server_attainment == pytest.approx(1 / 4)


def test_the_sweep_table_and_plot(tmp_path: Path) -> None:
    goal_runs = list(_round(55.0, 600.0, 120).values())
    sweep = [_run("backfill-2x", 10.0, 70.0, 520.0, 190.0, multiplier=2.0, attainment=1.0),
             _run("backfill-no-budget", 10.0, 95.0, 530.0, 400.0)]
    table = format_sweep(goal_runs, sweep)
    rows = table.splitlines()[3:]
    assert [row.split()[0] for row in rows] == ["1.25x", "2x", "3x", "none"]
    assert "95.0" in rows[-1] and "95.0%" in rows[-1]
    path = tmp_path / "slo.png"
    if plot_sweep([(1.5, goal_runs, sweep)], path):
        assert path.stat().st_size > 1000


def test_a_run_keeps_each_online_request_in_the_order_sent() -> None:
    from benchmarks.slo_goals import online_requests

    records = [
        RequestRecord(Tier.ONLINE, 5, 0.2, 0.05, 3.0, sent_s=1.5, prompt_tokens=40),
        RequestRecord(Tier.OFFLINE, 5, 0.1, 0.05, 1.0, sent_s=0.1, prompt_tokens=9),
        RequestRecord(Tier.ONLINE, 1, 0.1, None, 1.0, sent_s=0.5, prompt_tokens=12),
        RequestRecord(Tier.ONLINE, 0, None, None, 9.0, "cut", 2.0, sent_s=7.0, prompt_tokens=3),
    ]
    assert online_requests(records) == (
        {"sent_s": 0.5, "prompt_tokens": 12, "output_tokens": 1, "ttft_ms": 100.0,
         "tpot_ms": None, "error": None},
        {"sent_s": 1.5, "prompt_tokens": 40, "output_tokens": 5, "ttft_ms": 200.0,
         "tpot_ms": 50.0, "error": None},
        {"sent_s": 7.0, "prompt_tokens": 3, "output_tokens": 0, "ttft_ms": None,
         "tpot_ms": None, "error": "cut"},
    )


def test_the_load_comes_from_the_trace_given(tiny_engine: Path, tmp_path: Path) -> None:
    import asyncio

    from benchmarks.bench_scheduler import build_parser, plan_load
    from client.bench.command import TraceLoad
    from server.app import serve_in_thread
    from server.config import ServerConfig

    path = tmp_path / "mine.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2024-01-01 00:00:{i:02d}.5,{10 + i},{1 + i % 3}\n" for i in range(40)))
    args = build_parser().parse_args(["--trace", str(path), "--offline-backlog", "8"])
    thread = serve_in_thread(ServerConfig(engine=str(tiny_engine), port=0, metrics_port=-1))
    try:
        _, spec = asyncio.run(plan_load(thread.address, args, rate=4.0, duration=5.0))
    finally:
        thread.stop(grace_s=0.5)
    expected = TraceLoad(path=str(path), duration_s=5, max_prompt_tokens=64, max_output_tokens=16,
                         rate=4).arrivals()
    assert spec.online == expected and len(expected) == 20  # 4/s for 5 s
    assert {r.prompt_tokens for r in spec.lengths} <= {round((10 + i) * 64 / 49)
                                                        for i in range(40)}


def test_the_load_generator_records_when_and_what_it_sent(tiny_engine: Path) -> None:
    import asyncio

    from client.aio import AsyncClient
    from client.bench.loadgen import LoadSpec, run_load
    from client.bench.trace import TraceRequest
    from server.app import serve_in_thread
    from server.config import ServerConfig

    online = tuple(TraceRequest(0.1 + 0.2 * i, 5 + i, 2) for i in range(4))

    async def go(address: str) -> tuple[RequestRecord, ...]:
        async with AsyncClient(address) as client:
            # The window ends long after the last arrival (the run ends when its requests
            # do): a send that a busy event loop makes late is still made, not dropped.
            spec = LoadSpec(duration_s=5.0, vocab_size=256, online=online, seed=1)
            return (await run_load(client, spec)).records

    thread = serve_in_thread(ServerConfig(engine=str(tiny_engine), port=0, metrics_port=-1))
    try:
        records = asyncio.run(go(thread.address))
    finally:
        thread.stop(grace_s=0.5)
    sent = sorted(records, key=lambda r: r.sent_s or 0.0)
    assert [r.prompt_tokens for r in sent] == [5, 6, 7, 8]
    for r, req in zip(sent, online, strict=True):
        # Never before its arrival; after it by no more than a busy event loop's lateness.
        assert r.sent_s is not None and req.arrival_s <= r.sent_s < req.arrival_s + 1.0
        assert r.ttft_s is not None and r.output_tokens == 2
