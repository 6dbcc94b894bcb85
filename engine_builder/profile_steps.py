"""The step-cost part of ``python -m engine_builder profile``: runs workloads that vary what a
step carries (decode rows, prefill chunks, context lengths), takes the executor's own report
of every step (shape and duration) and fits the step-cost model (step_cost.py) to them.

The batch curve that runs first already gave decode steps at short contexts; this adds
prefill chunks of several sizes, alone and beside decodes, and decodes over long contexts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from engine_builder.manifest import Limits, StepCostFit
from engine_builder.step_cost import StepSample, fit_samples, median, relative_errors

POLL_TIMEOUT_S = 0.05
STALL_TIMEOUT_S = 300.0  # a step of the largest batch on a slow, busy CPU stays well below


def run_requests(
    executor: Any, prompts: list[tuple[int, ...]], max_tokens: int, first_id: int
) -> None:
    """Runs the prompts together to the end (EOS ignored)."""
    from server.executor.base import ExecRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        executor.enqueue(ExecRequest(first_id + i, prompt, sampling))
    poll_to_end(executor, range(first_id, first_id + len(prompts)), lambda delta, now: None)


def poll_to_end(
    executor: Any, ids: Iterable[int], on_delta: Callable[[Any, float], object]
) -> None:
    """Polls until every request of ``ids`` finished, handing each of their deltas (and the
    time it came) to ``on_delta``; a failed request or a stall raises RuntimeError."""
    live = set(ids)
    last = time.perf_counter()
    while live:
        deltas = executor.poll(POLL_TIMEOUT_S)
        now = time.perf_counter()
        if deltas:
            last = now
        elif now - last > STALL_TIMEOUT_S:
            raise RuntimeError(f"no tokens for {STALL_TIMEOUT_S:.0f}s while profiling")
        for delta in deltas:
            if delta.request_id not in live:
                continue
            if delta.error:
                raise RuntimeError(f"profile request failed: {delta.error}")
            on_delta(delta, now)
            if delta.finish is not None:
                live.discard(delta.request_id)


def step_workloads(limits: Limits, vocab_size: int) -> list[tuple[list[tuple[int, ...]], int]]:
    """(prompts, max_tokens) to run one after the other; prompts are random ids, distinct per
    request so the prefix cache serves none of them."""
    rng = np.random.default_rng(12345)

    def prompts(count: int, length: int) -> list[tuple[int, ...]]:
        return [tuple(int(t) for t in rng.integers(0, vocab_size, length)) for _ in range(count)]

    slots, chunk = limits.max_batch_size, limits.max_num_tokens
    longest = max(8, min(limits.max_seq_len // 2, 4 * chunk) - 16)
    loads: list[tuple[list[tuple[int, ...]], int]] = []
    for length in sorted({16, 64, min(256, chunk), chunk}):  # prefill chunks alone
        loads.append((prompts(1, length), 2))
    for count in sorted({1, min(8, slots), slots}):  # long contexts: chunked prefill, decodes
        loads.append((prompts(count, longest), 6))
    for length in sorted({16, 64, min(256, chunk)}):  # prefill chunks beside decodes
        loads.append((prompts(min(4, slots), 8) + prompts(2, length), 12))
    return loads


def measure_step_cost(
    executor: Any,
    limits: Limits,
    vocab_size: int,
    curve_samples: list[StepSample],
    blas_threads: int | None,
    log: Callable[[str], None] = print,
) -> StepCostFit | None:
    """Runs the workloads and fits the model to every step seen (the curve's included);
    None for an executor that does not report its steps."""
    from server.executor.base import StepReporter

    if not isinstance(executor, StepReporter):
        log("  step cost: this executor does not report its steps; no fit")
        return None
    samples = list(curve_samples)
    for i, (prompts, max_tokens) in enumerate(step_workloads(limits, vocab_size)):
        run_requests(executor, prompts, max_tokens, first_id=900_000 + 1000 * i)
    samples += executor.take_step_samples()
    model = fit_samples(samples)
    error = median(relative_errors(model, samples))
    log(f"  step cost: {len(samples)} steps, median error {100 * error:.1f}%")
    return model.to_fit(num_steps=len(samples), median_error=round(error, 4),
                        blas_threads=blas_threads)


def format_fit(fit: StepCostFit) -> str:
    lines = [f"step cost model (v{fit.version}): intercept {1000 * fit.intercept_s:.3f} ms"]
    lines += [
        f"  {name:>16}: {1000 * c:.5f} ms"
        for name, c in zip(fit.features, fit.coefficients_s, strict=True)
        if c > 0
    ]
    lines.append(f"  median error {100 * fit.median_error:.1f}% over {fit.num_steps} steps")
    return "\n".join(lines)
