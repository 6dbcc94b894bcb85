"""Metrics of the step budget (server/scheduler/slo.py): step times observed against the
step-cost model's predictions, offline work held back, and per-tier SLO attainment."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine_builder.step_cost import StepSample
from server.scheduler.types import SchedulerSnapshot

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class StepMetrics:
    """Per-step histograms; ``observer(model)`` is that model's scheduler's step observer (its
    thread)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.observed = Histogram(
            "backfill_step_seconds",
            "Duration of executor steps.",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        )
        self.predicted = Histogram(
            "backfill_step_predicted_seconds",
            "The step-cost model's prediction for each step, made before the step ran.",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        )

    def observer(self, model: str) -> Callable[[StepSample, float | None], None]:
        observed, predicted = self.observed.labels(model), self.predicted.labels(model)

        def observe(sample: StepSample, prediction: float | None) -> None:
            observed.observe(sample.seconds)
            if prediction is not None:
                predicted.observe(prediction)

        return observe


def step_budget_families(models: list[tuple[str, SchedulerSnapshot]]) -> Iterator[Metric]:
    """The step budget's families, one series per model that has a budget."""
    budgets = [(model, sched, sched.step_budget) for model, sched in models
               if sched.step_budget is not None]
    if not budgets:
        return
    slo = GaugeMetricFamily(
        "backfill_slo_seconds", "The online SLOs the server runs with.", labels=["model", "slo"]
    )
    held = GaugeMetricFamily(
        "backfill_offline_held_back",
        "Offline sequences the last step plan paused or capped to keep the TPOT SLO.",
        labels=["model"],
    )
    budget_s = GaugeMetricFamily(
        "backfill_step_budget_seconds",
        "The TPOT SLO times a margin: the most a step with online work is planned to (less "
        "where max_online_slowdown binds).",
        labels=["model"],
    )
    planned = GaugeMetricFamily(
        "backfill_step_planned_seconds",
        "The predicted time of the last planned step (0 with no online work).",
        labels=["model"],
    )
    error = GaugeMetricFamily(
        "backfill_step_prediction_error_ratio",
        "Median relative error of recent step-time predictions.",
        labels=["model"],
    )
    judged = CounterMetricFamily(
        "backfill_slo_judged_requests", "Completed requests judged against the SLOs.",
        labels=["model", "tier"],
    )
    met = CounterMetricFamily(
        "backfill_slo_met_requests", "Completed requests that met an SLO.",
        labels=["model", "tier", "slo"],
    )
    for model, sched, budget in budgets:
        assert budget is not None
        for name, ms in (("tpot", budget.tpot_slo_ms), ("ttft", budget.ttft_slo_ms)):
            if ms is not None:
                slo.add_metric([model, name], ms / 1000.0)
        held.add_metric([model], budget.offline_held_back)
        if budget.step_budget_ms is not None:
            budget_s.add_metric([model], budget.step_budget_ms / 1000.0)
        planned.add_metric([model], budget.predicted_step_ms / 1000.0)
        e = budget.prediction_error
        error.add_metric([model], 0.0 if math.isnan(e) else e)
        for tier, t in (("online", sched.online), ("offline", sched.offline)):
            judged.add_metric([model, tier], t.slo_judged)
            for name, value in (("ttft", t.ttft_met), ("tpot", t.tpot_met),
                                ("both", t.both_met)):
                met.add_metric([model, tier, name], value)
    yield from (slo, held, budget_s, planned, error, judged, met)
