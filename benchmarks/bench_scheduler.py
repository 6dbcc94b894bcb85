"""Backfill against the baselines, in one run, on one engine: online traffic replayed from the
Azure conversation trace (sped up and length-scaled to the engine) plus an offline backlog.

Variants (a fresh server each, same online arrivals):
  online-only   the trace alone (policy backfill; no offline work to place)
  offline-only  the backlog alone: what the engine does when full
  fcfs          both, one first-come-first-served queue (server --policy fcfs)
  backfill      both, --policy backfill --offline-reserve 0.1 --preemption recompute

Goals (printed PASS/FAIL): backfill occupancy >= 90%; backfill online TTFT p99 <= 1.25x
online-only's; backfill offline tokens/s >= 80% of what online-only left unused, where unused =
offline-only tokens/s - online-only tokens/s (the engine's full rate less what online used).

The goals compare variants, so they are ratios; on a shared, noisy host a variant's throughput
drifts by 10-20% between minutes. ``--rounds N`` runs online-only, offline-only and backfill N
times, interleaved (fcfs once), computes each goal's ratio within a round, and judges the median
round's ratio. Without ``--online-rate`` the online rate is ``--online-share`` of a short
saturation probe, which moves with the host's speed; give the rate to compare runs.

    python -m benchmarks.bench_scheduler --engine tiny --duration 20      # quick
    python -m benchmarks.bench_scheduler --duration 45 --json-out sched.json   # default engine
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from client.aio import AsyncClient
from client.bench.command import TraceLoad, add_trace_argument, pick_model
from client.bench.loadgen import LoadSpec, run_load, saturated_rate
from client.bench.local_server import LocalServer
from client.bench.report import Summary, format_table, plot, summarize, write_json
from client.bench.trace import length_pool, trace_label
from client.types import ModelInfo, Tier

PRICE_PER_HOUR = 2.0  # stated, $ per accelerator-hour


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    server_args: tuple[str, ...]
    online: bool
    offline: bool


VARIANTS = (
    Variant("online-only", ("--policy", "backfill"), online=True, offline=False),
    Variant("offline-only", ("--policy", "backfill"), online=False, offline=True),
    Variant("fcfs", ("--policy", "fcfs"), online=True, offline=True),
    Variant(
        "backfill",
        ("--policy", "backfill", "--offline-reserve", "0.1", "--preemption", "recompute"),
        online=True,
        offline=True,
    ),
)


def resolve_engine(engine: str) -> Path:
    if engine == "tiny":
        from engine_builder.tiny import build_tiny_engine

        return build_tiny_engine(Path(tempfile.mkdtemp(prefix="bench-sched-")) / "tiny")
    if engine == "default":
        from engine_builder.default import ensure_default_engine

        return ensure_default_engine()
    return Path(engine)


def server_args(variant: Variant) -> tuple[str, ...]:
    return (*variant.server_args, "--metrics-port", "-1", "--max-online-queue", "8192",
            "--price-per-hour", str(PRICE_PER_HOUR))


async def plan_load(address: str, args: argparse.Namespace) -> tuple[ModelInfo, LoadSpec, float]:
    """The shared load: online arrivals at ``--online-share`` of the rate the engine sustains
    for online-sized requests (a short saturation probe), and the offline backlog."""
    lengths = tuple(length_pool(args.max_prompt_tokens, args.max_output_tokens, args.trace))
    async with AsyncClient(address) as client:
        model = await pick_model(client)
        rate = args.online_rate or args.online_share * await saturated_rate(
            client, model.vocab_size, lengths, model.max_batch_size
        )
    online = TraceLoad(path=args.trace, duration_s=args.duration,
                       max_prompt_tokens=args.max_prompt_tokens,
                       max_output_tokens=args.max_output_tokens, rate=rate).arrivals()
    backlog = args.offline_backlog or min(5000, 100 * model.max_batch_size)
    spec = LoadSpec(
        duration_s=args.duration,
        vocab_size=model.vocab_size,
        online=online,
        lengths=lengths,
        offline_backlog=backlog,
        offline_lengths=tuple(
            length_pool(args.max_prompt_tokens, args.offline_output_tokens, args.trace)
        ),
        seed=args.seed,
    )
    return model, spec, rate


async def run_variant(address: str, variant: Variant, spec: LoadSpec) -> Summary:
    spec = replace(
        spec,
        online=spec.online if variant.online else (),
        offline_backlog=spec.offline_backlog if variant.offline else 0,
    )
    async with AsyncClient(address) as client:
        result = await run_load(client, spec)
    return summarize(variant.name, result, price_per_hour=PRICE_PER_HOUR)


GOAL_VARIANTS = ("online-only", "offline-only", "backfill")


def check_goals(by_name: dict[str, Summary]) -> list[tuple[str, bool, str, float]]:
    """(goal, met, detail, score) per goal; score orders rounds from worst to best."""
    online_only, offline_only, backfill = (by_name[name] for name in GOAL_VARIANTS)
    occ = backfill.occupancy or 0.0
    base_p99 = online_only.tier(Tier.ONLINE).ttft_ms[2]
    bf_p99 = backfill.tier(Tier.ONLINE).ttft_ms[2]
    ratio = (bf_p99 / base_p99) if bf_p99 is not None and base_p99 else float("inf")
    unused = max(0.0, offline_only.tokens_per_s - online_only.tokens_per_s)
    offline_tps = backfill.tier(Tier.OFFLINE).tokens_per_s
    share = offline_tps / unused if unused > 0 else float("inf")
    return [
        ("backfill slot occupancy >= 90%", occ >= 0.90, f"{occ:.0%}", occ),
        ("online TTFT p99 <= 1.25x online-only", ratio <= 1.25,
         f"{_ms(bf_p99)} vs {_ms(base_p99)} = {ratio:.2f}x (server-timed: "
         f"{_ms(backfill.tier(Tier.ONLINE).server_ttft_ms[2])} vs "
         f"{_ms(online_only.tier(Tier.ONLINE).server_ttft_ms[2])})", -ratio),
        ("offline tok/s >= 80% of unused", share >= 0.80,
         f"{offline_tps:.0f} of {unused:.0f} tok/s unused = {share:.0%}", share),
    ]


def median_round(
    checks: list[list[tuple[str, bool, str, float]]],
) -> list[tuple[str, bool, str, float]]:
    """Per goal, the round with the median score (the lower middle one for an even count)."""
    return [
        sorted(per_goal, key=lambda c: c[3])[(len(per_goal) - 1) // 2]
        for per_goal in zip(*checks, strict=True)
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scheduler",
                                description=__doc__.split("\n")[0])
    p.add_argument("--engine", default="default", help="default | tiny | an engine directory")
    add_trace_argument(p)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per variant")
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--max-output-tokens", type=int, default=16)
    p.add_argument("--offline-output-tokens", type=int, default=32)
    p.add_argument("--offline-backlog", type=int, default=0, help="0: 100 per slot (max 5000)")
    p.add_argument("--online-share", type=float, default=0.3,
                   help="online rate as a share of the saturated request rate")
    p.add_argument("--online-rate", type=float, default=None, help="or give the rate (req/s)")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the goal variants, interleaved; goals use the median round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    engine = resolve_engine(args.engine)
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    rounds: list[list[Summary]] = []
    spec: LoadSpec | None = None
    model: ModelInfo | None = None
    rate = 0.0
    for index in range(args.rounds):
        summaries: list[Summary] = []
        for variant in chosen:
            if index > 0 and variant.name not in GOAL_VARIANTS:
                continue
            with LocalServer(engine, *server_args(variant)) as server:
                if spec is None:
                    model, spec, rate = asyncio.run(plan_load(server.address, args))
                    print(f"load: {len(spec.online)} online requests over {args.duration:g}s "
                          f"(trace at mean {rate:.2f} req/s), offline backlog "
                          f"{spec.offline_backlog}", file=sys.stderr)
                print(f"running {variant.name} (round {index + 1}/{args.rounds}) ...",
                      file=sys.stderr, flush=True)
                summaries.append(asyncio.run(run_variant(server.address, variant, spec)))
        rounds.append(summaries)
    assert model is not None
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; engine {model.name} "
          f"({model.backend}, {model.max_batch_size} slots); price ${PRICE_PER_HOUR:.2f}/h; "
          f"{args.duration:g}s per variant; online: {trace_label(args.trace)} at {rate:.2f} "
          "req/s, "
          f"prompt <= {args.max_prompt_tokens}, output <= {args.max_output_tokens} tokens; "
          f"offline output <= {args.offline_output_tokens} tokens"
          + (f"; {args.rounds} rounds" if args.rounds > 1 else ""))
    checks: list[list[tuple[str, bool, str, float]]] = []
    for index, summaries in enumerate(rounds):
        if args.rounds > 1:
            print(f"round {index + 1}:")
        print(format_table(summaries))
        by_name = {s.name: s for s in summaries}
        if set(GOAL_VARIANTS) <= by_name.keys():
            checks.append(check_goals(by_name))
            if args.rounds > 1:
                for goal, ok, detail, _ in checks[-1]:
                    print(f"  {'pass' if ok else 'fail'}  {goal}: {detail}")
    if checks:
        if args.rounds > 1:
            print(f"goals, median of {len(checks)} rounds:")
        for goal, ok, detail, _ in median_round(checks):
            print(f"{'PASS' if ok else 'FAIL'}  {goal}: {detail}")
    if args.json_out:
        write_json([s for summaries in rounds for s in summaries], args.json_out,
                   engine=str(engine), rate=rate, price_per_hour=PRICE_PER_HOUR,
                   rounds=args.rounds)
    if args.plot and not plot(rounds[0], args.plot):
        print("--plot skipped: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
