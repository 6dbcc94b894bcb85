"""Rolling-window figures (tokens/s, slot occupancy) and the one snapshot that both GetStats and
/metrics report, so the two can never disagree.

Rates come from cumulative counters sampled over time, not from per-token callbacks: a sample is
taken by a periodic task and again at every read, and a rate is the counter's growth across the
samples of the last ``window_s`` seconds (the newest sample older than the window is kept as the
baseline, so a window is always fully covered once the server has run that long).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.executor.base import ExecutorStats
from server.scheduler.types import SchedulerSnapshot

DEFAULT_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters and instantaneous occupancy at time ``t``."""

    t: float
    generated_online: int
    generated_offline: int
    active_slots: int
    busy_seconds: float = 0.0  # the executor's time inside steps

    @property
    def generated(self) -> int:
        return self.generated_online + self.generated_offline


class RollingWindow:
    """Samples of the last ``window_s`` seconds plus one baseline sample before them."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._samples: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        horizon = sample.t - self.window_s
        # Drop the oldest while the next one still covers the window's start.
        while len(self._samples) > 2 and self._samples[1].t <= horizon:
            self._samples.popleft()

    def rate(self, counter: Callable[[Sample], float]) -> float:
        """Growth per second of a cumulative counter across the window; 0 before two samples."""
        if len(self._samples) < 2:
            return 0.0
        first, last = self._samples[0], self._samples[-1]
        elapsed = last.t - first.t
        return (counter(last) - counter(first)) / elapsed if elapsed > 0 else 0.0

    def mean_active(self) -> float:
        """Time-weighted mean of active slots across the window (each sample holds until the
        next); the latest sample alone before there are two."""
        samples = list(self._samples)
        if len(samples) < 2:
            return float(samples[-1].active_slots) if samples else 0.0
        weighted = sum(a.active_slots * (b.t - a.t) for a, b in itertools.pairwise(samples))
        elapsed = samples[-1].t - samples[0].t
        return weighted / elapsed if elapsed > 0 else float(samples[-1].active_slots)


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Every figure the server reports, at one instant."""

    scheduler: SchedulerSnapshot
    executor: ExecutorStats
    tokens_per_second: float  # all tiers, over the window
    online_tokens_per_second: float
    offline_tokens_per_second: float
    slot_occupancy: float  # mean occupied slots / slots over the window, in [0, 1]
    utilization: float  # tokens_per_second / profiled peak; 0 without a profile
    # The price in this model's share of the busy time (BusyShares) per million of its tokens;
    # 0 when no price is set or nothing was generated
    cost_per_million_tokens: float
    prefix_cache_hit_ratio: float  # cached prompt tokens / prompt tokens since start
    uptime_seconds: float

    @property
    def slots_total(self) -> int:
        return self.scheduler.slots_total

    @property
    def slots_free(self) -> int:
        running = self.scheduler.online.running + self.scheduler.offline.running
        return max(self.slots_total - running, 0)


class BusyShares:
    """Splits one price per hour among the models of a server by their engines' busy time
    over the window (the accelerator is shared: one model's idle time is the other's to use),
    so the models' costs add up to the price and a model running alone bears all of it.
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[str, float] = {}

    def share(self, model: str, busy_per_second: float) -> float:
        """Records the model's busy time per second and returns its share of the price."""
        with self._lock:
            self._busy[model] = busy_per_second
            total = sum(self._busy.values())
        return busy_per_second / total if total > 0 else 1.0


def cost_per_million_tokens(price_per_hour: float, tokens_per_second: float) -> float:
    """price / (3600 s × tokens/s) × 1e6; 0 when either is 0 (no price, or no tokens to
    spread it over)."""
    if price_per_hour <= 0 or tokens_per_second <= 0:
        return 0.0
    return price_per_hour / (3600.0 * tokens_per_second) * 1e6


class ServerStatsCollector:
    """Samples a scheduler and derives ServerStats. Thread-safe: the metrics endpoint reads
    from its own thread while the event loop samples."""

    def __init__(
        self,
        snapshot: Callable[[], SchedulerSnapshot],
        executor_stats: Callable[[], ExecutorStats],
        *,
        peak_tokens_per_s: float | None,
        price_per_hour: float,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        model: str = "",
        shares: BusyShares | None = None,
    ) -> None:
        """``shares``: the server's split of the price among its models (None: this model
        bears all of it)."""
        self._snapshot = snapshot
        self._executor_stats = executor_stats
        self._peak = peak_tokens_per_s if peak_tokens_per_s and peak_tokens_per_s > 0 else None
        self._price = price_per_hour
        self._clock = clock
        self._started = clock()
        self._window = RollingWindow(window_s)
        self._lock = threading.Lock()
        self._model = model
        self._shares = shares

    def sample(self) -> tuple[SchedulerSnapshot, ExecutorStats]:
        sched, ex = self._snapshot(), self._executor_stats()
        sample = Sample(
            t=self._clock(),
            generated_online=sched.online.generated_tokens,
            generated_offline=sched.offline.generated_tokens,
            active_slots=sched.online.running + sched.offline.running,
            busy_seconds=ex.busy_seconds,
        )
        with self._lock:
            self._window.add(sample)
        return sched, ex

    def stats(self) -> ServerStats:
        """A fresh sample, then the figures over the window."""
        sched, ex = self.sample()
        with self._lock:
            tps = self._window.rate(lambda s: s.generated)
            online = self._window.rate(lambda s: s.generated_online)
            offline = self._window.rate(lambda s: s.generated_offline)
            active = self._window.mean_active()
            busy = self._window.rate(lambda s: s.busy_seconds)
        share = 1.0 if self._shares is None else self._shares.share(self._model, busy)
        slots = max(sched.slots_total, 1)
        return ServerStats(
            scheduler=sched,
            executor=ex,
            tokens_per_second=tps,
            online_tokens_per_second=online,
            offline_tokens_per_second=offline,
            slot_occupancy=min(active / slots, 1.0),
            utilization=tps / self._peak if self._peak else 0.0,
            cost_per_million_tokens=cost_per_million_tokens(self._price * share, tps),
            prefix_cache_hit_ratio=(
                ex.cached_prompt_tokens / ex.prompt_tokens if ex.prompt_tokens else 0.0
            ),
            uptime_seconds=self._clock() - self._started,
        )
