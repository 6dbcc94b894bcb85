"""A TensorRT-LLM executor alone, on one GPU: decode throughput by concurrency, in one run
(ratios, not absolute goals: these machines are noisy). A ``trtllm`` engine with a draft runs
twice, plain (the target engine alone) and draft-target; a ``trtllm-llmapi`` engine runs as its
manifest says (with TensorRT-LLM's drafter when it has one).

Closed loop at each concurrency C: C greedy requests in flight, a new one as soon as one ends,
until ``--requests`` have finished. Distinct prompts (no prefix reuse between requests). One
executor at a time: each is shut down, which frees its GPU memory, before the next opens.
Prints a table and, with ``--json-out``, the numbers. Needs ``tensorrt_llm`` and a GPU.

    python -m benchmarks.bench_gpu --engine /engines/llama-int8 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, Executor, SamplingParams
from server.executor.factory import load_executor

WORDS = ("river", "stone", "light", "garden", "window", "market", "paper", "silver", "engine",
         "ocean", "forest", "music", "history", "machine", "winter", "language", "number",
         "circle", "orange", "letter")


@dataclass(frozen=True, slots=True)
class Row:
    variant: str
    concurrency: int
    requests: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    acceptance: float | None  # accepted / proposed draft tokens


def prompts(tokenizer: EngineTokenizer, n: int, length: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(length)))
        out.append(tuple(ids[:length]))
    return out


def run_closed_loop(ex: Executor, work: list[tuple[int, ...]], concurrency: int,
                    max_tokens: int) -> tuple[float, list[float], list[float], float | None]:
    """(tokens/s, TTFTs s, TPOTs s, acceptance) for all of work at the given concurrency."""
    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    counts: dict[int, int] = {}
    ttfts: list[float] = []
    tpots: list[float] = []
    proposed = accepted = 0
    next_id = 0
    start = time.perf_counter()
    while next_id < len(work) or sent:
        while len(sent) < concurrency and next_id < len(work):
            ex.enqueue(ExecRequest(next_id, work[next_id],
                                   SamplingParams(temperature=0.0, max_tokens=max_tokens)))
            sent[next_id] = time.perf_counter()
            next_id += 1
        for d in ex.poll(0.05):
            now = time.perf_counter()
            counts[d.request_id] = counts.get(d.request_id, 0) + len(d.token_ids)
            proposed += d.draft_tokens_proposed
            accepted += d.draft_tokens_accepted
            if d.token_ids and d.request_id not in first:
                first[d.request_id] = now
                ttfts.append(now - sent[d.request_id])
            if d.finish is not None:
                began = first.get(d.request_id, now)
                if counts[d.request_id] > 1:
                    tpots.append((now - began) / (counts[d.request_id] - 1))
                del sent[d.request_id]
    elapsed = time.perf_counter() - start
    return (sum(counts.values()) / elapsed, ttfts, tpots,
            accepted / proposed if proposed else None)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def measure(name: str, open_executor: Callable[[], Executor], args: argparse.Namespace,
            work: list[tuple[int, ...]]) -> list[Row]:
    """Opens one executor, runs every concurrency on it, and shuts it down (releasing its GPU
    memory) before returning, so the next variant starts on a free GPU."""
    ex = open_executor()
    rows = []
    try:
        run_closed_loop(ex, work[:4], 4, 8)  # warm-up: first-call CUDA work out of the numbers
        for c in args.concurrency:
            tps, ttfts, tpots, acc = run_closed_loop(ex, work, c, args.max_tokens)
            rows.append(Row(name, c, len(work), tps, pct(ttfts, 0.5), pct(ttfts, 0.99),
                            statistics.median(tpots) * 1000 if tpots else float("nan"), acc))
    finally:
        ex.shutdown()
    return rows


def variants(engine: Path, manifest: Manifest) -> list[tuple[str, Callable[[], Executor]]]:
    """(name, opener) per executor to measure on this engine."""
    if manifest.backend == "trtllm-llmapi":
        spec = manifest.speculative
        name = "llmapi" if spec is None else f"llmapi {spec.mode} K={spec.max_draft_len}"
        return [(name, lambda: load_executor(engine))]
    from server.executor.trtllm.open import open_trtllm

    out: list[tuple[str, Callable[[], Executor]]] = [
        ("plain", lambda: open_trtllm(engine, dataclasses.replace(manifest, draft=None)))]
    if manifest.draft is not None:
        out.append((f"draft K={manifest.draft.max_draft_len}", lambda: load_executor(engine)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, type=Path)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8, 32])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    manifest = Manifest.load(args.engine)
    tokenizer = EngineTokenizer.load(args.engine, manifest)
    work = prompts(tokenizer, args.requests, args.prompt_tokens, args.seed)
    rows = [row for name, opener in variants(args.engine, manifest)
            for row in measure(name, opener, args, work)]
    print(f"engine {args.engine} ({manifest.name}, {manifest.quantization.weights}, kv "
          f"{manifest.quantization.kv_cache_dtype}) on {platform.node()}; "
          f"{args.requests} requests, prompt {args.prompt_tokens}, output <= {args.max_tokens}")
    print(f"{'variant':<24} {'C':>4} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'accept':>7}")
    for r in rows:
        acc = "-" if r.acceptance is None else f"{r.acceptance:.2f}"
        print(f"{r.variant:<24} {r.concurrency:>4} {r.tokens_per_s:>9.1f} {r.ttft_p50_ms:>8.1f}m"
              f" {r.ttft_p99_ms:>8.1f}m {r.tpot_p50_ms:>8.2f}m {acc:>7}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
