"""Backfill against the baselines, in one run, on one engine, at one or more online rates:
online traffic replayed from a trace (the shipped Azure conversation trace by default, sped up
and length-scaled to the engine) plus an offline backlog.

Variants per rate (a fresh server each, the same online arrivals):
  online-only       the trace alone: the latency online traffic gets on an engine of its own
  offline-only      the backlog alone, without a TPOT budget: what the engine does when full
  offline-only+slo  the backlog alone with the TPOT budget set (no online work: no bound)
  backfill          both, with the TPOT SLO at 1.25x online-only's TPOT p99 (TTFT SLO at
                    1.25x its TTFT p99): the goal variant
  backfill-3x       both, with the TPOT SLO relaxed to 3x online-only's TPOT p99
  sweep             both, at more SLO multipliers, for the trade-off plot (offline tokens/s
                    against online TPOT p99)
  backfill-no-budget  both, with no budget at all: the most offline work the engine does
                    beside the online load, the ceiling of the offline shares (in the sweep
                    and its plot; it runs as long as the goal variants, so that the goals can
                    show it)
  fcfs              both, one first-come-first-served queue (--fcfs; not part of the goals)

Goals (PASS/FAIL, see slo_goals.py): online TTFT and TPOT p99 <= 1.25x online-only; >= 99% of
online requests meet both SLOs; offline tokens/s >= 50% of what online-only left unused (>= 80%
at 3x), unused = offline-only tokens/s - online-only tokens/s; offline-only with the budget
within 5% of offline-only; slot occupancy >= 90%; median step-time prediction error <= 15%.

Goal variants run ``--duration`` seconds, at least long enough for ``--min-online-requests``
online requests (a p99 of fewer is close to the maximum), and so does backfill-no-budget;
offline-only and the other sweep variants run ``--short-duration``. ``--rounds N`` repeats the
goal variants, interleaved, and judges each goal by its median round (a shared host's speed
drifts between minutes).

    python -m benchmarks.bench_scheduler --engine tiny --rates 4 --duration 20 \\
        --min-online-requests 0 --short-duration 10 --sweep 2          # quick
    python -m benchmarks.bench_scheduler --rates 1.5,2.85 --plot slo.png   # the README's run
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.slo_goals import Run, check_goals, format_sweep, median_round, plot_sweep
from client.aio import AsyncClient
from client.bench.command import TraceLoad, add_trace_argument, pick_model
from client.bench.loadgen import LoadSpec, run_load
from client.bench.local_server import LocalServer
from client.bench.report import format_table, summarize, write_json
from client.bench.trace import length_pool, trace_label
from client.types import ModelInfo, Tier
from server.executor.cpu.blas import default_threads

PRICE_PER_HOUR = 2.0  # stated, $ per accelerator-hour
# The load's settings, recorded in --json-out so that a run can be replayed (the capacity
# planner's calibration predicts a run from them).
LOAD_ARGS = ("trace", "max_prompt_tokens", "max_output_tokens", "offline_output_tokens",
             "offline_backlog", "seed", "duration", "min_online_requests", "short_duration",
             "sweep", "fcfs", "rounds")
GOAL_MULTIPLIER = 1.25
RELAXED_MULTIPLIER = 3.0
NO_BUDGET = "backfill-no-budget"


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    server_args: tuple[str, ...]
    online: bool
    offline: bool
    long: bool  # runs --duration (goal latency figures), else --short-duration
    multiplier: float | None = None  # TPOT SLO over online-only's TPOT p99; None: no budget


def resolve_engine(engine: str) -> Path:
    if engine == "tiny":
        from engine_builder.tiny import build_tiny_engine

        return build_tiny_engine(Path(tempfile.mkdtemp(prefix="bench-sched-")) / "tiny")
    if engine == "default":
        from engine_builder.default import ensure_default_engine

        return ensure_default_engine()
    return Path(engine)


def slo_args(base: Run | None, multiplier: float | None) -> tuple[str, ...]:
    """Server flags for a TPOT SLO at ``multiplier`` x online-only's TPOT p99 and the same
    per-step slowdown bound (what the multiplier asks of online tokens, step by step), and a
    TTFT SLO at 1.25x online-only's TTFT p99 (judged only); no budget at all without a
    multiplier."""
    if multiplier is None or base is None:
        return ("--tpot-slo-ms", "-1", "--ttft-slo-ms", "-1")
    online = base.summary.tier(Tier.ONLINE)
    tpot, ttft = online.tpot_ms[2] or 1.0, online.ttft_ms[2] or 1.0
    return ("--tpot-slo-ms", f"{multiplier * tpot:.1f}",
            "--max-online-slowdown", f"{max(1.0, multiplier):g}",
            "--ttft-slo-ms", f"{GOAL_MULTIPLIER * ttft:.1f}")


def goal_variants(base: Run) -> list[Variant]:
    return [
        Variant("offline-only", slo_args(None, None), False, True, False),
        Variant("offline-only+slo", slo_args(base, GOAL_MULTIPLIER), False, True, False,
                GOAL_MULTIPLIER),
        Variant("backfill", slo_args(base, GOAL_MULTIPLIER), True, True, True, GOAL_MULTIPLIER),
        Variant("backfill-3x", slo_args(base, RELAXED_MULTIPLIER), True, True, True,
                RELAXED_MULTIPLIER),
    ]


def sweep_variants(base: Run, multipliers: list[float], fcfs: bool) -> list[Variant]:
    out = [Variant(f"backfill-{m:g}x", slo_args(base, m), True, True, False, m)
           for m in multipliers]
    out.append(Variant(NO_BUDGET, slo_args(None, None), True, True, True))
    if fcfs:
        out.append(Variant("fcfs", ("--policy", "fcfs", *slo_args(None, None)), True, True,
                           False))
    return out


def server_args(variant: Variant) -> tuple[str, ...]:
    policy = () if "--policy" in variant.server_args else ("--policy", "backfill")
    return (*policy, *variant.server_args, "--metrics-port", "-1", "--max-online-queue", "8192",
            "--price-per-hour", str(PRICE_PER_HOUR))


async def plan_load(
    address: str, args: argparse.Namespace, rate: float, duration: float
) -> tuple[ModelInfo, LoadSpec]:
    lengths = tuple(length_pool(args.max_prompt_tokens, args.max_output_tokens, args.trace))
    async with AsyncClient(address) as client:
        model = await pick_model(client)
    online = TraceLoad(path=args.trace, duration_s=duration,
                       max_prompt_tokens=args.max_prompt_tokens,
                       max_output_tokens=args.max_output_tokens, rate=rate).arrivals()
    backlog = args.offline_backlog or min(5000, 100 * model.max_batch_size)
    spec = LoadSpec(
        duration_s=duration,
        vocab_size=model.vocab_size,
        online=online,
        lengths=lengths,
        offline_backlog=backlog,
        offline_lengths=tuple(
            length_pool(args.max_prompt_tokens, args.offline_output_tokens, args.trace)
        ),
        seed=args.seed,
    )
    return model, spec


async def run_variant(address: str, variant: Variant, spec: LoadSpec, duration: float,
                      base: Run | None) -> Run:
    spec = replace(
        spec,
        duration_s=duration,
        online=tuple(r for r in spec.online if r.arrival_s < duration) if variant.online else (),
        offline_backlog=spec.offline_backlog if variant.offline else 0,
    )
    async with AsyncClient(address) as client:
        result = await run_load(client, spec)
        stats = await client.stats()
    summary = summarize(variant.name, result, price_per_hour=PRICE_PER_HOUR)
    return Run.of(summary, result.records, stats, variant.multiplier, base)


def run_one(engine: Path, variant: Variant, spec: LoadSpec, duration: float,
            base: Run | None, label: str) -> Run:
    print(f"running {variant.name} ({label}) ...", file=sys.stderr, flush=True)
    with LocalServer(engine, *server_args(variant)) as server:
        return asyncio.run(run_variant(server.address, variant, spec, duration, base))


def bench_rate(
    engine: Path, args: argparse.Namespace, rate: float
) -> tuple[dict[str, object], list[Run], list[Run]]:
    """Every variant at one online rate; prints the tables and goals. Returns the JSON part,
    the first round's goal runs and the sweep."""
    duration = max(args.duration, math.ceil(args.min_online_requests / rate))
    online_only = Variant("online-only", slo_args(None, None), True, False, True)
    with LocalServer(engine, *server_args(online_only)) as server:
        model, spec = asyncio.run(plan_load(server.address, args, rate, duration))
    print(f"rate {rate:g} req/s: {len(spec.online)} online requests over {duration:g}s, "
          f"offline backlog {spec.offline_backlog}", file=sys.stderr)
    rounds: list[list[Run]] = []
    sweep: list[Run] = []
    for index in range(args.rounds):
        label = f"rate {rate:g}, round {index + 1}/{args.rounds}"
        base = run_one(engine, online_only, spec, duration, None, label)
        runs = [base]
        for variant in goal_variants(base):
            length = duration if variant.long else args.short_duration
            runs.append(run_one(engine, variant, spec, length, base, label))
        rounds.append(runs)
        if index == 0:
            for variant in sweep_variants(base, args.sweep, args.fcfs):
                length = duration if variant.long else args.short_duration
                sweep.append(run_one(engine, variant, spec, length, base, label))
    print(f"\nrate {rate:g} req/s (engine {model.name}, {model.backend}, "
          f"{model.max_batch_size} slots; goal variants and no budget {duration:g}s, others "
          f"{args.short_duration:g}s)")
    ceiling = next((r for r in sweep if r.summary.name == NO_BUDGET), None)
    checks = []
    for index, runs in enumerate(rounds):
        if args.rounds > 1:
            print(f"round {index + 1}:")
        print(format_table([r.summary for r in runs]))
        checks.append(check_goals({r.summary.name: r for r in runs}, ceiling))
        if args.rounds > 1:
            for goal, ok, detail, _ in checks[-1]:
                print(f"  {'pass' if ok else 'fail'}  {goal}: {detail}")
    print(format_table([r.summary for r in sweep]))
    print(format_sweep(rounds[0], sweep))
    if args.rounds > 1:
        print(f"goals, median of {len(checks)} rounds:")
    for goal, ok, detail, _ in median_round(checks):
        print(f"{'PASS' if ok else 'FAIL'}  {goal}: {detail}")
    return {"rate": rate, "duration_s": duration, "offline_backlog": spec.offline_backlog,
            "rounds": [[r.to_json() for r in runs] for runs in rounds],
            "sweep": [r.to_json() for r in sweep]}, rounds[0], sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scheduler",
                                description=__doc__.split("\n")[0])
    p.add_argument("--engine", default="default", help="default | tiny | an engine directory")
    add_trace_argument(p)
    p.add_argument("--rates", default="1.5", help="online rates (req/s), comma-separated")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds per goal variant (at least --min-online-requests / rate)")
    p.add_argument("--min-online-requests", type=int, default=300)
    p.add_argument("--short-duration", type=float, default=60.0,
                   help="seconds per offline-only and sweep variant")
    p.add_argument("--sweep", default="1.0,1.5,2.0,5.0",
                   help="more TPOT SLO multipliers for the trade-off (besides 1.25 and 3)")
    p.add_argument("--fcfs", action="store_true", help="also run the one-queue FCFS baseline")
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--max-output-tokens", type=int, default=16)
    p.add_argument("--offline-output-tokens", type=int, default=32)
    p.add_argument("--offline-backlog", type=int, default=0, help="0: 100 per slot (max 5000)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the goal variants, interleaved; goals use the median round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None, help="PNG of the trade-off (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    args.sweep = [float(x) for x in args.sweep.split(",") if x.strip()]
    engine = resolve_engine(args.engine)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; engine {engine}; price "
          f"${PRICE_PER_HOUR:.2f}/h; online: {trace_label(args.trace)}, prompt <= "
          f"{args.max_prompt_tokens}, output <= {args.max_output_tokens} tokens; offline "
          f"output <= {args.offline_output_tokens} tokens; CPU threads {default_threads()}")
    results: list[dict[str, object]] = []
    curves: list[tuple[float, list[Run], list[Run]]] = []
    for rate in rates:
        data, goal_runs, sweep = bench_rate(engine, args, rate)
        results.append(data)
        curves.append((rate, goal_runs, sweep))
    if args.json_out:
        # no_budget_long: the no-budget variant ran the goal variants' window (files
        # without it ran it --short-duration), for the planner's calibration to replay.
        load = {**{k: getattr(args, k) for k in LOAD_ARGS}, "no_budget_long": True}
        write_json([], args.json_out, engine=str(engine), price_per_hour=PRICE_PER_HOUR,
                   load=load, rates=results)
    if args.plot and not plot_sweep(curves, args.plot):
        print("--plot skipped: matplotlib is not installed (pip install '.[bench]')",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
