"""Metrics of the step budget (server/scheduler/slo.py): step times observed against the
step-cost model's predictions, offline work held back, and per-tier SLO attainment."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine_builder.step_cost import StepSample
from server.scheduler.types import SchedulerSnapshot

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class StepMetrics:
    """Per-step histograms; ``observe`` is the scheduler's step observer (its thread)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.observed = Histogram(
            "backfill_step_seconds",
            "Duration of executor steps.",
            buckets=_STEP_BUCKETS,
            registry=registry,
        )
        self.predicted = Histogram(
            "backfill_step_predicted_seconds",
            "The step-cost model's prediction for each step, made before the step ran.",
            buckets=_STEP_BUCKETS,
            registry=registry,
        )

    def observe(self, sample: StepSample, predicted: float | None) -> None:
        self.observed.observe(sample.seconds)
        if predicted is not None:
            self.predicted.observe(predicted)


def step_budget_families(sched: SchedulerSnapshot) -> Iterator[Metric]:
    budget = sched.step_budget
    if budget is None:
        return
    slo = GaugeMetricFamily(
        "backfill_slo_seconds", "The online SLOs the server runs with.", labels=["slo"]
    )
    for name, ms in (("tpot", budget.tpot_slo_ms), ("ttft", budget.ttft_slo_ms)):
        if ms is not None:
            slo.add_metric([name], ms / 1000.0)
    yield slo
    yield GaugeMetricFamily(
        "backfill_offline_held_back",
        "Offline sequences the last step plan paused or capped to keep the TPOT SLO.",
        value=budget.offline_held_back,
    )
    if budget.step_budget_ms is not None:
        yield GaugeMetricFamily(
            "backfill_step_budget_seconds",
            "What steps with online work are planned to: the TPOT SLO times a margin.",
            value=budget.step_budget_ms / 1000.0,
        )
    yield GaugeMetricFamily(
        "backfill_step_planned_seconds",
        "The predicted time of the last planned step (0 with no online work).",
        value=budget.predicted_step_ms / 1000.0,
    )
    error = budget.prediction_error
    yield GaugeMetricFamily(
        "backfill_step_prediction_error_ratio",
        "Median relative error of recent step-time predictions.",
        value=0.0 if math.isnan(error) else error,
    )
    judged = CounterMetricFamily(
        "backfill_slo_judged_requests", "Completed requests judged against the SLOs.",
        labels=["tier"],
    )
    met = CounterMetricFamily(
        "backfill_slo_met_requests", "Completed requests that met an SLO.", labels=["tier", "slo"]
    )
    for tier, t in (("online", sched.online), ("offline", sched.offline)):
        judged.add_metric([tier], t.slo_judged)
        for name, value in (("ttft", t.ttft_met), ("tpot", t.tpot_met), ("both", t.both_met)):
            met.add_metric([tier, name], value)
    yield judged
    yield met
