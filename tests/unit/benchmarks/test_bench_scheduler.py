"""bench_scheduler's goal checks and their median over rounds."""

from __future__ import annotations

import pytest

from benchmarks.bench_scheduler import check_goals, median_round
from client.bench.report import Summary, TierSummary
from client.types import Tier

pytestmark = pytest.mark.unit


def _tier(tier: Tier, tokens_per_s: float, ttft_p99: float | None) -> TierSummary:
    return TierSummary(
        tier=tier.value, requests=10, unserved=0, errors=0, tokens=300,
        tokens_per_s=tokens_per_s, requests_per_s=1.0, ttft_ms=(None, None, ttft_p99),
        tpot_ms=(None, None, None), server_ttft_ms=(None, None, ttft_p99),
    )


def _summary(name: str, online_tps: float, offline_tps: float, p99: float | None,
             occupancy: float) -> Summary:
    tiers = {Tier.ONLINE.value: _tier(Tier.ONLINE, online_tps, p99),
             Tier.OFFLINE.value: _tier(Tier.OFFLINE, offline_tps, None)}
    return Summary(name=name, window_s=30.0, tiers=tiers, tokens_per_s=online_tps + offline_tps,
                   requests_per_s=2.0, occupancy=occupancy, online_occupancy=None,
                   offline_occupancy=None, slots_total=32, price_per_hour=2.0,
                   cost_per_million_tokens=None)


def _round(offline_only: float, backfill_offline: float, p99: float) -> dict[str, Summary]:
    return {
        "online-only": _summary("online-only", 10.0, 0.0, 500.0, 0.05),
        "offline-only": _summary("offline-only", 0.0, offline_only, None, 1.0),
        "backfill": _summary("backfill", 10.0, backfill_offline, p99, 0.95),
    }


def test_goals_are_ratios_against_the_baselines() -> None:
    (occ, ttft, share) = check_goals(_round(110.0, 80.0, 600.0))
    assert occ[:2] == ("backfill slot occupancy >= 90%", True)
    assert ttft[1] and "1.20x" in ttft[2]  # 600 / 500
    assert share[1] and "80 of 100 tok/s unused = 80%" in share[2]  # unused = 110 - 10
    (_, ttft, share) = check_goals(_round(110.0, 79.0, 700.0))
    assert not ttft[1] and not share[1]


def test_median_round_judges_each_goal_by_its_middle_round() -> None:
    rounds = [check_goals(_round(110.0, offline, p99))
              for offline, p99 in [(70.0, 650.0), (90.0, 500.0), (85.0, 600.0)]]
    _, ttft, share = median_round(rounds)
    assert "85 of 100" in share[2] and share[1]  # shares 70%, 90%, 85% -> 85%
    assert "1.20x" in ttft[2] and ttft[1]  # ratios 1.3, 1.0, 1.2 -> 1.2
    two = median_round(rounds[:2])
    assert "70 of 100" in two[2][2] and not two[2][1]  # an even count takes the worse middle


def test_the_load_comes_from_the_trace_given(tiny_engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from benchmarks.bench_scheduler import build_parser, plan_load
    from client.bench.command import TraceLoad
    from server.app import serve_in_thread
    from server.config import ServerConfig

    path = tmp_path / "mine.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2024-01-01 00:00:{i:02d}.5,{10 + i},{1 + i % 3}\n" for i in range(40)))
    args = build_parser().parse_args(["--trace", str(path), "--online-rate", "4",
                                      "--duration", "5", "--offline-backlog", "8"])
    thread = serve_in_thread(ServerConfig(engine=str(tiny_engine), port=0, metrics_port=-1))
    try:
        _, spec, rate = asyncio.run(plan_load(thread.address, args))
    finally:
        thread.stop(grace_s=0.5)
    expected = TraceLoad(path=str(path), duration_s=5, max_prompt_tokens=64, max_output_tokens=16,
                         rate=4).arrivals()
    assert rate == 4 and spec.online == expected and len(expected) == 20  # 4/s for 5 s
    assert {r.prompt_tokens for r in spec.lengths} <= {round((10 + i) * 64 / 49)
                                                        for i in range(40)}
