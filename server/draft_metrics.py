"""Metrics of speculative decoding per drafter, from the executor's cumulative counts (the
per-tier draft token counters, ``backfill_draft_tokens_*_total``, come from each request's
usage in ``metrics.py``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.executor.base import ExecutorStats


def drafter_families(models: list[tuple[str, ExecutorStats]]) -> Iterator[Metric]:
    """One series per model and drafter, for the models whose executors draft."""
    drafting = [(model, d) for model, ex in models for d in ex.drafters]
    if not drafting:
        return
    rate = GaugeMetricFamily(
        "backfill_draft_acceptance_ratio",
        "Drafted tokens accepted over drafted tokens verified, since start.",
        labels=["model", "drafter"],
    )
    length = GaugeMetricFamily(
        "backfill_draft_accepted_length",
        "Drafted tokens accepted per speculative step, since start.",
        labels=["model", "drafter"],
    )
    steps = CounterMetricFamily(
        "backfill_speculative_steps", "Sequence steps that verified a draft.",
        labels=["model", "drafter"],
    )
    seconds = CounterMetricFamily(
        "backfill_draft_seconds", "Time spent drafting, outside the target's steps.",
        labels=["model", "drafter"],
    )
    for model, d in drafting:
        rate.add_metric([model, d.drafter], d.acceptance_rate)
        length.add_metric([model, d.drafter], d.mean_accepted_length)
        steps.add_metric([model, d.drafter], d.steps)
        seconds.add_metric([model, d.drafter], d.seconds)
    yield from (rate, length, steps, seconds)
