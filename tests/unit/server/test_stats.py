"""Rolling windows and the derived economics, on a fake clock."""

from __future__ import annotations

import pytest

from server.executor.base import ExecutorStats
from server.scheduler.types import SchedulerSnapshot, TierSnapshot
from server.stats import RollingWindow, Sample, ServerStatsCollector, cost_per_million_tokens

pytestmark = pytest.mark.unit


def test_rate_is_growth_over_the_window_and_old_samples_fall_out() -> None:
    window = RollingWindow(window_s=10.0)
    assert window.rate(lambda s: s.generated) == 0.0
    for t in range(0, 31):  # 100 tokens/s for 20 s, then 400 tokens/s
        total = 100 * t if t <= 20 else 2000 + 400 * (t - 20)
        window.add(Sample(t=float(t), generated_online=total, generated_offline=0, active_slots=0))
    assert window.rate(lambda s: s.generated) == pytest.approx(400.0)


def test_mean_active_is_time_weighted() -> None:
    window = RollingWindow(window_s=100.0)
    for t, active in ((0.0, 4), (1.0, 0), (4.0, 0)):  # 4 slots for 1 s, then 0 for 3 s
        window.add(Sample(t=t, generated_online=0, generated_offline=0, active_slots=active))
    assert window.mean_active() == pytest.approx(1.0)


def test_cost_per_million_tokens() -> None:
    assert cost_per_million_tokens(3.6, 1000.0) == pytest.approx(1.0)  # $3.6/h at 1k tokens/s
    assert cost_per_million_tokens(0.0, 1000.0) == 0.0
    assert cost_per_million_tokens(3.6, 0.0) == 0.0


class FakeScheduler:
    def __init__(self) -> None:
        self.online = self.offline = self.running = 0
        self.prompt = self.cached = 0

    def snapshot(self) -> SchedulerSnapshot:
        return SchedulerSnapshot(
            online=TierSnapshot(self.running, 0, 0, self.online, 0),
            offline=TierSnapshot(0, 0, 0, self.offline, 0),
            slots_total=8,
            passes=0,
            draining=False,
        )

    def executor_stats(self) -> ExecutorStats:
        return ExecutorStats(
            active=self.running,
            queued=0,
            kv_blocks_total=10,
            kv_blocks_used=0,
            kv_blocks_free=10,
            kv_blocks_cached=0,
            steps=0,
            last_step_latency_s=0.0,
            last_step_tokens=0,
            prompt_tokens=self.prompt,
            cached_prompt_tokens=self.cached,
            generated_tokens=self.online + self.offline,
        )


def test_collector_derives_rates_utilization_cost_and_hit_ratio() -> None:
    now = [0.0]
    fake = FakeScheduler()
    collector = ServerStatsCollector(
        fake.snapshot,
        fake.executor_stats,
        peak_tokens_per_s=500.0,
        price_per_hour=7.2,
        window_s=10.0,
        clock=lambda: now[0],
    )
    collector.sample()
    now[0], fake.online, fake.offline, fake.running = 2.0, 300, 100, 4
    fake.prompt, fake.cached = 80, 20
    s = collector.stats()
    assert s.tokens_per_second == pytest.approx(200.0)
    assert (s.online_tokens_per_second, s.offline_tokens_per_second) == (150.0, 50.0)
    assert s.utilization == pytest.approx(0.4)
    assert s.cost_per_million_tokens == pytest.approx(7.2 / (3600 * 200) * 1e6)
    assert s.prefix_cache_hit_ratio == pytest.approx(0.25)
    assert s.slot_occupancy == 0.0  # 0 slots held over the window's only interval
    assert s.uptime_seconds == 2.0 and s.slots_free == 4


def test_no_profile_means_zero_utilization() -> None:
    fake = FakeScheduler()
    collector = ServerStatsCollector(
        fake.snapshot, fake.executor_stats, peak_tokens_per_s=None, price_per_hour=0.0
    )
    assert collector.stats().utilization == 0.0
