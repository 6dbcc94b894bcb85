"""Figures from a load run: per-tier throughput and latency percentiles, slot occupancy, cost;
as a table, JSON, and (with matplotlib installed) a PNG.

Throughput per tier comes from the server's ``GetStats`` token counters over the sampled window
when available (they include tokens of requests cut at the end), else from the client's counts.
Occupancy is the mean of sampled busy slots / slots. Cost per 1M tokens =
price per hour / 3600 / tokens per second * 1e6.

>>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
2.5
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from client.bench.loadgen import LoadResult, RequestRecord, StatsSample
from client.types import Tier


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class TierSummary:
    """One tier's figures; latencies in milliseconds."""

    tier: str
    requests: int  # finished without error
    unserved: int  # online requests cut before their first token (their wait counts as TTFT)
    errors: int  # failed (cut-at-end requests are not counted)
    tokens: int  # generated in the window
    tokens_per_s: float
    requests_per_s: float
    ttft_ms: tuple[float | None, float | None, float | None]  # p50, p90, p99
    tpot_ms: tuple[float | None, float | None, float | None]
    server_ttft_ms: tuple[float | None, float | None, float | None]  # as the server timed it


@dataclass(frozen=True, slots=True)
class Summary:
    """One run's figures."""

    name: str
    window_s: float
    tiers: dict[str, TierSummary]
    tokens_per_s: float
    requests_per_s: float
    occupancy: float | None  # mean busy slots / slots
    online_occupancy: float | None
    offline_occupancy: float | None
    slots_total: int | None
    price_per_hour: float
    cost_per_million_tokens: float | None

    def tier(self, tier: Tier) -> TierSummary:
        return self.tiers[tier.value]


def _ms_percentiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    def ms(q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else p * 1e3

    return ms(0.5), ms(0.9), ms(0.99)


def _server_tokens(samples: Sequence[StatsSample], tier: Tier) -> tuple[int, float] | None:
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    attr = "online_tokens" if tier is Tier.ONLINE else "offline_tokens"
    delta = getattr(last, attr) - getattr(first, attr)
    span = last.t_s - first.t_s
    return (delta, delta / span) if span > 0 else None


def _tier_summary(
    tier: Tier, records: Sequence[RequestRecord], samples: Sequence[StatsSample], window: float
) -> TierSummary:
    mine = [r for r in records if r.tier is tier]
    ok = [r for r in mine if r.error is None]
    server = _server_tokens(samples, tier)
    any_server_tokens = server is not None and any(
        s.online_tokens or s.offline_tokens for s in samples
    )
    if server is not None and any_server_tokens:
        tokens, tps = server
    else:
        tokens = sum(r.output_tokens for r in mine)
        tps = tokens / window if window > 0 else 0.0
    # An online request that never got a token waited at least this long: leaving it out
    # would flatter a policy that starves online traffic.
    unserved = [r.waited_s for r in mine if r.error == "cut" and r.waited_s is not None]
    if tier is not Tier.ONLINE:
        unserved = []
    return TierSummary(
        tier=tier.value,
        requests=len(ok),
        unserved=len(unserved),
        errors=sum(1 for r in mine if r.error not in (None, "cut")),
        tokens=tokens,
        tokens_per_s=tps,
        requests_per_s=len(ok) / window if window > 0 else 0.0,
        ttft_ms=_ms_percentiles([r.ttft_s for r in ok if r.ttft_s is not None] + unserved),
        tpot_ms=_ms_percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        server_ttft_ms=_ms_percentiles([r.server_ttft_s for r in ok if r.server_ttft_s]),
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(name: str, result: LoadResult, *, price_per_hour: float = 0.0) -> Summary:
    """The figures of one run."""
    samples = [s for s in result.samples if s.slots_total > 0]
    tiers = {t.value: _tier_summary(t, result.records, samples, result.window_s) for t in Tier}
    tps = sum(t.tokens_per_s for t in tiers.values())
    cost = price_per_hour / 3600.0 / tps * 1e6 if tps > 0 and price_per_hour > 0 else None
    return Summary(
        name=name,
        window_s=result.window_s,
        tiers=tiers,
        tokens_per_s=tps,
        requests_per_s=sum(t.requests_per_s for t in tiers.values()),
        occupancy=_mean([s.slots_busy / s.slots_total for s in samples]),
        online_occupancy=_mean([s.online_running / s.slots_total for s in samples]),
        offline_occupancy=_mean([s.offline_running / s.slots_total for s in samples]),
        slots_total=samples[-1].slots_total if samples else None,
        price_per_hour=price_per_hour,
        cost_per_million_tokens=cost,
    )


def _f(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def format_table(summaries: Sequence[Summary]) -> str:
    """A fixed-width table: one row per run and tier, run-level figures on each row."""
    head = (
        f"{'run':<18} {'tier':<8} {'req/s':>7} {'tok/s':>8} "
        f"{'TTFT p50/p90/p99 ms':>22} {'TPOT p50/p90/p99 ms':>22} {'occ':>5} {'$/1M tok':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        for t in s.tiers.values():
            if not t.requests and not t.tokens and not t.errors:
                continue
            ttft = "/".join(_f(v, ".0f") for v in t.ttft_ms)
            tpot = "/".join(_f(v, ".1f") for v in t.tpot_ms)
            occ = s.online_occupancy if t.tier == "online" else s.offline_occupancy
            lines.append(
                f"{s.name:<18} {t.tier:<8} {t.requests_per_s:>7.1f} {t.tokens_per_s:>8.1f} "
                f"{ttft:>22} {tpot:>22} {_pct(occ):>5} {'':>9}"
            )
            if t.errors:
                lines[-1] += f"  ({t.errors} errors)"
            if t.unserved:
                lines[-1] += f"  ({t.unserved} unserved, TTFT counted as their wait)"
        lines.append(
            f"{s.name:<18} {'all':<8} {s.requests_per_s:>7.1f} {s.tokens_per_s:>8.1f} "
            f"{'':>22} {'':>22} {_pct(s.occupancy):>5} {_f(s.cost_per_million_tokens, '.2f'):>9}"
        )
    return "\n".join(lines)


def write_json(summaries: Sequence[Summary], path: str | os.PathLike[str], **meta: object) -> None:
    """Writes ``{"meta": ..., "runs": [...]}``."""
    payload = {"meta": meta, "runs": [asdict(s) for s in summaries]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def plot(summaries: Sequence[Summary], path: str | os.PathLike[str]) -> bool:
    """Bar charts of tokens/s per tier and online TTFT p99; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [s.name for s in summaries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(names)
    for tier in Tier:
        values = [s.tier(tier).tokens_per_s for s in summaries]
        ax1.bar(names, values, bottom=bottom, label=tier.value)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax1.set_ylabel("tokens/s")
    ax1.legend()
    ax2.bar(names, [s.tier(Tier.ONLINE).ttft_ms[2] or 0.0 for s in summaries])
    ax2.set_ylabel("online TTFT p99 (ms)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
