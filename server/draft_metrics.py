"""Metrics of speculative decoding per drafter, from the executor's cumulative counts (the
per-tier draft token counters, ``backfill_draft_tokens_*_total``, come from each request's
usage in ``metrics.py``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.executor.base import ExecutorStats


def drafter_families(ex: ExecutorStats) -> Iterator[Metric]:
    if not ex.drafters:
        return
    rate = GaugeMetricFamily(
        "backfill_draft_acceptance_ratio",
        "Drafted tokens accepted over drafted tokens verified, since start.",
        labels=["drafter"],
    )
    length = GaugeMetricFamily(
        "backfill_draft_accepted_length",
        "Drafted tokens accepted per speculative step, since start.",
        labels=["drafter"],
    )
    steps = CounterMetricFamily(
        "backfill_speculative_steps", "Sequence steps that verified a draft.", labels=["drafter"]
    )
    seconds = CounterMetricFamily(
        "backfill_draft_seconds", "Time spent drafting, outside the target's steps.",
        labels=["drafter"],
    )
    for d in ex.drafters:
        rate.add_metric([d.drafter], d.acceptance_rate)
        length.add_metric([d.drafter], d.mean_accepted_length)
        steps.add_metric([d.drafter], d.steps)
        seconds.add_metric([d.drafter], d.seconds)
    yield from (rate, length, steps, seconds)
