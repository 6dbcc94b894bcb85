"""The figures and goals of ``bench_scheduler``: per-run SLO attainment, the goal checks, the
TPOT-SLO sweep table and its plot."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from client.bench.loadgen import RequestRecord
from client.bench.report import Summary
from client.types import Stats, Tier

GOAL_RATIO = 1.25
ATTAINMENT_GOAL = 0.99
OFFLINE_SHARE_GOAL = 0.50
RELAXED_SHARE_GOAL = 0.80
NO_ONLINE_LOSS = 0.05
OCCUPANCY_GOAL = 0.90
PREDICTION_ERROR_GOAL = 0.15


@dataclass(frozen=True, slots=True)
class Run:
    """One variant's figures: the load generator's summary, plus what the SLOs made of it."""

    summary: Summary
    multiplier: float | None  # TPOT SLO over online-only's TPOT p99; None: no budget
    tpot_slo_ms: float | None
    ttft_slo_ms: float | None
    attainment: float | None  # online requests meeting both SLOs, as the client saw them
    server_attainment: float | None  # the same, as the server judged completed requests
    prediction_error: float | None  # the server's median step-time prediction error
    # Each online request as the client saw it, in the order sent (what a per-request
    # comparison, such as the planner's calibration, needs beyond the percentiles).
    online_requests: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, summary: Summary, records: Sequence[RequestRecord], stats: Stats,
           multiplier: float | None, base: Run | None) -> Run:
        tpot = ttft = None
        if multiplier is not None and base is not None:
            online = base.summary.tier(Tier.ONLINE)
            tpot = multiplier * (online.tpot_ms[2] or 0.0)
            ttft = GOAL_RATIO * (online.ttft_ms[2] or 0.0)
        budget = stats.step_budget
        server_tier = stats.tier(Tier.ONLINE)
        return cls(
            summary=summary,
            multiplier=multiplier,
            tpot_slo_ms=tpot,
            ttft_slo_ms=ttft,
            attainment=_attainment(records, tpot, ttft),
            server_attainment=server_tier.slo_attainment,
            prediction_error=(
                budget.step_prediction_error if budget and budget.steps_observed else None
            ),
            online_requests=online_requests(records),
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = asdict(self.summary)
        return out


def online_requests(records: Sequence[RequestRecord]) -> tuple[dict[str, Any], ...]:
    """The online records, in the order sent: send time (s from the run's start), prompt
    and output tokens, TTFT and TPOT (ms; None where the request got no first or second
    token) and the error, if any ("cut": ended by the window)."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(1000.0 * seconds, 3)

    online = [r for r in records if r.tier is Tier.ONLINE]
    online.sort(key=lambda r: math.inf if r.sent_s is None else r.sent_s)
    return tuple({"sent_s": None if r.sent_s is None else round(r.sent_s, 4),
                  "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                  "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s), "error": r.error}
                 for r in online)


def _attainment(
    records: Sequence[RequestRecord], tpot_ms: float | None, ttft_ms: float | None
) -> float | None:
    """Share of online requests, finished or cut before a first token, that met both SLOs
    (a request that never got a token missed the TTFT SLO)."""
    if tpot_ms is None or ttft_ms is None:
        return None
    judged = met = 0
    for r in records:
        if r.tier is not Tier.ONLINE or (r.error is not None and r.ttft_s is not None):
            continue
        judged += 1
        ttft_ok = r.ttft_s is not None and 1000 * r.ttft_s <= ttft_ms
        tpot_ok = r.tpot_s is None or 1000 * r.tpot_s <= tpot_ms
        met += ttft_ok and tpot_ok
    return met / judged if judged else None


Check = tuple[str, bool, str, float]


def _ratio(value: float | None, base: float | None) -> float:
    return value / base if value is not None and base else math.inf


def check_goals(runs: dict[str, Run], ceiling: Run | None = None) -> list[Check]:
    """(goal, met, detail, score) per goal; score orders rounds from worst to best. The
    offline shares also show ``ceiling``'s (backfill with no budget at all over the same
    window), when given: the most offline work the engine does beside the online load."""
    base, full = runs["online-only"].summary, runs["offline-only"].summary
    full_slo = runs["offline-only+slo"].summary
    goal, relaxed = runs["backfill"], runs["backfill-3x"]
    bf = goal.summary.tier(Tier.ONLINE)
    on = base.tier(Tier.ONLINE)
    ttft, tpot = _ratio(bf.ttft_ms[2], on.ttft_ms[2]), _ratio(bf.tpot_ms[2], on.tpot_ms[2])
    unused = max(0.0, full.tokens_per_s - base.tokens_per_s)
    share = _share(goal.summary, unused)
    relaxed_share = _share(relaxed.summary, unused)
    loss = 1 - full_slo.tokens_per_s / full.tokens_per_s if full.tokens_per_s else math.inf
    attained = goal.attainment if goal.attainment is not None else 0.0
    occ = goal.summary.occupancy or 0.0
    error = goal.prediction_error if goal.prediction_error is not None else math.inf
    rx = relaxed.summary.tier(Tier.ONLINE)
    rx_ttft = _ratio(rx.ttft_ms[2], on.ttft_ms[2])
    most = "" if ceiling is None else f"; no budget: {_share(ceiling.summary, unused):.0%}"
    return [
        ("online TTFT p99 <= 1.25x online-only", ttft <= GOAL_RATIO,
         f"{_ms(bf.ttft_ms[2])} vs {_ms(on.ttft_ms[2])} = {ttft:.2f}x", -ttft),
        ("online TPOT p99 <= 1.25x online-only", tpot <= GOAL_RATIO,
         f"{_ms(bf.tpot_ms[2])} vs {_ms(on.tpot_ms[2])} = {tpot:.2f}x "
         f"(TPOT SLO {_ms(goal.tpot_slo_ms)})", -tpot),
        (">= 99% of online requests meet both SLOs", attained >= ATTAINMENT_GOAL,
         f"{attained:.1%} (server-judged {_pct(goal.server_attainment)}; TTFT SLO "
         f"{_ms(goal.ttft_slo_ms)})", attained),
        ("offline tok/s >= 50% of unused", share >= OFFLINE_SHARE_GOAL,
         f"{goal.summary.tier(Tier.OFFLINE).tokens_per_s:.1f} of {unused:.1f} tok/s "
         f"unused = {share:.0%}{most}", share),
        ("offline tok/s >= 80% of unused, SLO at 3x", relaxed_share >= RELAXED_SHARE_GOAL,
         f"{relaxed.summary.tier(Tier.OFFLINE).tokens_per_s:.1f} of {unused:.1f} = "
         f"{relaxed_share:.0%} (TTFT p99 {rx_ttft:.2f}x, occupancy "
         f"{_pct(relaxed.summary.occupancy)}{most})", relaxed_share),
        ("no online work: offline within 5% of offline-only", loss <= NO_ONLINE_LOSS,
         f"{full_slo.tokens_per_s:.1f} vs {full.tokens_per_s:.1f} tok/s ({-loss:+.1%})", -loss),
        ("slot occupancy >= 90%", occ >= OCCUPANCY_GOAL, f"{occ:.0%}", occ),
        ("median step-time prediction error <= 15%", error <= PREDICTION_ERROR_GOAL,
         f"{error:.1%}", -error),
    ]


