"""Calibration: the planner predicts a ``benchmarks.bench_scheduler`` run from the engine's
profile alone, and puts its figures beside the measured ones (the benchmark's --json-out).

Each variant of the benchmark (online-only, offline-only, backfill at several TPOT SLOs, FCFS)
is simulated with the same load: the same trace, rate and length caps, the same offline
backlog drawn with the same seed, the server's scheduler settings, and the SLOs derived as
the benchmark derives them, from the *predicted* online-only run (a prediction uses nothing
measured but the engine's profile).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.bench.trace import length_pool, load_trace, scale_trace, time_scale_for_rate
from engine_builder.step_cost import StepCostModel, StepShape
from server.planner.report import Column, Row, Table
from server.planner.results import RequestRecord, SimResult
from server.planner.simulate import Engine, Pool, Simulation, Workload, draw_lengths
from server.scheduler import Tier
from server.scheduler.config import SchedulerConfig

GOAL_MULTIPLIER = 1.25  # the benchmark's TTFT SLO and goal TPOT SLO over online-only p99
RELAXED_MULTIPLIER = 3.0
BENCH_MAX_ONLINE_QUEUE = 8192  # the benchmark's server flag
# Goals: predicted within this share of measured.
THROUGHPUT_GOAL = 0.15  # tokens/s, offline tokens/s, occupancy
LATENCY_GOAL = 0.25  # TTFT and TPOT p50


@dataclass(frozen=True, slots=True)
class BenchLoad:
    """What one benchmark rate replayed (from its JSON, or the benchmark's defaults)."""

    rate: float
    duration_s: float  # goal variants
    short_duration_s: float  # offline-only and the sweep's SLO variants
    offline_backlog: int
    trace: str | None = None
    max_prompt_tokens: int = 64
    max_output_tokens: int = 16
    offline_output_tokens: int = 32
    seed: int = 0
    sweep: tuple[float, ...] = (1.0, 1.5, 2.0, 5.0)
    fcfs: bool = False
    no_budget_long: bool = True  # the no-budget variant runs duration_s (else short)

    @classmethod
    def from_json(cls, load: dict[str, Any], rate: dict[str, Any]) -> BenchLoad:
        return cls(rate=rate["rate"], duration_s=rate["duration_s"],
                   short_duration_s=load["short_duration"],
                   offline_backlog=rate["offline_backlog"], trace=load["trace"],
                   max_prompt_tokens=load["max_prompt_tokens"],
                   max_output_tokens=load["max_output_tokens"],
                   offline_output_tokens=load["offline_output_tokens"], seed=load["seed"],
                   sweep=tuple(load["sweep"]), fcfs=load["fcfs"],
                   no_budget_long=load.get("no_budget_long", False))

    def online(self) -> tuple[Any, ...]:
        trace = load_trace(self.trace)
        scale = time_scale_for_rate(trace, self.rate, self.duration_s)
        return tuple(scale_trace(trace, time_scale=scale,
                                 max_prompt_tokens=self.max_prompt_tokens,
                                 max_output_tokens=self.max_output_tokens,
                                 duration_s=self.duration_s))

    def offline(self) -> tuple[Any, ...]:
        pool = length_pool(self.max_prompt_tokens, self.offline_output_tokens, self.trace)
        return draw_lengths(pool, self.offline_backlog, self.seed)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    online: bool
    offline: bool
    long: bool  # --duration, else --short-duration
    multiplier: float | None = None  # TPOT SLO over online-only TPOT p99; None: no budget
    policy: str = "backfill"


@dataclass(slots=True)
class Prediction:
    load: BenchLoad
    runs: dict[str, list[SimResult]] = field(default_factory=dict)  # one per draw
    online: dict[str, list[RequestRecord]] = field(default_factory=dict)  # first draw's


def variants(load: BenchLoad) -> list[Variant]:
    out = [Variant("online-only", True, False, True),
           Variant("offline-only", False, True, False),
           Variant("offline-only+slo", False, True, False, GOAL_MULTIPLIER),
           Variant("backfill", True, True, True, GOAL_MULTIPLIER),
           Variant("backfill-3x", True, True, True, RELAXED_MULTIPLIER)]
    out += [Variant(f"backfill-{m:g}x", True, True, False, m) for m in load.sweep]
    out.append(Variant("backfill-no-budget", True, True, load.no_budget_long))
    if load.fcfs:
        out.append(Variant("fcfs", True, True, False, policy="fcfs"))
    return out


Slos = dict[str, tuple[float | None, float | None]]  # variant -> (TPOT, TTFT) SLO in ms


def predict(engine: Engine, load: BenchLoad, slos: Slos | None = None,
            draws: int = 1) -> Prediction:
    """Every variant of one benchmark rate, simulated ``draws`` times (the same arrivals and
    backlog, other step-time jitter: a measured run is one draw too, and TTFT percentiles
    move by tens of percent from one to another). A variant's SLOs are ``slos``' when given
    (the flags the measured server ran with), else derived as the benchmark derives them,
    from the predicted online-only run."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    online, offline = load.online(), load.offline()
    out = Prediction(load)
    base: dict[str, float | None] | None = None
    for v in variants(load):
        length = load.duration_s if v.long else load.short_duration_s
        sched = _scheduler(v, base)
        if slos is not None and v.name in slos:
            tpot, ttft = slos[v.name]
            sched = dataclasses.replace(sched, tpot_slo_ms=tpot, ttft_slo_ms=ttft)
        runs = out.runs[v.name] = []
        for draw in range(draws):
            work = Workload(tuple(r for r in online if r.arrival_s < length) if v.online else (),
                            offline if v.offline else (), duration_s=length,
                            seed=load.seed + draw)
            sim = Simulation(engine, Pool(scheduler=sched), work)
            runs.append(sim.run())
            if draw == 0:
                out.online[v.name] = [r for r in sim.records if r.tier is Tier.ONLINE]
        if v.name == "online-only":
            base = simulated_figures(runs)
    return out


def _scheduler(v: Variant, base: dict[str, float | None] | None) -> SchedulerConfig:
    """The benchmark's server flags for a variant (bench_scheduler's ``slo_args``): SLOs from
    online-only's p99s (``base``: its figures), and a step slowdown bound of the variant's
    multiplier."""
    tpot = ttft = None
    if v.multiplier is not None and base is not None:
        tpot = v.multiplier * (base["tpot_p99"] or 1.0)
        ttft = GOAL_MULTIPLIER * (base["ttft_p99"] or 1.0)
    slowdown = None if v.multiplier is None else max(1.0, v.multiplier)
    return SchedulerConfig(policy=v.policy, max_online_queue=BENCH_MAX_ONLINE_QUEUE,
                           tpot_slo_ms=tpot, ttft_slo_ms=ttft, max_online_slowdown=slowdown)


class ScaledStepCost:
    """A model's steps taking ``factor`` times as long: this host now, against when the
    profile was measured (a shared machine's speed drifts by tens of percent an hour)."""

    __slots__ = ("factor", "model")

    def __init__(self, model: StepCostModel, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"a host speed factor must be > 0, got {factor}")
        self.model, self.factor = model, factor

    def predict(self, shape: StepShape) -> float:
        return self.factor * self.model.predict(shape)


def at_host_speed(engine: Engine, factor: float) -> Engine:
    """The engine with steps ``factor`` times as long as its profile says; the scheduler
    still starts from the profile and corrects itself from the steps, as the server does."""
    prior = engine.prior if engine.prior is not None else engine.model
    return dataclasses.replace(engine, model=ScaledStepCost(engine.model, factor), prior=prior,
                               peak_tokens_per_s=engine.peak_tokens_per_s / factor)


def calibrate(engine: Engine, load: BenchLoad, measured: dict[str, list[dict[str, Any]]] | None,
              speed_from: Sequence[str], draws: int = 1) -> list[Table]:
    """The prediction of one benchmark rate from the profile alone, beside the measured runs
    when given; with ``speed_from`` (variant names), also a second prediction with the host's
    speed taken from those variants' measured tokens/s (the geometric mean of predicted over
    measured: a few measured numbers in, every other figure out)."""
    slos = measured_slos(measured) if measured else None
    first = predict(engine, load, slos, draws)
    tables = [compare(first, measured)]
    last, speed = first, ""
    if measured and speed_from:
        factor = _host_speed(first, measured, speed_from)
        speed = (f"host speed from {' and '.join(speed_from)} "
                 f"({factor:.2f}x the profile's step times)")
        last = predict(at_host_speed(engine, factor), load, slos, draws)
        second = compare(last, measured)
        tables.append(dataclasses.replace(second, title=f"{second.title}, {speed}"))
    if measured and (by_request := per_request(last, measured, speed)) is not None:
        tables.append(by_request)
    return tables


def _host_speed(first: Prediction, measured: dict[str, list[dict[str, Any]]],
                names: Sequence[str]) -> float:
    logs = []
    for name in names:
        tps = measured_figures(measured[name])["tokens_per_s"] if name in measured else None
        predicted = simulated_figures(first.runs[name])["tokens_per_s"] if name in first.runs \
            else None
        if not tps or not predicted:
            raise ValueError(f"no measured tokens/s of variant {name!r} to take the speed from")
        logs.append(math.log(predicted / tps))
    return math.exp(sum(logs) / len(logs))


# -- measured runs ----------------------------------------------------------------------------

FIGURES = (  # (key, title, goal share or None)
    ("tokens_per_s", "tokens/s", THROUGHPUT_GOAL),
    ("occupancy", "occupancy", THROUGHPUT_GOAL),
    ("offline_tokens_per_s", "offline tok/s", THROUGHPUT_GOAL),
    ("ttft_p50", "TTFT p50 ms", LATENCY_GOAL),
    ("ttft_p99", "TTFT p99 ms", None),
    ("tpot_p50", "TPOT p50 ms", LATENCY_GOAL),
    ("tpot_p99", "TPOT p99 ms", None),
)


def simulated_figures(runs: Sequence[SimResult]) -> dict[str, float | None]:
    """One variant's figures from its simulated draws (the median of each)."""
    def figures(r: SimResult) -> dict[str, float | None]:
        return {"tokens_per_s": r.tokens_per_s, "occupancy": r.occupancy,
                "offline_tokens_per_s": r.offline.tokens_per_s if r.offline.tokens else None,
                "ttft_p50": r.online.ttft_ms[0], "ttft_p99": r.online.ttft_ms[2],
                "tpot_p50": r.online.tpot_ms[0], "tpot_p99": r.online.tpot_ms[2]}

    each = [figures(r) for r in runs]
    return {key: _median([v for f in each if (v := f[key]) is not None])
            for key, _, _ in FIGURES}


def measured_figures(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """One variant's figures from its measured rounds (the median of each)."""
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    summaries = [r["summary"] for r in runs]
    online = [s["tiers"]["online"] for s in summaries]
    offline = [s["tiers"]["offline"] for s in summaries]
    return {
        "tokens_per_s": med([s["tokens_per_s"] for s in summaries]),
        "occupancy": med([s["occupancy"] for s in summaries]),
        "offline_tokens_per_s": med([t["tokens_per_s"] if t["tokens"] else None
                                     for t in offline]),
        "ttft_p50": med([t["ttft_ms"][0] for t in online]),
        "ttft_p99": med([t["ttft_ms"][2] for t in online]),
        "tpot_p50": med([t["tpot_ms"][0] for t in online]),
        "tpot_p99": med([t["tpot_ms"][2] for t in online]),
    }


def measured_runs(rate: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every measured run of one rate by variant name (goal variants: one per round)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in [r for rnd in rate["rounds"] for r in rnd] + list(rate["sweep"]):
        out.setdefault(run["summary"]["name"], []).append(run)
    return out


def measured_slos(runs: dict[str, list[dict[str, Any]]]) -> Slos:
    """The SLO flags each measured variant ran with (its first round's), where recorded."""
    return {name: (rs[0]["tpot_slo_ms"], rs[0]["ttft_slo_ms"]) for name, rs in runs.items()
            if "tpot_slo_ms" in rs[0]}


def read_bench_json(path: str | Path) -> tuple[str, list[BenchLoad], list[dict[str, Any]]]:
    """(engine, loads, per-rate measured JSON) from a bench_scheduler --json-out file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    meta = data["meta"]
    if "load" not in meta:
        raise ValueError(f"{path}: no load settings in its meta (written by an older "
                         "bench_scheduler); run the benchmark again")
    return meta["engine"], [BenchLoad.from_json(meta["load"], r) for r in meta["rates"]], \
        meta["rates"]


def compare(prediction: Prediction, measured: dict[str, list[dict[str, Any]]] | None) -> Table:
    """Predicted (and measured) figures per variant; with measurements, predicted over
    measured, and whether the calibration goals hold. Rows carry the numbers as
    ``KEY_predicted``, ``KEY_measured`` and ``KEY_ratio`` for the JSON."""
    rows: list[Row] = []
    for name, results in prediction.runs.items():
        sim = simulated_figures(results)
        meas = measured_figures(measured[name]) if measured and name in measured else None
        row: Row = {"variant": name, "simulated_wall_s": sum(r.wall_s for r in results)}
        for key, _, goal in FIGURES:
            p, m = sim[key], None if meas is None else meas[key]
            ratio = p / m if p is not None and m else None
            row |= {f"{key}_predicted": p, f"{key}_measured": m, f"{key}_ratio": ratio,
                    key: _cell(key, p, m, ratio, goal)}
            if goal is not None and ratio is not None:
                row[f"{key}_met"] = abs(ratio - 1.0) <= goal
        rows.append(row)
    load = prediction.load
    return Table(
        f"Calibration, online {load.rate:g} req/s: predicted"
        + (" / measured (ratio)" if measured else ""),
        (Column("variant", "variant"), *(Column(key, title) for key, title, _ in FIGURES)),
        rows,
        (f"goals: predicted within {THROUGHPUT_GOAL:.0%} of measured for tokens/s, offline "
         f"tokens/s and occupancy, within {LATENCY_GOAL:.0%} for TTFT and TPOT p50 "
         "(* marks a miss)",
         f"predicted: each figure's median over {_draws(prediction)} simulated draws (other "
         "step-time jitter)"),
        label="predicted: simulated" + ("; measured: bench_scheduler" if measured else ""),
    )


def per_request(prediction: Prediction, measured: dict[str, list[dict[str, Any]]],
                speed: str = "") -> Table | None:
    """Each online request's simulated TTFT and TPOT against its measured one (the measured
    variant's first round), paired in arrival order: where the percentiles agree by chance
    or differ, which requests make the difference. None when the measured runs carry no
    per-request records (a benchmark JSON written before they were kept)."""
    rows: list[Row] = []
    for name, simulated in prediction.online.items():
        runs = measured.get(name)
        sent = runs[0].get("online_requests") if runs else None
        if not sent:
            continue
        pairs = list(zip(simulated, sent, strict=False))
        row: Row = {"variant": name, "requests": f"{len(simulated)} / {len(sent)}",
                    "misaligned": sum(s.prompt_tokens != m["prompt_tokens"] for s, m in pairs),
                    "send_lag_ms": _median([1000.0 * (m["sent_s"] - s.arrival_s)
                                            for s, m in pairs if m["sent_s"] is not None])}
        for key, of in (("ttft", lambda r: r.ttft_s), ("tpot", lambda r: r.tpot_s)):
            both = [(1000.0 * x, m[f"{key}_ms"]) for s, m in pairs
                    if m["error"] is None and (x := of(s)) is not None and m[f"{key}_ms"]]
            ratios = sorted(p / q for p, q in both)
            row[f"{key}_pairs"] = len(both)
            row[f"{key}_p50"] = (f"{_median([p for p, _ in both]):.0f} / "
                                 f"{_median([q for _, q in both]):.0f}" if both else None)
            row[f"{key}_ratios"] = ("/".join(f"{_quantile(ratios, q):.2f}"
                                             for q in (0.1, 0.5, 0.9)) if ratios else None)
            row[f"{key}_within"] = (sum(abs(r - 1.0) <= LATENCY_GOAL for r in ratios)
                                    / len(ratios) if ratios else None)
        rows.append(row)
    if not rows:
        return None
    return Table(
        "Calibration request by request, online "
        f"{prediction.load.rate:g} req/s" + (f", {speed}" if speed else ""),
        (Column("variant", "variant"), Column("requests", "requests sim / meas"),
         Column("misaligned", "prompt differs"), Column("send_lag_ms", "send lag ms", ".0f"),
         Column("ttft_pairs", "TTFT n"), Column("ttft_p50", "TTFT p50 ms"),
         Column("ttft_ratios", "TTFT ratio p10/p50/p90"),
         Column("ttft_within", "TTFT within 25%", "%"),
         Column("tpot_pairs", "TPOT n"), Column("tpot_p50", "TPOT p50 ms"),
         Column("tpot_ratios", "TPOT ratio p10/p50/p90"),
         Column("tpot_within", "TPOT within 25%", "%")),
        rows,
        ("requests paired in arrival order (the measured variant's first round); a ratio is "
         "simulated over measured, per request; p50s over the paired requests only",
         "send lag: when the client sent a request after its trace arrival (median)"),
        label="predicted: simulated; measured: bench_scheduler",
    )


def _draws(prediction: Prediction) -> int:
    return max((len(runs) for runs in prediction.runs.values()), default=0)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cell(key: str, predicted: float | None, measured: float | None, ratio: float | None,
          goal: float | None) -> str:
    text = _num(key, predicted)
    if measured is not None:
        text += f" / {_num(key, measured)}"
    if ratio is None:
        return text
    miss = "*" if goal is not None and abs(ratio - 1.0) > goal else ""
    return f"{text} ({ratio:.2f}){miss}"


def _num(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key == "occupancy":
        return f"{100 * value:.0f}%"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
