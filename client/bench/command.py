"""``python -m client bench``: replay a trace (default), Poisson arrivals (``--rate``) or a
closed-loop concurrency sweep (``--concurrency 1,8,64``), optionally with an offline backlog,
then print the table and write JSON / a PNG.

    python -m client bench --target HOST:PORT --trace-rate 5 --duration 30 \\
        --max-prompt-tokens 128 --max-output-tokens 32 --offline-backlog 500 --json-out b.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from client.aio import AsyncClient
from client.bench.loadgen import LoadSpec, run_load
from client.bench.report import Summary, format_table, plot, summarize, write_json
from client.bench.trace import (
    SHIPPED_TRACE_NAME,
    TracePath,
    TraceRequest,
    length_pool,
    load_trace,
    poisson_arrivals,
    scale_trace,
    time_scale_for_rate,
)
from client.credentials import cli_credentials
from client.types import ModelInfo

DEFAULT_PRICE_PER_HOUR = 2.0  # a stated price, $ per accelerator-hour, for cost per 1M tokens


@dataclass(frozen=True, slots=True)
class TraceLoad:
    """How to turn the trace into online arrivals on a given engine."""

    path: TracePath = None  # None: the shipped trace
    duration_s: float = 30.0
    max_prompt_tokens: int = 128
    max_output_tokens: int = 32
    time_scale: float | None = None  # None: from rate
    rate: float | None = None  # mean requests/s wanted (picks time_scale)
    start_s: float = 0.0

    def arrivals(self) -> tuple[TraceRequest, ...]:
        trace = load_trace(self.path)
        scale = self.time_scale
        if scale is None:
            scale = time_scale_for_rate(trace, self.rate, self.duration_s) if self.rate else 1.0
        return tuple(
            scale_trace(
                trace,
                time_scale=scale,
                max_prompt_tokens=self.max_prompt_tokens,
                max_output_tokens=self.max_output_tokens,
                start_s=self.start_s,
                duration_s=self.duration_s,
            )
        )


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_argument(p)
    p.add_argument("--time-scale", type=float, default=None, help="trace speed-up factor")
    p.add_argument("--trace-rate", type=float, default=None, help="scale trace to this req/s")
    p.add_argument("--trace-start", type=float, default=0.0, help="skip this many scaled s")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--concurrency", default=None, help="closed-loop sweep, e.g. 1,8,64")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-output-tokens", type=int, default=32)
    p.add_argument("--offline-backlog", type=int, default=0, help="offline requests queued")
    p.add_argument("--offline-output-tokens", type=int, default=None,
                   help="offline output cap (default: --max-output-tokens)")
    p.add_argument("--offline-via", choices=["session", "batch"], default="session")
    p.add_argument("--deadline", type=float, default=None, help="online TTFT deadline (s)")
    p.add_argument("--price-per-hour", type=float, default=DEFAULT_PRICE_PER_HOUR)
    p.add_argument("--transport", choices=["session", "unary"], default="session")
    p.add_argument("--model", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write the figures as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")


def add_trace_argument(p: argparse.ArgumentParser) -> None:
    """``--trace PATH``, the same for every command that replays a trace."""
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="trace CSV in the Azure LLM inference trace format "
                        f"(TIMESTAMP,ContextTokens,GeneratedTokens; default: "
                        f"{SHIPPED_TRACE_NAME}, shipped with the package)")


def default_prompt_cap(model: ModelInfo, max_output_tokens: int) -> int:
    """Prompts that fit the engine: at most 256 and half of what the output leaves."""
    return max(1, min(256, (model.max_seq_len - max_output_tokens) // 2))


def _runs(args: argparse.Namespace, model: ModelInfo) -> list[tuple[str, LoadSpec]]:
    max_prompt = args.max_prompt_tokens or default_prompt_cap(model, args.max_output_tokens)
    pool = tuple(length_pool(max_prompt, args.max_output_tokens, args.trace))
    offline_pool: tuple[TraceRequest, ...] = ()
    if args.offline_output_tokens:
        offline_pool = tuple(length_pool(max_prompt, args.offline_output_tokens, args.trace))
    base = {
        "duration_s": args.duration,
        "vocab_size": model.vocab_size,
        "lengths": pool,
        "offline_backlog": args.offline_backlog,
        "offline_lengths": offline_pool,
        "offline_via": args.offline_via,
        "deadline_s": args.deadline,
        "seed": args.seed,
        "model": args.model,
    }
    if args.concurrency:
        levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
        return [(f"concurrency={c}", LoadSpec(concurrency=c, **base)) for c in levels]  # type: ignore[arg-type]
    if args.rate:
        online = tuple(poisson_arrivals(args.rate, args.duration, pool, seed=args.seed))
        return [(f"poisson {args.rate:g}/s", LoadSpec(online=online, **base))]  # type: ignore[arg-type]
    load = TraceLoad(
        path=args.trace,
        duration_s=args.duration,
        max_prompt_tokens=max_prompt,
        max_output_tokens=args.max_output_tokens,
        time_scale=args.time_scale,
        rate=args.trace_rate,
        start_s=args.trace_start,
    )
    return [("trace", LoadSpec(online=load.arrivals(), **base))]  # type: ignore[arg-type]


async def pick_model(client: AsyncClient, name: str = "") -> ModelInfo:
    models = await client.list_models()
    if not models:
        raise ValueError("the server lists no models")
    return next((m for m in models if m.name == name), models[0])


async def run_bench(args: argparse.Namespace) -> int:
    credentials = cli_credentials(args.tls, args.tls_ca, args.tls_cert, args.tls_key)
    summaries: list[Summary] = []
    async with AsyncClient(
        args.target, credentials=credentials, timeout=args.timeout, transport=args.transport,
        max_message_mb=args.max_message_mb, api_key=args.api_key or None,
    ) as client:
        model = await pick_model(client, args.model)
        for name, spec in _runs(args, model):
            print(f"running {name} for {spec.duration_s:g}s ...", file=sys.stderr, flush=True)
            result = await run_load(client, spec)
            summaries.append(summarize(name, result, price_per_hour=args.price_per_hour))
    print(f"model {model.name} ({model.backend}, {model.max_batch_size} slots), "
          f"price ${args.price_per_hour:.2f}/h")
    print(format_table(summaries))
    if args.json_out:
        write_json(summaries, args.json_out, model=model.name, target=args.target)
    if args.plot and not plot(summaries, args.plot):
        print("--plot skipped: matplotlib is not installed", file=sys.stderr)
    return 0