def _share(summary: Summary, unused: float) -> float:
    offline = summary.tier(Tier.OFFLINE).tokens_per_s
    return offline / unused if unused > 0 else math.inf


def median_round(checks: list[list[Check]]) -> list[Check]:
    """Per goal, the round with the median score (the lower middle one for an even count)."""
    return [
        sorted(per_goal, key=lambda c: c[3])[(len(per_goal) - 1) // 2]
        for per_goal in zip(*checks, strict=True)
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def sweep_points(goal_runs: Sequence[Run], sweep: Sequence[Run]) -> list[Run]:
    """Every backfill run, ordered by TPOT SLO (no budget last)."""
    runs = [r for r in [*goal_runs, *sweep] if r.summary.name.startswith("backfill")]
    return sorted(runs, key=lambda r: math.inf if r.multiplier is None else r.multiplier)


def format_sweep(goal_runs: Sequence[Run], sweep: Sequence[Run]) -> str:
    by_name = {r.summary.name: r for r in goal_runs}
    base, full = by_name["online-only"].summary, by_name["offline-only"].summary
    unused = max(0.0, full.tokens_per_s - base.tokens_per_s)
    head = (f"{'TPOT SLO':>16} {'online TPOT p99':>16} {'TTFT p99':>9} {'both SLOs met':>14} "
            f"{'offline tok/s':>14} {'of unused':>10}")
    lines = ["TPOT-SLO sweep (online-only: TPOT p99 "
             f"{_ms(base.tier(Tier.ONLINE).tpot_ms[2])}, TTFT p99 "
             f"{_ms(base.tier(Tier.ONLINE).ttft_ms[2])}; offline-only "
             f"{full.tokens_per_s:.1f} tok/s)", head, "-" * len(head)]
    for r in sweep_points(goal_runs, sweep):
        online, offline = r.summary.tier(Tier.ONLINE), r.summary.tier(Tier.OFFLINE)
        slo = "none" if r.multiplier is None else f"{r.multiplier:g}x = {_ms(r.tpot_slo_ms)}"
        lines.append(f"{slo:>16} {_ms(online.tpot_ms[2]):>16} {_ms(online.ttft_ms[2]):>9} "
                     f"{_pct(r.attainment):>14} {offline.tokens_per_s:>14.1f} "
                     f"{_pct(_share(r.summary, unused)):>10}")
    return "\n".join(lines)


def plot_sweep(
    curves: Sequence[tuple[float, Sequence[Run], Sequence[Run]]], path: str | os.PathLike[str]
) -> bool:
    """Offline tokens/s against online TPOT p99, one curve per online rate, with online-only
    and offline-only as reference points; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for rate, goal_runs, sweep in curves:
        points = sweep_points(goal_runs, sweep)
        xs = [r.summary.tier(Tier.ONLINE).tpot_ms[2] or 0.0 for r in points]
        ys = [r.summary.tier(Tier.OFFLINE).tokens_per_s for r in points]
        line = ax.plot(xs, ys, marker="o", label=f"backfill, online {rate:g} req/s")[0]
        for r, x, y in zip(points, xs, ys, strict=True):
            ax.annotate("no budget" if r.multiplier is None else f"{r.multiplier:g}x", (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        by_name = {r.summary.name: r.summary for r in goal_runs}
        base, full = by_name["online-only"], by_name["offline-only"]
        ax.scatter([base.tier(Tier.ONLINE).tpot_ms[2] or 0.0], [0.0], marker="s",
                   color=line.get_color(), label=f"online-only, {rate:g} req/s")
        ax.axhline(full.tokens_per_s, linestyle=":", color=line.get_color(),
                   label=f"offline-only ({rate:g} req/s run)")
    ax.set_xlabel("online TPOT p99 (ms)")
    ax.set_ylabel("offline tokens/s")
    ax.set_title("TPOT SLO trade-off (labels: SLO as a multiple of online-only TPOT p99)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
