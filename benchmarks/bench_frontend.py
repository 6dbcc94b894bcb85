"""Front-end ceiling: how many requests/s and streamed tokens/s the SDK and the service move
when the executor is not the bottleneck (the tiny random model, few tokens per request, many
slots). Client and server run on one host, in separate processes.

Compares, in one run, the SDK over one multiplexed ``Session`` stream against the same load
over one ``Generate`` call per request (``transport="unary"``), for a max-tokens-1 flood and for
short streams. Goal: >= 3,000 req/s and >= 50,000 streamed tokens/s over Session.

    python -m benchmarks.bench_frontend                 # builds the tiny engine in a temp dir
    python -m benchmarks.bench_frontend --target HOST:PORT --json-out frontend.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from client.aio import AsyncClient
from client.bench.local_server import LocalServer
from client.errors import BackfillError
from client.types import SamplingParams

GOAL_REQ_S = 3000.0
GOAL_TOK_S = 50000.0


@dataclass(frozen=True, slots=True)
class FloodResult:
    transport: str
    max_tokens: int
    in_flight: int
    requests: int
    seconds: float
    tokens: int
    chunks: int
    errors: int  # requests that failed (counted, not retried)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds


async def flood(
    target: str, transport: str, requests: int, max_tokens: int, in_flight: int, vocab: int
) -> FloodResult:
    """``in_flight`` workers send ``requests`` requests back to back; counts streamed tokens."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    remaining = requests
    tokens = chunks = errors = 0

    async def worker(client: AsyncClient, seed: int) -> None:
        nonlocal remaining, tokens, chunks, errors
        prompt = [1 + (seed * 7 + i) % (vocab - 1) for i in range(4)]
        while remaining > 0:
            remaining -= 1
            try:
                async for chunk in client.generate(token_ids=prompt, sampling=sampling):
                    tokens += len(chunk.token_ids)
                    chunks += 1
            except BackfillError:
                errors += 1

    async with AsyncClient(target, transport=transport) as client:  # type: ignore[arg-type]
        await client.complete(token_ids=[1, 2], sampling=sampling)  # connect, open the stream
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, i) for i in range(in_flight)))
        seconds = time.perf_counter() - start
    return FloodResult(transport, max_tokens, in_flight, requests, seconds, tokens, chunks, errors)


def build_engine(slots: int) -> Path:
    from engine_builder.tiny import build_tiny_engine

    out = Path(tempfile.mkdtemp(prefix="bench-frontend-")) / "tiny"
    return build_tiny_engine(out, max_batch_size=slots)


def table(results: list[FloodResult]) -> str:
    head = (f"{'transport':<9} {'max_tok':>7} {'in-flight':>9} {'requests':>8} {'seconds':>8} "
            f"{'req/s':>8} {'tokens/s':>9} {'tok/chunk':>9} {'errors':>6}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.transport:<9} {r.max_tokens:>7} {r.in_flight:>9} {r.requests:>8} "
            f"{r.seconds:>8.2f} {r.req_per_s:>8.0f} {r.tok_per_s:>9.0f} "
            f"{r.tokens / max(1, r.chunks):>9.2f} {r.errors:>6}"
        )
    return "\n".join(rows)


async def run_all(target: str, args: argparse.Namespace) -> list[FloodResult]:
    async with AsyncClient(target) as client:
        vocab = (await client.list_models())[0].vocab_size
    plans = [
        ("session", args.requests, 1),
        ("unary", args.unary_requests, 1),
        ("session", args.requests, args.max_tokens),
        ("unary", args.unary_requests, args.max_tokens),
    ]
    results = []
    for transport, n, max_tokens in plans:
        print(f"{transport} x{n}, max_tokens {max_tokens} ...", file=sys.stderr, flush=True)
        results.append(await flood(target, transport, n, max_tokens, args.in_flight, vocab))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_frontend", description=__doc__)
    p.add_argument("--target", default=None, help="a running server (default: start one)")
    p.add_argument("--requests", type=int, default=20000, help="requests per Session run")
    p.add_argument("--unary-requests", type=int, default=5000, help="requests per unary run")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per streamed request")
    p.add_argument("--in-flight", type=int, default=1024, help="concurrent requests")
    p.add_argument("--slots", type=int, default=256, help="batch slots of the tiny engine")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; client and server in separate processes")
    if args.target:
        results = asyncio.run(run_all(args.target, args))
    else:
        engine = build_engine(args.slots)
        print(f"engine: tiny random Llama, {args.slots} slots ({engine})")
        with LocalServer(engine, "--metrics-port", "-1", "--max-online-queue",
                         str(max(1024, 2 * args.in_flight))) as server:
            results = asyncio.run(run_all(server.address, args))
    print(table(results))
    best = [r for r in results if r.transport == "session"]
    req_ok = max(r.req_per_s for r in best) >= GOAL_REQ_S
    tok_ok = max(r.tok_per_s for r in best) >= GOAL_TOK_S
    print(f"goal >= {GOAL_REQ_S:.0f} req/s over Session: {'PASS' if req_ok else 'FAIL'}")
    print(f"goal >= {GOAL_TOK_S:.0f} streamed tokens/s over Session: "
          f"{'PASS' if tok_ok else 'FAIL'}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump([asdict(r) | {"req_per_s": r.req_per_s, "tok_per_s": r.tok_per_s}
                       for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
