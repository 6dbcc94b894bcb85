"""The seed's questions about pools: separate online and offline clusters against one unified
pool with backfill, what utilization does to the cost of a token, and the smallest pool that
meets the SLOs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.bench.trace import TracePath, TraceRequest
from server.planner.batching import CAPACITY_COLUMNS, CAPACITY_NOTE, LATENCY_COLUMNS, figures
from server.planner.config import PlanConfig
from server.planner.report import Column, Row, Table
from server.planner.results import SimResult
from server.planner.setup import (
    build_engine,
    offline_load,
    online_load,
    pool,
    saturation,
    scheduler,
)
from server.planner.simulate import Engine, Simulation, Workload

COST_COLUMNS = (
    Column("tokens_per_s", "tokens/s", ",.0f"),
    Column("offline_done_min", "offline done (min)", ".1f"),
    Column("cost_per_million", "$/1M tokens", ".3f"),
)


@dataclass(frozen=True, slots=True)
class Load:
    """The online trace (at its rate) and the offline backlog a comparison runs."""

    online: tuple[TraceRequest, ...]
    offline: tuple[TraceRequest, ...]
    duration_s: float

    def workload(self, *, online: bool = True, offline: bool = True, seed: int = 0,
                 until_done: bool = True) -> Workload:
        return Workload(self.online if online else (), self.offline if offline else (),
                        duration_s=self.duration_s, drain_s=self.duration_s,
                        offline_until_done=until_done and offline and bool(self.offline),
                        seed=seed)


def seed_load(cfg: PlanConfig, trace: TracePath, engine: Engine, online_gpus: int,
              offline_gpus: int, online_share: float, offline_share: float,
              duration_s: float) -> Load:
    """The seed's premise, unless cfg gives a rate and a backlog: the online rate that uses
    ``online_share`` of the online pool's capacity and a backlog that uses ``offline_share``
    of the offline pool's over the period (capacity: ``setup.saturation``)."""
    sat_rate, _ = saturation(cfg, engine, trace)
    rate = cfg.rate or online_share * sat_rate * _replicas(engine, online_gpus)
    online = online_load(cfg, trace, rate=rate, duration_s=duration_s)
    count = cfg.offline_backlog or round(
        offline_share * sat_rate * _replicas(engine, offline_gpus) * duration_s)
    return Load(online, offline_load(cfg, trace, count), duration_s)


