"""Arrivals and lengths for load replay: production CSV traces, scaled to the engine, or
Poisson arrivals with lengths drawn from a trace.

The trace format is the Azure LLM inference trace's: ``TIMESTAMP,ContextTokens,GeneratedTokens``
with timestamps like ``2023-11-16 18:15:46.6805900``. Every function that reads a trace takes a
path to any CSV of that format, or ``None`` for the trace shipped with this package (the Azure
LLM inference trace 2023, conversation; CC-BY 4.0, attribution in ``data/NOTICE.md``).

Scaling: ``time_scale`` speeds time up (arrival / time_scale, so 10 replays ten times
faster); lengths are scaled so that the trace's 99th percentile maps to ``max_prompt_tokens`` /
``max_output_tokens``, then clipped to [1, max], which keeps the shape of the length
distribution on a small engine.

>>> reqs = [TraceRequest(0.0, 1000, 100), TraceRequest(2.0, 4000, 400)]
>>> [(r.arrival_s, r.prompt_tokens) for r in scale_trace(reqs, time_scale=2, max_prompt_tokens=40,
...                                                        max_output_tokens=8)]
[(0.0, 10), (1.0, 40)]
"""

from __future__ import annotations

import csv
import functools
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources

# The trace shipped as package data (client/bench/data/), read through importlib.resources so it
# is found wherever the package is installed.
SHIPPED_TRACE = "AzureLLMInferenceTrace_conv.csv"
SHIPPED_TRACE_NAME = "the Azure LLM inference trace 2023 (conversation)"

TracePath = str | os.PathLike[str] | None  # None: the shipped trace


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request to replay: when (seconds from the start) and how long."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch; accepts more than 6 fractional digits (the Azure trace has 7)."""
    whole, _, frac = text.strip().partition(".")
    base = datetime.fromisoformat(whole).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def trace_label(path: TracePath) -> str:
    """How reports name the trace: its path, or what the shipped one is."""
    return SHIPPED_TRACE_NAME if path is None else str(path)


def load_trace(path: TracePath = None) -> list[TraceRequest]:
    """Reads a trace CSV (``None``: the shipped one); arrivals relative to the first row, sorted."""
    if path is None:
        return list(_shipped_trace())
    with open(path, newline="", encoding="utf-8") as f:
        return _parse_rows(f, str(path))


@functools.lru_cache(maxsize=1)
def _shipped_trace() -> tuple[TraceRequest, ...]:
    source = resources.files("client.bench") / "data" / SHIPPED_TRACE
    text = source.read_text(encoding="utf-8")
    return tuple(_parse_rows(text.splitlines(keepends=True), SHIPPED_TRACE))


def _parse_rows(lines: Iterable[str], name: str) -> list[TraceRequest]:
    rows: list[tuple[float, int, int]] = []
    reader = csv.DictReader(lines)
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{name}: not a trace CSV: no column {', '.join(sorted(missing))} "
                         "(expected TIMESTAMP,ContextTokens,GeneratedTokens)")
    for row in reader:
        try:
            rows.append((_parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}:{reader.line_num}: {exc}") from None
    if not rows:
        raise ValueError(f"{name}: no rows")
    rows.sort()
    t0 = rows[0][0]
    return [TraceRequest(t - t0, max(1, c), max(1, g)) for t, c, g in rows]


def _percentile(values: Sequence[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def _scaler(values: Sequence[int], limit: int) -> float:
    return limit / max(1.0, _percentile(values, 0.99))


def scale_trace(
    requests: Sequence[TraceRequest],
    *,
    time_scale: float = 1.0,
    max_prompt_tokens: int,
    max_output_tokens: int,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> list[TraceRequest]:
    """The window [start_s, start_s + duration_s) of the *scaled* timeline, lengths scaled."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if not requests:
        return []
    p_scale = _scaler([r.prompt_tokens for r in requests], max_prompt_tokens)
    o_scale = _scaler([r.output_tokens for r in requests], max_output_tokens)
    out: list[TraceRequest] = []
    for r in requests:
        t = r.arrival_s / time_scale - start_s
        if t < 0 or (duration_s is not None and t >= duration_s):
            continue
        out.append(
            TraceRequest(
                arrival_s=t,
                prompt_tokens=min(max_prompt_tokens, max(1, round(r.prompt_tokens * p_scale))),
                output_tokens=min(max_output_tokens, max(1, round(r.output_tokens * o_scale))),
            )
        )
    return out


def time_scale_for_rate(
    requests: Sequence[TraceRequest], rate: float, duration_s: float | None = None
) -> float:
    """The time_scale that replays the trace at ``rate`` requests/s.

    Without ``duration_s``: the trace's mean rate over its whole span. With it: the rate over
    the first ``rate * duration_s`` requests, i.e. the ones a run of that length replays (a
    trace's opening minutes can be much quieter or busier than its mean).
    """
    if rate <= 0 or len(requests) < 2:
        raise ValueError("need a trace of two or more requests and a positive rate")
    count = len(requests)
    if duration_s is not None:
        count = min(count, max(2, round(rate * duration_s)))
    span = requests[count - 1].arrival_s - requests[0].arrival_s
    if span <= 0:
        raise ValueError("the trace's requests all arrive at once")
    return rate * span / (count - 1)


def poisson_arrivals(
    rate: float,
    duration_s: float,
    lengths: Sequence[TraceRequest],
    *,
    seed: int = 0,
) -> list[TraceRequest]:
    """Poisson arrivals at ``rate``/s for ``duration_s``, lengths drawn from ``lengths``."""
    if rate <= 0 or not lengths:
        return []
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        pick = rng.choice(lengths)
        out.append(replace(pick, arrival_s=t))
        t += rng.expovariate(rate)
    return out


def length_pool(
    max_prompt_tokens: int, max_output_tokens: int, path: TracePath = None
) -> list[TraceRequest]:
    """The trace's lengths, scaled to the engine, to draw requests from."""
    return scale_trace(
        load_trace(path), max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens
    )
