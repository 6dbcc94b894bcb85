"""Backfill's CPU weight formats against llama.cpp on the same GGUF, in one run.

    python -m benchmarks.bench_quant [--threads 2] [--rounds 3] [--steps 8]
        [--formats none,int8,int4,source] [--activations float32,int16,int8]
        [--llama-server PATH] [--serving-rounds 2]
        [--parts speed,steps,quality,serving] [--step-batch 32] [--step-rounds 40] [--json FILE]

Engine: the default model (SmolLM2-135M-Instruct; its GGUF is Q4_1 blocks with a Q8_0
embedding), built as fp32 (``none``), ``int8``, ``int4`` and ``source`` (the GGUF's own blocks),
the last once per ``--activations`` setting (``source/int16`` and so on: how its kernels treat
their input rows, see server/executor/cpu/activations.py; settings the host cannot run are
skipped with a message).
Tables, each variant measured in the same run, alternating, with ``--threads`` threads each:

1. decode tokens/s at batch 1, 8 and 32 (Backfill: engine steps, sampling included; llama.cpp:
   batched ``llama_decode``, one token per sequence, logits for all, sampling excluded), median
   over ``--rounds`` alternating rounds, and the ratio to llama.cpp;
   (1b) decode at ``--step-batch`` sequences with every variant taking one step in turn, for
   ``--step-rounds`` rounds: medians, and the median of the paired (same round) ratios; on a
   shared host this is the steadier comparison;
2. prefill tokens/s of one 512-token prompt;
3. resident weight bytes, greedy agreement with the fp32 engine (the oracle prompts: 8 chat
   prompts and the France question, 16 tokens each) and perplexity on a held-out text, read
   in chunks of as many tokens as the decode kernels take (so that it measures them);
4. serving: 256 chat requests of 32 output tokens (EOS ignored), 32 in flight, against
   ``python -m server`` (fp32 and source engines) and llama.cpp's ``llama-server -np 32``
   (``--llama-server`` or ``$BACKFILL_LLAMA_SERVER``; skipped with a message when absent).

llama.cpp comes from llama-cpp-python (``pip install 'backfill[bench]'``); without it its
columns are skipped with a message. The host is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.bench_cpu_engine import HELD_OUT, PROMPTS, agreement, decode_rate, perplexity
from benchmarks.llama_cpp_peer import LlamaCppPeer, llama_cpp_missing
from benchmarks.serving_load import (
    ServingResult,
    backfill_serving,
    chat_prompts,
    llama_server_serving,
)
from engine_builder.fetch import fetch_default
from engine_builder.manifest import Manifest
from engine_builder.source import expected_shapes
from server.executor.base import ExecRequest, SamplingParams
from server.executor.cpu.activations import resolve_activations
from server.executor.cpu.blas import set_thread_compute_threads
from server.executor.cpu.block_weights import KERNEL_MAX_ROWS, load_kernels
from server.executor.cpu.engine import CpuEngine
from server.executor.cpu.executor import build_engine

FORMATS = ("none", "int8", "int4", "source")
BATCHES = (1, 8, 32)
LLAMA = "llama.cpp"
FRANCE = "What is the capital of France?"
PREFILL_TOKENS = 512


def engine_dir(quant: str) -> Path:
    from engine_builder.default import ensure_default_engine

    return ensure_default_engine(quant=quant)


def prefill_rate(runner: CpuEngine, num_tokens: int, reps: int = 2) -> float:
    """Prompt tokens/s of one fresh `num_tokens` prompt (distinct each time: no cache hits)."""
    best = math.inf
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep + runner.counters.steps)
        prompt = tuple(int(t) for t in rng.integers(100, 40_000, num_tokens))
        runner.add(ExecRequest(90_000 + runner.counters.steps, prompt,
                               SamplingParams(max_tokens=1)), seed=0)
        t0 = time.perf_counter()
        while runner.has_work:
            runner.step()
            runner.drain()
        best = min(best, time.perf_counter() - t0)
    return num_tokens / best


def greedy(runner: CpuEngine, max_tokens: int = 16) -> list[list[int]]:
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    out: dict[int, list[int]] = {}
    for i, text in enumerate((*PROMPTS, FRANCE)):
        prompt = tuple(runner.tokenizer.encode(template.format(text)))
        runner.add(ExecRequest(i, prompt, SamplingParams(max_tokens=max_tokens)), seed=0)
    while runner.has_work:
        runner.step()
        for delta in runner.drain():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    return [out[i] for i in range(len(out))]


def num_weights(manifest: Manifest) -> int:
    return sum(math.prod(s) for s in expected_shapes(manifest.architecture).values())


def measure_speed(runners: dict[str, CpuEngine], peer: LlamaCppPeer | None, rounds: int,
                  steps: int) -> dict[str, dict[str, list[float]]]:
    """variant -> "b1"/"b8"/"b32"/"prefill" -> one rate per round, variants alternating."""
    rates: dict[str, dict[str, list[float]]] = {}
    variants = [*runners, *([LLAMA] if peer is not None else [])]
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for batch in BATCHES:
            for v in order:
                rate = (peer.decode_rate(batch, steps) if v == LLAMA and peer is not None
                        else decode_rate(runners[v], batch, steps).tokens_per_s)
                rates.setdefault(v, {}).setdefault(f"b{batch}", []).append(rate)
        for v in order:
            rate = (peer.prefill_rate(PREFILL_TOKENS) if v == LLAMA and peer is not None
                    else prefill_rate(runners[v], PREFILL_TOKENS))
            rates[v].setdefault("prefill", []).append(rate)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return rates


def interleaved_steps(runners: dict[str, CpuEngine], peer: LlamaCppPeer | None, batch: int,
                      rounds: int) -> dict[str, list[float]]:
    """variant -> tokens/s of each of its decode steps at ``batch`` sequences, every variant
    taking one step in turn: a round's steps lie within a second or so, so a burst of load
    from other processes lands on all of them, and each round gives a paired ratio."""
    rng = np.random.default_rng(batch)
    prompts = [tuple(int(t) for t in rng.integers(100, 40_000, 32)) for _ in range(batch)]
    for runner in runners.values():
        base = 100_000 * (1 + runner.counters.steps)
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=rounds + 4, ignore_eos=True)
            runner.add(ExecRequest(base + i, prompt, params), seed=i)
        while any(s.num_pending > 1 for s in runner.running) or runner.batcher.waiting:
            runner.step()
        runner.step()  # one warm decode step
    if peer is not None:
        peer.start_decode(batch)
        peer.decode_step()
    rates: dict[str, list[float]] = {}
    variants = [*runners, *([LLAMA] if peer is not None else [])]
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            t0 = time.perf_counter()
            if v == LLAMA and peer is not None:
                peer.decode_step()
                tokens = batch
            else:
                runners[v].step()
                tokens = runners[v].counters.last_step_tokens
            rates.setdefault(v, []).append(tokens / (time.perf_counter() - t0))
    for runner in runners.values():
        while runner.has_work:
            runner.step()
            runner.drain()
    return rates


def print_interleaved(rates: dict[str, list[float]], batch: int) -> None:
    base = rates.get(LLAMA)
    print(f"| weights | decode b{batch} tok/s (median step) | vs llama.cpp (medians) | "
          "vs llama.cpp (median of paired steps) |\n|---|---|---|---|")
    for v, steps in rates.items():
        med = float(np.median(steps))
        ratio = paired = ""
        if base is not None and v != LLAMA:
            ratio = f"{med / np.median(base):.2f}x"
            paired = f"{np.median(np.divide(steps, base)):.2f}x"
        print(f"| {v} | {med:.1f} | {ratio} | {paired} |")


def print_speed(rates: dict[str, dict[str, list[float]]]) -> None:
    keys = [f"b{b}" for b in BATCHES] + ["prefill"]
    base = rates.get(LLAMA)
    print("| weights | " + " | ".join(f"decode b{b} tok/s" for b in BATCHES)
          + f" | prefill ({PREFILL_TOKENS}) tok/s |")
    print("|---" * (len(keys) + 1) + "|")
    for v, by_key in rates.items():
        cells = []
        for k in keys:
            med = float(np.median(by_key[k]))
            ratio = "" if base is None or v == LLAMA else f" ({med / np.median(base[k]):.2f}x)"
            cells.append(f"{med:.1f}{ratio}")
        print(f"| {v} | " + " | ".join(cells) + " |")


def source_modes(requested: str) -> list[str]:
    """The --activations settings this host runs, in order, each once."""
    modes: list[str] = []
    for mode in requested.split(","):
        try:
            resolved = resolve_activations(mode)
        except ValueError as e:
            print(f"  source/{mode} skipped: {e}")
            continue
        if resolved not in modes:
            modes.append(resolved)
    return modes


def load_runners(formats: list[str], modes: list[str]) -> dict[str, CpuEngine]:
    """variant -> engine: the formats in order, source once per activation setting. The fp32
    engine always loads: it is the reference of the quality table."""
    runners = {}
    for quant in dict.fromkeys(["none", *formats]):
        path = engine_dir(quant)
        manifest = Manifest.load(path)
        for mode in modes if quant == "source" else [None]:
            name = quant if mode is None else f"source/{mode}"
            runners[name] = build_engine(path, manifest, activations=mode)[0]
    return runners


def quality_table(runners: dict[str, CpuEngine], peer: LlamaCppPeer | None,
                  manifests: dict[str, Manifest]) -> dict[str, dict[str, float]]:
    reference = greedy(runners["none"])
    params = num_weights(manifests["none"])  # every variant holds the same weights
    rows: dict[str, dict[str, float]] = {}
    print("| weights | resident weight bytes | bytes per weight | greedy agreement with fp32 "
          "| perplexity |\n|---|---|---|---|---|")
    for v, runner in runners.items():
        nbytes = runner.model.weights.nbytes
        rows[v] = {"weight_bytes": nbytes, "bytes_per_weight": nbytes / params,
                   "agreement": agreement(reference, greedy(runner)),
                   "perplexity": perplexity(runner, HELD_OUT, chunk=KERNEL_MAX_ROWS)}
        r = rows[v]
        print(f"| {v} | {nbytes / 1e6:.1f} MB | {r['bytes_per_weight']:.3f} | "
              f"{100 * r['agreement']:.0f}% | {r['perplexity']:.2f} |")
    if peer is not None:
        print(f"| {LLAMA} (llama_model_size) | {peer.weight_bytes / 1e6:.1f} MB | "
              f"{peer.weight_bytes / params:.3f} | | |")
    return rows


def serving(args: argparse.Namespace) -> dict[str, list[ServingResult]]:
    binary = args.llama_server or os.environ.get("BACKFILL_LLAMA_SERVER")
    prompts = chat_prompts(args.requests)
    gguf = fetch_default()
    variants = ["backfill fp32", "backfill source"]
    if binary and Path(binary).exists():
        variants.append("llama-server")
    else:
        print("  llama-server skipped: pass --llama-server PATH or set BACKFILL_LLAMA_SERVER "
              "(build it from llama.cpp with CMake, target llama-server)")
    results: dict[str, list[ServingResult]] = {v: [] for v in variants}
    for r in range(args.serving_rounds):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            if v == "llama-server":
                assert binary is not None
                res = llama_server_serving(binary, gguf, args.threads, prompts, args.max_tokens,
                                           args.concurrency)
            else:
                engine = engine_dir("none" if v.endswith("fp32") else "source")
                res = backfill_serving(engine, args.threads, prompts, args.max_tokens,
                                       args.concurrency)
            results[v].append(res)
            print(f"  round {r + 1} {v}: {res.tokens_per_s:.1f} tok/s, p50 {res.p50_s:.2f} s, "
                  f"p99 {res.p99_s:.2f} s, {res.completion_tokens} tokens", flush=True)
    base = results.get("llama-server")
    paired: dict[str, list[float]] = {}
    if base:
        for v, rs in results.items():
            paired[v] = [x.tokens_per_s / b.tokens_per_s for x, b in zip(rs, base, strict=True)]
            p99 = [x.p99_s / b.p99_s for x, b in zip(rs, base, strict=True)]
            print(f"  {v}: tokens/s vs llama-server by round "
                  + ", ".join(f"{r:.2f}x" for r in paired[v])
                  + "; p99 latency ratio " + ", ".join(f"{r:.2f}" for r in p99))
    print("| server | tokens/s (median) | vs llama-server (median of rounds) | p50 latency | "
          "p99 latency |\n|---|---|---|---|---|")
    for v, rs in results.items():
        tps = float(np.median([x.tokens_per_s for x in rs]))
        ratio = f"{np.median(paired[v]):.2f}x" if v in paired else ""
        print(f"| {v} | {tps:.1f} | {ratio} | {np.median([x.p50_s for x in rs]):.2f} s | "
              f"{np.median([x.p99_s for x in rs]):.2f} s |")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating speed rounds")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per point")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="weight formats to compare (fp32, 'none', is always loaded)")
    parser.add_argument("--activations", default="float32,int16,int8",
                        help="the source engine's activation settings, one variant each")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--serving-rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--parts", default="speed,steps,quality,serving",
                        help="comma-separated subset of speed,steps,quality,serving")
    parser.add_argument("--step-batch", type=int, default=32, help="batch of the steps part")
    parser.add_argument("--step-rounds", type=int, default=40,
                        help="rounds of the steps part (one step per variant each)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    set_thread_compute_threads(args.threads)
    print(f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus; threads "
          f"{args.threads}; kernels: {'numba' if load_kernels() else 'NumPy (numba missing)'}")
    parts = set(args.parts.split(","))
    results: dict[str, object] = {"threads": args.threads}
    if parts & {"speed", "steps", "quality"}:
        manifests = {q: Manifest.load(engine_dir(q)) for q in FORMATS}
        formats = args.formats.split(",")
        unknown = set(formats) - set(FORMATS)
        if unknown:
            parser.error(f"--formats: unknown {', '.join(sorted(unknown))}")
        runners = load_runners(formats, source_modes(args.activations))
        missing = llama_cpp_missing()
        peer = None
        if missing:
            print(f"  llama.cpp skipped: {missing}")
        else:
            peer = LlamaCppPeer(fetch_default(), args.threads)
        timed = {v: r for v, r in runners.items() if v != "none" or "none" in formats}
        if "speed" in parts:
            print("\n(1, 2) decode and prefill tokens/s (median of rounds; ratio to llama.cpp)")
            results["speed"] = speed = measure_speed(timed, peer, args.rounds, args.steps)
            print_speed(speed)
        if "steps" in parts:
            print(f"\n(1b) decode at batch {args.step_batch}, variants stepping in turn, "
                  f"{args.step_rounds} rounds")
            results["steps"] = steps = interleaved_steps(timed, peer, args.step_batch,
                                                         args.step_rounds)
            print_interleaved(steps, args.step_batch)
        if "quality" in parts:
            print("\n(3) weights and quality")
            results["quality"] = quality_table(runners, peer, manifests)
        runners.clear()
        if peer is not None:
            peer.close()
    if "serving" in parts:
        print(f"\n(4) serving: {args.requests} chat requests x {args.max_tokens} tokens, "
              f"{args.concurrency} in flight, {args.threads} threads")
        results["serving"] = {k: [asdict(r) for r in v] for k, v in serving(args).items()}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
