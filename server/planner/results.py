"""What a simulated run measured: per-request records and the figures made from them, defined
as the load generator defines them (client/bench/report.py), so that a simulated run and a
measured one can be put side by side. Every figure here is simulated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from client.bench.report import percentile
from server.scheduler import Tier

Percentiles = tuple[float | None, float | None, float | None]  # p50, p90, p99 (ms)


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One request as its client would have seen it (virtual seconds)."""

    tier: Tier
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    replica: int
    sched_id: int = 0
    first_token_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    outcome: str | None = None  # the scheduler's Outcome value; None: never finished
    cut: bool = False  # ended by the window closing, not by itself

    @property
    def completed(self) -> bool:
        return self.outcome in ("stop", "length") and not self.cut

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.tokens - 1)


@dataclass(frozen=True, slots=True)
class TierFigures:
    requests: int  # completed (stop or length)
    unserved: int  # online requests that never got a token (their wait counts as TTFT)
    tokens: int  # generated inside the window
    tokens_per_s: float
    ttft_ms: Percentiles
    tpot_ms: Percentiles


@dataclass(frozen=True, slots=True)
class SimResult:
    """One simulated run's figures (all simulated)."""

    label: str
    replicas: int
    gpus: int  # accelerators in the pool
    window_s: float  # what rates and occupancy are measured over
    end_s: float  # when the run ended (virtual)
    online: TierFigures
    offline: TierFigures
    tokens_per_s: float
    occupancy: float  # mean busy slots / slots
    utilization: float  # tokens/s over the pool's peak decode rate
    busy_fraction: float  # share of the time the engines were running a step
    price_per_gpu_hour: float
    cost_per_million_tokens: float | None
    offline_total: int
    offline_completed: int
    offline_done_s: float | None  # when the last offline request finished, if all did
    steps: int
    preemptions: int  # scheduler preemptions (offline for online) plus executor ones
    wall_s: float  # real seconds the simulation took
    simulated: bool = True

    def tier(self, tier: Tier) -> TierFigures:
        return self.online if tier is Tier.ONLINE else self.offline

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ms(values: list[float]) -> Percentiles:
    def at(q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else 1000.0 * p

    return at(0.5), at(0.9), at(0.99)


def tier_figures(
    records: Sequence[RequestRecord], tier: Tier, tokens: int, window_s: float, end_s: float
) -> TierFigures:
    mine = [r for r in records if r.tier is tier]
    ok = [r for r in mine if r.completed]
    unserved = [end_s - r.arrival_s for r in mine
                if tier is Tier.ONLINE and r.first_token_s is None and not r.completed]
    ttfts = [t for r in ok if (t := r.ttft_s) is not None] + unserved
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    return TierFigures(
        requests=len(ok),
        unserved=len(unserved),
        tokens=tokens,
        tokens_per_s=tokens / window_s if window_s > 0 else 0.0,
        ttft_ms=_ms(ttfts),
        tpot_ms=_ms(tpots),
    )
