"""Two of the seed's questions about batching: how throughput and utilization grow with the
batch (per preset), and what continuous batching buys over static batching on a trace."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from client.bench.trace import TracePath
from server.planner.config import PlanConfig
from server.planner.presets import ACCELERATORS, MODELS
from server.planner.report import Column, Row, Table
from server.planner.results import SimResult
from server.planner.roofline import Deployment
from server.planner.setup import build_engine, deployment, online_load, pool, saturation
from server.planner.simulate import Simulation, Workload

# The seed's first table: relative decode throughput and "typical" utilization by batch size.
SEED_BATCH_CURVE = {1: ("1.0x", "10-20%"), 4: ("3.5x", "45-55%"), 8: ("5.5x", "65-75%"),
                    16: ("7x", "75-85%")}


def batch_curve(cfg: PlanConfig, batches: Sequence[int], contexts: Sequence[int]) -> Table:
    """Decode throughput at each batch size, relative to batch 1, and as a share of the
    deployment's peak (its largest batch at that context), with the bandwidth and compute
    the step uses, for every accelerator and model preset in ``cfg``'s number formats (auto
    tensor parallel unless ``cfg.tp``)."""
    rows: list[Row] = []
    for model in MODELS:
        for acc in ACCELERATORS:
            try:
                d = deployment(dataclasses.replace(cfg, accelerator=acc, model=model))
            except ValueError:
                continue  # does not fit at any tensor-parallel size
            for context in contexts:
                rows += _curve(d, f"{model} on {d.tp} x {acc}", batches, context)
    return Table(
        f"Decode throughput by batch size ({cfg.weights} weights, {cfg.kv_cache} KV)",
        (Column("preset", "preset"), Column("context", "context"), Column("batch", "batch"),
         Column("step_ms", "step ms", ".1f"), Column("tokens_per_s", "tokens/s", ",.0f"),
         Column("relative", "x batch 1", ".2f"), Column("utilization", "utilization", "%"),
         Column("mbu", "HBM BW", "%"), Column("mfu", "FLOP/s", "%"),
         Column("seed_relative", "seed: x"), Column("seed_utilization", "seed: util.")),
        rows,
        ("utilization = tokens/s over the peak (the largest batch the slots and the KV pool "
         "hold at that context); HBM BW and FLOP/s: what the step uses of the GPU's peak "
         "bandwidth and tensor-core FLOP/s; the seed's figures are quoted for comparison",),
    )


def _curve(d: Deployment, name: str, batches: Sequence[int], context: int) -> list[Row]:
    base, peak = d.decode_tokens_per_s(1, context), d.peak_tokens_per_s(context)
    fits = d.max_batch_at(context)
    rows: list[Row] = []
    for b in batches:
        seed = SEED_BATCH_CURVE.get(b, ("", ""))
        row: Row = {"preset": name, "context": context, "batch": b,
                    "seed_relative": seed[0], "seed_utilization": seed[1]}
        if b <= fits:
            tps = d.decode_tokens_per_s(b, context)
            mbu, mfu = d.decode_utilization(b, context)
            row |= {"step_ms": 1000.0 * b / tps, "tokens_per_s": tps, "relative": tps / base,
                    "utilization": tps / peak, "mbu": mbu, "mfu": mfu}
        else:
            row["step_ms"] = f"KV holds {fits}"
        rows.append(row)
    return rows


def static_vs_continuous(cfg: PlanConfig, trace: TracePath, gpus: int,
                         loads: Sequence[float], static_batch: int, duration_s: float) -> Table:
    """The same online trace on the same pool with static batching (a batch of up to
    ``static_batch`` requests runs until all of it is done, prompts padded to the longest)
    and with continuous (in-flight) batching, at rates that are ``loads`` shares of what
    the continuously batched pool sustains on this trace (``setup.saturation``)."""
    engine = build_engine(cfg)
    static_engine = dataclasses.replace(
        engine, capacity=dataclasses.replace(engine.capacity, max_slots=static_batch))
    replicas = max(1, gpus // engine.gpus)
    sat_rate, sat_tokens = saturation(cfg, engine, trace)
    rows: list[Row] = []
    for u in loads:
        rate = u * sat_rate * replicas
        load = online_load(cfg, trace, rate=rate, duration_s=duration_s)
        workload = Workload(load, duration_s=duration_s, drain_s=duration_s, seed=cfg.seed)
        for mode, eng in (("static", static_engine), ("continuous", engine)):
            result = Simulation(eng, pool(cfg, eng, gpus, batching=_batching(mode)),
                                workload).run()
            row: Row = {"target": u, "rate": rate, "batching": mode}
            rows.append(row | figures(result)
                        | {"capacity_used": result.tokens_per_s / (sat_tokens * replicas)})
    return Table(
        f"Static vs continuous batching: {engine.label}, {replicas} replica(s), online trace",
        (Column("target", "load", "%"), Column("rate", "req/s", ".2f"),
         Column("batching", "batching"), *LATENCY_COLUMNS,
         Column("tokens_per_s", "tokens/s", ",.0f"), *CAPACITY_COLUMNS,
         Column("unserved", "unserved")),
        rows,
        (f"{duration_s:g} s of trace per run; load = the rate over what the continuously "
         f"batched pool sustains on this trace ({sat_rate * replicas:.2f} req/s, "
         f"{sat_tokens * replicas:,.0f} tokens/s); {CAPACITY_NOTE}; static: batches of up to "
         f"{static_batch}, prompts padded to the batch's longest, finished rows kept as "
         "padding until the batch ends",),
    )


def _batching(mode: str) -> str:
    return "static" if mode == "static" else "inflight"


CAPACITY_COLUMNS = (Column("capacity_used", "capacity used", "%"),
                    Column("utilization", "utilization", "%"))
CAPACITY_NOTE = ("capacity used = tokens/s over what the pool sustains on this trace; "
                 "utilization = tokens/s over the engines' decode peak (Backfill's metric)")
LATENCY_COLUMNS = (
    Column("ttft_p50", "TTFT p50 ms", ",.0f"), Column("ttft_p99", "TTFT p99 ms", ",.0f"),
    Column("tpot_p50", "TPOT p50 ms", ".1f"), Column("tpot_p99", "TPOT p99 ms", ".1f"),
)


def figures(r: SimResult) -> Row:
    """A run's figures as a table row (milliseconds, ratios, minutes)."""
    return {
        "gpus": r.gpus,
        "tokens_per_s": r.tokens_per_s,
        "online_tokens_per_s": r.online.tokens_per_s,
        "offline_tokens_per_s": r.offline.tokens_per_s,
        "utilization": r.utilization,
        "occupancy": r.occupancy,
        "busy": r.busy_fraction,
        "ttft_p50": r.online.ttft_ms[0],
        "ttft_p99": r.online.ttft_ms[2],
        "tpot_p50": r.online.tpot_ms[0],
        "tpot_p99": r.online.tpot_ms[2],
        "online_requests": r.online.requests,
        "unserved": r.online.unserved,
        "offline_done_min": None if r.offline_done_s is None else r.offline_done_s / 60.0,
        "offline_completed": r.offline_completed,
        "cost_per_million": r.cost_per_million_tokens,
        "window_s": r.window_s,
        "wall_s": r.wall_s,
    }
