"""``python -m engine_builder profile DIR``: decode throughput by batch size and the step-cost
model, stored in the manifest's ``profile`` (the server's utilization metric divides by the
curve's peak; its step budget plans with the step-cost fit, see profile_steps.py).

For each batch size B, B requests with short distinct prompts run with ``ignore_eos``; once
every one of them has its first token (prefill done), the clock starts and the tokens arriving
until each has decoded ``steps`` more give the steady-state rate. Decode streams all weights
once per step, so the batch-1 step time is compared with the memory roofline
``weight_bytes / bandwidth``, measured here with a large NumPy copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from backfill.progress import progress
from engine_builder.footprint import footprint
from engine_builder.manifest import Manifest, ManifestError, Profile, StepCostFit
from engine_builder.profile_steps import format_fit, measure_step_cost, poll_to_end
from engine_builder.step_cost import StepSample
from engine_builder.usage import UsageError

PROMPT_TOKENS = 8
MIN_STEPS = 4
WARMUP_TOKENS = 2  # tokens each sequence produces before the clock starts (first one = prefill)


@dataclass(frozen=True, slots=True)
class BatchPoint:
    batch_size: int
    tokens_per_s: float  # aggregate decode tokens/s over the batch
    step_ms: float  # wall time per decode step


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="measure decode tokens/s by batch size")
    p.add_argument("engine_dir", type=Path, metavar="DIR")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated, e.g. 1,2,4 (default: powers of 2 up to max batch)")
    p.add_argument("--steps", type=int, default=16,
                   help="decode steps measured at batch 1; fewer for larger batches (min 4)")
    p.add_argument("--no-save", action="store_true", help="do not write the manifest")
    p.add_argument("--no-step-cost", action="store_true",
                   help="skip the step-cost workloads (batch curve only)")
    p.set_defaults(handler=run)


def default_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def parse_batch_sizes(text: str | None, max_batch_size: int) -> list[int]:
    if text is None:
        return default_batch_sizes(max_batch_size)
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError("--batch-sizes", f"expected integers like 1,2,4, got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > max_batch_size:
        raise UsageError("--batch-sizes", f"sizes must be in [1, {max_batch_size}] (the engine's "
                         f"max_batch_size), got {text!r}")
    return sizes


def steps_for(batch_size: int, steps: int) -> int:
    """Fewer steps for big batches: their steps are slower but carry more tokens each."""
    return max(MIN_STEPS, steps * 4 // max(4, batch_size))


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Memory bandwidth in GB/s: best of a few large copies, counting read + write."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def measure_batch(executor: Any, batch_size: int, steps: int, vocab_size: int,
                  first_id: int, on_tokens: Callable[[int], object] | None = None) -> BatchPoint:
    """Runs batch_size requests and times `steps` decode steps after all prefills are done;
    ``on_tokens(n)`` hears of every n tokens produced (progress)."""
    from server.executor.base import ExecRequest, SamplingParams

    rng = np.random.default_rng(first_id)
    warmup = WARMUP_TOKENS
    sampling = SamplingParams(max_tokens=warmup + steps, ignore_eos=True)
    ids = [first_id + i for i in range(batch_size)]
    enqueued_at = time.perf_counter()
    for request_id in ids:
        prompt = tuple(int(t) for t in rng.integers(0, vocab_size, PROMPT_TOKENS))
        executor.enqueue(ExecRequest(request_id=request_id, prompt_token_ids=prompt,
                                     sampling=sampling))
    produced = dict.fromkeys(ids, 0)
    start: float | None = None
    counted = 0

    def on_delta(delta: Any, now: float) -> None:
        nonlocal start, counted
        n = len(delta.token_ids)
        produced[delta.request_id] += n
        if on_tokens is not None:
            on_tokens(n)
        if start is not None and now > start:
            counted += n
        elif start is None and min(produced.values()) >= warmup:
            start = now  # tokens polled up to this instant were prefill or warm-up

    poll_to_end(executor, ids, on_delta)
    end = time.perf_counter()
    if start is None or counted == 0:
        # Everything arrived in one poll (a tiny engine outruns the poller and its deltas
        # coalesce): fall back to the whole run, prefill included, minus the first tokens.
        start, counted = enqueued_at, sum(produced.values()) - batch_size
        if counted <= 0:
            raise RuntimeError(f"batch {batch_size}: no decode tokens to time")
    elapsed = end - start
    return BatchPoint(batch_size, counted / elapsed, 1000 * elapsed / (counted / batch_size))


def measure_curve(executor: Any, batch_sizes: Sequence[int], steps: int, vocab_size: int,
                  log: Callable[[str], None] = print) -> list[BatchPoint]:
    runs = [(1, MIN_STEPS), *((batch, steps_for(batch, steps)) for batch in batch_sizes)]
    total = sum(batch * (WARMUP_TOKENS + n) for batch, n in runs)
    with progress(total=total, desc="profiling", unit="token") as bar:
        # Warm-up (discarded): first calls pay for BLAS thread start-up and cache misses.
        measure_batch(executor, 1, MIN_STEPS, vocab_size, first_id=1, on_tokens=bar.update)
        points = []
        for i, batch in enumerate(batch_sizes):
            point = measure_batch(executor, batch, steps_for(batch, steps), vocab_size,
                                  first_id=(i + 1) * 100_000, on_tokens=bar.update)
            with bar.external_write_mode():  # the line goes above the bar, not through it
                log(f"  batch {batch:>3}: {point.tokens_per_s:8.1f} tokens/s, "
                    f"{point.step_ms:7.1f} ms")
            points.append(point)
    return points


def format_table(points: Sequence[BatchPoint], weight_bytes: int, bandwidth_gb_s: float) -> str:
    base = points[0]
    roofline_ms = 1000 * weight_bytes / (bandwidth_gb_s * 1e9)
    lines = [f"memory bandwidth {bandwidth_gb_s:.1f} GB/s, weights {weight_bytes / 1e6:.1f} MB, "
             f"roofline step {roofline_ms:.1f} ms",
             f"{'batch':>5} {'tokens/s':>10} {'step ms':>9} {'x vs b' + str(base.batch_size):>9}"
             f" {'% roofline':>10}"]
    for p in points:
        roof = "" if p.batch_size != 1 else f"{100 * roofline_ms / p.step_ms:9.0f}%"
        lines.append(f"{p.batch_size:>5} {p.tokens_per_s:>10.1f} {p.step_ms:>9.1f} "
                     f"{p.tokens_per_s / base.tokens_per_s:>8.2f}x {roof:>10}")
    return "\n".join(lines)


def make_profile(points: Sequence[BatchPoint], weight_bytes: int,
                 bandwidth_gb_s: float, step_cost: StepCostFit | None = None) -> Profile:
    return Profile(
        batch_sizes=tuple(p.batch_size for p in points),
        decode_tokens_per_s=tuple(round(p.tokens_per_s, 2) for p in points),
        step_latency_ms=tuple(round(p.step_ms, 3) for p in points),
        memory_bandwidth_gb_s=round(bandwidth_gb_s, 2), weight_bytes=weight_bytes,
        peak_tokens_per_s=round(max(p.tokens_per_s for p in points), 2),
        measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        host=f"{platform.node()} ({platform.machine()}, {_cpu_count()} cpus)",
        step_cost=step_cost)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(args: argparse.Namespace, executor_factory: Callable[[Path], Any] | None = None) -> int:
    try:
        manifest = Manifest.load(args.engine_dir)
    except ManifestError as exc:
        raise UsageError("DIR", str(exc)) from exc
    sizes = parse_batch_sizes(args.batch_sizes, manifest.limits.max_batch_size)
    if args.steps < 1:
        raise UsageError("--steps", f"must be >= 1, got {args.steps}")
    weight_bytes = footprint(manifest, args.engine_dir).weight_bytes
    bandwidth = measure_bandwidth()
    print(f"profiling {args.engine_dir} ({manifest.name}, {manifest.quantization.weights}) "
          f"at batch sizes {sizes}")
    if executor_factory is None:
        from server.executor.factory import load_executor

        executor_factory = load_executor
    executor = executor_factory(args.engine_dir)
    vocab = manifest.architecture.vocab_size
    try:
        points = measure_curve(executor, sizes, args.steps, vocab)
        fit = None
        if not args.no_step_cost:
            curve_steps: list[StepSample] = getattr(executor, "take_step_samples", list)()
            fit = measure_step_cost(executor, manifest.limits, vocab, curve_steps,
                                    getattr(executor, "blas_threads", None))
    finally:
        executor.shutdown()
    print(format_table(points, weight_bytes, bandwidth))
    if fit is not None:
        print(format_fit(fit))
    if not args.no_save:
        # Re-read: the manifest may have been rewritten while we measured.
        latest = Manifest.load(args.engine_dir)
        profile = make_profile(points, weight_bytes, bandwidth, fit)
        latest.with_profile(profile).save(args.engine_dir)
        print(f"saved profile to {args.engine_dir / 'manifest.json'}")
    return 0
