"""From a ``PlanConfig`` to what a simulation runs: the engine (a GPU deployment's roofline or
a profiled engine), the scheduler with the server's SLO defaults, a pool, and the load."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

from client.bench.trace import (
    TracePath,
    TraceRequest,
    load_trace,
    scale_trace,
    time_scale_for_rate,
)
from server.planner.config import PlanConfig
from server.planner.presets import accelerator, model_shape, weight_format
from server.planner.profiled import profiled_engine
from server.planner.roofline import Deployment, Efficiency
from server.planner.simulate import Engine, Pool, Simulation, Workload, draw_lengths
from server.scheduler.config import SchedulerConfig
from server.slo_defaults import resolve_slos

AUTO_TP_SEQUENCES = 32  # auto TP: the KV pool holds this many sequences of AUTO_TP_CONTEXT
AUTO_TP_CONTEXT = 4096


def deployment(cfg: PlanConfig, tp: int | None = None) -> Deployment:
    """The GPU preset ``cfg`` names, at ``tp`` GPUs per replica (default: cfg's, or auto)."""
    efficiency = Efficiency(cfg.bandwidth_efficiency, cfg.compute_efficiency,
                            cfg.step_overhead_ms, cfg.allreduce_us)

    def at(n: int) -> Deployment:
        return Deployment(accelerator(cfg.accelerator), model_shape(cfg.model),
                          weight_format(cfg.weights), cfg.kv_cache, n, efficiency,
                          cfg.max_batch_size, cfg.max_num_tokens)

    n = tp or cfg.tp
    if n:
        return at(n)
    fitting: list[Deployment] = []
    errors: list[str] = []
    for n in (1, 2, 4, 8):
        try:
            d = at(n)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        fitting.append(d)
        if d.max_batch_at(AUTO_TP_CONTEXT) >= AUTO_TP_SEQUENCES:
            return d
    if not fitting:
        raise ValueError(errors[-1])
    return fitting[-1]


def build_engine(cfg: PlanConfig) -> Engine:
    """The engine ``cfg`` describes. A profiled engine follows step plans when its backend
    does (the CPU executor), a GPU preset is bounded by admission (TensorRT-LLM), unless
    ``--executor`` says otherwise."""
    engine = profiled_engine(engine_path(cfg.engine)) if cfg.engine else deployment(cfg).engine()
    if cfg.executor != "auto":
        engine = dataclasses.replace(engine, follows_plans=cfg.executor == "plans")
    return engine


def engine_path(name: str) -> Path:
    """An engine directory, or ``default`` / a published model's name, as ``--engine`` takes
    them (fetched and built on first use)."""
    from engine_builder.default import resolve_engine

    return resolve_engine(name)


def scheduler(cfg: PlanConfig, engine: Engine) -> SchedulerConfig:
    """The scheduler as ``python -m server`` would configure it for this engine."""
    prior = engine.prior if engine.prior is not None else engine.model
    slos = resolve_slos(cfg.tpot_slo_ms, cfg.ttft_slo_ms, prior, engine.capacity)
    return cfg.scheduler_config(slos.tpot_ms, slos.ttft_ms)


def pool(cfg: PlanConfig, engine: Engine, gpus: int, *, batching: str = "inflight",
         offline_in_flight: int | None = None, sched: SchedulerConfig | None = None) -> Pool:
    """A pool of ``gpus`` accelerators: as many replicas as fit (at least one). Offline work
    comes from one shared backlog, ``offline_in_flight`` per replica (default: two batches'
    worth, as a job runner keeps its server fed)."""
    replicas = max(1, gpus // engine.gpus)
    if offline_in_flight is None:
        offline_in_flight = 2 * engine.capacity.max_slots
    return Pool(replicas=replicas, scheduler=sched or scheduler(cfg, engine),
                batching=batching, offline_in_flight=offline_in_flight,
                price_per_gpu_hour=cfg.price_per_gpu_hour)


def online_load(cfg: PlanConfig, trace: TracePath, *, rate: float | None = None,
                duration_s: float | None = None) -> tuple[TraceRequest, ...]:
    """The trace's requests over ``duration_s`` at ``rate`` (each defaulting to cfg's; 0:
    the whole trace at its own rate), lengths as given or scaled to cfg's maxima."""
    rate = cfg.rate if rate is None else rate
    duration = cfg.duration_s if duration_s is None else duration_s
    requests = load_trace(trace)
    scale = time_scale_for_rate(requests, rate, duration or None) if rate > 0 else 1.0
    if cfg.max_prompt_tokens or cfg.max_output_tokens:
        return tuple(scale_trace(
            requests, time_scale=scale,
            max_prompt_tokens=cfg.max_prompt_tokens or _p99(r.prompt_tokens for r in requests),
            max_output_tokens=cfg.max_output_tokens or _p99(r.output_tokens for r in requests),
            duration_s=duration or None))
    return tuple(
        dataclasses.replace(r, arrival_s=r.arrival_s / scale) for r in requests
        if not duration or r.arrival_s / scale < duration
    )


def offline_load(cfg: PlanConfig, trace: TracePath, count: int) -> tuple[TraceRequest, ...]:
    """``count`` offline requests with lengths drawn from the trace (scaled as online)."""
    if count <= 0:
        return ()
    pool_of_lengths = online_load(cfg, trace, rate=0.0, duration_s=0.0)
    return draw_lengths(pool_of_lengths, count, cfg.seed + 1)


def mean_output(requests: Sequence[TraceRequest]) -> float:
    return sum(r.output_tokens for r in requests) / max(1, len(requests))


def _p99(values: object) -> int:
    ordered = sorted(values)  # type: ignore[call-overload]
    return int(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


SATURATION_WARMUP_S = 60.0  # a saturated replica is measured after this (the first waves
SATURATION_WINDOW_S = 240.0  # of prefill), over this many virtual seconds


def saturation(cfg: PlanConfig, engine: Engine, trace: TracePath) -> tuple[float, float]:
    """(requests/s, generated tokens/s) one replica sustains on the trace's mix of lengths:
    a backlog of them that never runs out, measured after a warm-up. What 100% of a pool's
    capacity means for this traffic (long prompts make prefill, not decode, the bound, so a
    trace can saturate an engine far below its decode peak)."""
    return _saturation(cfg, engine, None if trace is None else str(trace))


@functools.lru_cache(maxsize=16)
def _saturation(cfg: PlanConfig, engine: Engine, trace: str | None) -> tuple[float, float]:
    lengths = online_load(cfg, trace, rate=0.0, duration_s=0.0)
    backlog = draw_lengths(lengths, 100 * engine.capacity.max_slots, cfg.seed + 2)
    sched = cfg.scheduler_config(None, None)

    def run(seconds: float) -> tuple[int, float]:
        work = Workload((), backlog, duration_s=seconds, drain_s=0.0, seed=cfg.seed)
        result = Simulation(engine, Pool(scheduler=sched,
                                         offline_in_flight=2 * engine.capacity.max_slots),
                            work).run()
        return result.offline_completed, result.offline.tokens

    done_warm, tokens_warm = run(SATURATION_WARMUP_S)
    done, tokens = run(SATURATION_WARMUP_S + SATURATION_WINDOW_S)
    return (done - done_warm) / SATURATION_WINDOW_S, (tokens - tokens_warm) / SATURATION_WINDOW_S