def _replicas(engine: Engine, gpus: int) -> int:
    return max(1, gpus // engine.gpus)


@dataclass(frozen=True, slots=True)
class Basis:
    """What a pool's figures are measured against: its engine, the price, and what one
    replica sustains on the trace's mix (generated tokens/s)."""

    engine: Engine
    price: float
    saturated_tokens_per_s: float

    def row(self, name: str, gpus: int, tokens: float, period_s: float,
            result: SimResult | None = None) -> Row:
        """Utilization, capacity used and cost over the whole period the GPUs are paid for."""
        replicas = _replicas(self.engine, gpus)
        rate = tokens / period_s
        row: Row = figures(result) if result is not None else {}
        return row | {
            "setup": name, "gpus": gpus, "tokens_per_s": rate,
            "utilization": rate / (self.engine.peak_tokens_per_s * replicas),
            "capacity_used": rate / (self.saturated_tokens_per_s * replicas),
            "cost_per_million": self.price * gpus * period_s / 3600.0 / tokens * 1e6
            if tokens else None,
        }


def _tokens(r: SimResult) -> float:
    return r.tokens_per_s * r.window_s


def split_vs_unified(cfg: PlanConfig, trace: TracePath, online_gpus: int, offline_gpus: int,
                     unified_gpus: int, online_utilization: float,
                     offline_utilization: float, duration_s: float) -> tuple[Table, Load]:
    """N online GPUs plus M offline GPUs against one pool of K with backfill, over one
    period of the trace; the unified pool also with a backlog it cannot finish (how far
    backfill fills it) and, on GPU presets, with step plans instead of admission bounds."""
    engine = build_engine(cfg)
    load = seed_load(cfg, trace, engine, online_gpus, offline_gpus, online_utilization,
                     offline_utilization, duration_s)
    basis = Basis(engine, cfg.price_per_gpu_hour, saturation(cfg, engine, trace)[1])
    on = Simulation(engine, pool(cfg, engine, online_gpus),
                    load.workload(offline=False, seed=cfg.seed)).run()
    off = Simulation(engine, pool(cfg, engine, offline_gpus),
                     load.workload(online=False, seed=cfg.seed)).run()
    split_period = max(duration_s, off.end_s)
    rows = [
        basis.row(f"split: online ({online_gpus} GPUs)", online_gpus, _tokens(on),
                  duration_s, on),
        basis.row(f"split: offline ({offline_gpus} GPUs)", offline_gpus, _tokens(off),
                  split_period, off),
        basis.row(f"split: both ({online_gpus} + {offline_gpus} GPUs)",
                  online_gpus + offline_gpus, _tokens(on) + _tokens(off), split_period),
    ]
    rows[-1] |= {k: rows[0][k] for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")}
    rows[-1]["offline_done_min"] = rows[1]["offline_done_min"]
    for label, eng in _unified_variants(engine, cfg):
        uni = Simulation(eng, pool(cfg, eng, unified_gpus), load.workload(seed=cfg.seed)).run()
        rows.append(dataclasses.replace(basis, engine=eng).row(
            f"unified{label} ({unified_gpus} GPUs)", unified_gpus, _tokens(uni),
            max(duration_s, uni.end_s), uni))
    fill = dataclasses.replace(load, offline=_fill_backlog(cfg, trace, engine, unified_gpus,
                                                           duration_s))
    for label, eng in _unified_variants(engine, cfg):
        full = Simulation(eng, pool(cfg, eng, unified_gpus),
                          fill.workload(seed=cfg.seed, until_done=False)).run()
        rows.append(basis.row(f"unified{label}, backlog never ends ({unified_gpus} GPUs)",
                              unified_gpus, _tokens(full), duration_s, full))
        rows[-1]["offline_done_min"] = None
    rate = len(load.online) / duration_s
    return Table(
        f"Split vs unified: {engine.label}",
        (Column("setup", "setup"), *COST_COLUMNS[:1], *CAPACITY_COLUMNS, *LATENCY_COLUMNS[1::2],
         *COST_COLUMNS[1:]),
        rows,
        (f"{duration_s:g} s of trace at {rate:.2f} req/s ({len(load.online)} online requests), "
         f"offline backlog of {len(load.offline)} requests (lengths from the same trace); "
         f"TPOT SLO {_slo(cfg, engine)}; ${cfg.price_per_gpu_hour:g} per GPU-hour",
         "figures over the period each pool is paid for: the trace's duration, or until its "
         f"backlog is done if later; {CAPACITY_NOTE}",),
    ), load


def _unified_variants(engine: Engine, cfg: PlanConfig) -> list[tuple[str, Engine]]:
    if engine.follows_plans or cfg.engine:
        return [("", engine)]
    return [(", admission-bounded", engine),
            (", step plans", dataclasses.replace(engine, follows_plans=True))]


def _fill_backlog(cfg: PlanConfig, trace: TracePath, engine: Engine, gpus: int,
                  duration_s: float) -> tuple[TraceRequest, ...]:
    """Twice the offline work the pool could do in the period."""
    sat_rate, _ = saturation(cfg, engine, trace)
    return offline_load(cfg, trace, math.ceil(2 * sat_rate * _replicas(engine, gpus)
                                              * duration_s))


def _slo(cfg: PlanConfig, engine: Engine) -> str:
    tpot = scheduler(cfg, engine).tpot_slo_ms
    return "none" if tpot is None else f"{tpot:.0f} ms"


def economics(cfg: PlanConfig, trace: TracePath, gpus: int, loads: Sequence[float],
              duration_s: float, prices: Sequence[float]) -> Table:
    """Cost per 1M tokens against how much of a pool's capacity is used, from simulated runs
    of one pool: online traffic alone at rates that are ``loads`` shares of what the pool
    sustains, then with backfill filling the rest."""
    engine = build_engine(cfg)
    replicas = _replicas(engine, gpus)
    sat_rate, sat_tokens = saturation(cfg, engine, trace)
    backlog = _fill_backlog(cfg, trace, engine, gpus, duration_s)
    rows: list[Row] = []
    for u in loads:
        rate = u * sat_rate * replicas
        online = online_load(cfg, trace, rate=rate, duration_s=duration_s)
        for backfill in (False, True):
            work = Workload(online, backlog if backfill else (), duration_s=duration_s,
                            seed=cfg.seed)
            r = Simulation(engine, pool(cfg, engine, gpus), work).run()
            used = r.tokens_per_s / (sat_tokens * replicas)
            row: Row = {"setup": f"online {rate:.2f} req/s"
                        + (" + backfill" if backfill else ""),
                        "target": u, "capacity_used": used}
            row |= figures(r)
            for price in prices:
                row[f"cost_{price:g}"] = price * r.gpus / 3600.0 / r.tokens_per_s * 1e6
            row["vs_full"] = 1.0 / used if used else None
            rows.append(row)
    price_columns = tuple(Column(f"cost_{p:g}", f"$/1M at ${p:g}/h", ".3f") for p in prices)
    return Table(
        f"Utilization and cost per token: {engine.label}, {gpus} GPUs",
        (Column("setup", "setup"), *CAPACITY_COLUMNS, Column("tokens_per_s", "tokens/s", ",.0f"),
         *price_columns, Column("vs_full", "x cost of a full pool", ".1f"),
         *LATENCY_COLUMNS[1::2]),
        rows,
        (f"{duration_s:g} s of trace per run; backfill: an offline backlog larger than the "
         f"pool can finish; TPOT SLO {_slo(cfg, engine)}; a full pool = one that sustains "
         f"{sat_tokens * replicas:,.0f} tokens/s on this trace; {CAPACITY_NOTE}",),
    )


def right_size(cfg: PlanConfig, trace: TracePath, ttft_p99_ms: float, tpot_p99_ms: float,
               max_gpus: int, duration_s: float) -> Table:
    """The smallest pool (whole replicas) whose online TTFT and TPOT p99 meet the targets
    and that finishes the offline backlog within the period; doubling, then bisection."""
    engine = build_engine(cfg)
    load = Load(online_load(cfg, trace, duration_s=duration_s),
                offline_load(cfg, trace, cfg.offline_backlog), duration_s)
    tried: dict[int, Row] = {}

    def meets(replicas: int) -> bool:
        gpus = replicas * engine.gpus
        r = Simulation(engine, pool(cfg, engine, gpus), load.workload(seed=cfg.seed)).run()
        ok = _within(r.online.ttft_ms[2], ttft_p99_ms) and _within(r.online.tpot_ms[2],
                                                                      tpot_p99_ms)
        ok = ok and r.online.unserved == 0 and (
            not load.offline or (r.offline_done_s or math.inf) <= duration_s)
        tried[replicas] = figures(r) | {"meets": "yes" if ok else "no",
                                        "cost_per_hour": cfg.price_per_gpu_hour * gpus}
        return ok

    pick = _smallest(meets, max(1, max_gpus // engine.gpus))
    rows = [{"replicas": n, **tried[n]} for n in sorted(tried)]
    verdict = (f"smallest pool: {pick * engine.gpus} GPUs ({pick} x {engine.gpus}), "
               f"${cfg.price_per_gpu_hour * pick * engine.gpus:.2f}/h" if pick
               else f"no pool up to {max_gpus} GPUs meets the targets")
    return Table(
        f"Right-sizing: {engine.label}",
        (Column("replicas", "replicas"), Column("gpus", "GPUs"), Column("meets", "meets"),
         *LATENCY_COLUMNS[1::2], Column("offline_done_min", "offline done (min)", ".1f"),
         *CAPACITY_COLUMNS[1:], Column("cost_per_hour", "$/h", ".2f"),
         Column("cost_per_million", "$/1M tokens", ".3f")),
        rows,
        (f"targets: online TTFT p99 <= {ttft_p99_ms:g} ms, TPOT p99 <= {tpot_p99_ms:g} ms, "
         f"backlog of {len(load.offline)} done within {duration_s:g} s; "
         f"{len(load.online)} online requests", verdict),
    )


def _within(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def _smallest(meets: Callable[[int], bool], most: int) -> int | None:
    """The least n in [1, most] with meets(n), assuming more never hurts: doubling, then
    bisection."""
    hi = 1
    while not meets(hi):
        if hi >= most:
            return None
        hi = min(most, 2 * hi)
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
