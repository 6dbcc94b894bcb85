"""The online SLOs a server runs with: given on the command line, or derived from the engine's
step-cost model (the profile's fit) so that they mean the same thing on every engine.

Derived defaults (documented in the README):
- TPOT SLO: 3x the predicted step of one sequence decoding alone (a 128-token context): online
  tokens may come at most three times slower than on an otherwise idle engine.
- TTFT SLO: the predicted prefill of a full step of prompt tokens (``max_tokens_per_step``),
  plus one TPOT SLO for the step the request may arrive during.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine_builder.manifest import Manifest
from engine_builder.step_cost import LinearStepCost, StepCostModel, StepShape
from server.executor.base import Capacity

log = logging.getLogger(__name__)

TPOT_FACTOR = 3.0  # the default TPOT SLO over the predicted lone decode step
LONE_DECODE_CONTEXT = 128


@dataclass(frozen=True, slots=True)
class Slos:
    tpot_ms: float | None  # None: no TPOT budget (offline fills every step)
    ttft_ms: float | None
    how: str  # where the values came from, for the start-up message


def engine_step_cost(manifest: Manifest) -> LinearStepCost | None:
    """The profile's step-cost fit; a rough model from its batch curve for profiles made
    before the fit existed; None for an engine never profiled."""
    profile = manifest.profile
    if profile is None:
        return None
    if profile.step_cost is not None:
        try:
            return LinearStepCost.from_fit(profile.step_cost)
        except ValueError as exc:
            log.warning("ignoring the profile's step-cost fit: %s", exc)
    return LinearStepCost.from_batch_curve(profile.batch_sizes, profile.step_latency_ms)


def resolve_slos(
    tpot_ms: float, ttft_ms: float, cost: StepCostModel | None, capacity: Capacity
) -> Slos:
    """``tpot_ms`` / ``ttft_ms`` as configured: > 0 as given, 0 derived, < 0 none."""
    lone = StepShape()
    lone.add_decode(LONE_DECODE_CONTEXT)
    prefill = StepShape()
    prefill.add_prefill(0, capacity.max_tokens_per_step, True)
    notes = []
    tpot: float | None = tpot_ms if tpot_ms > 0 else None
    if tpot_ms == 0:
        if cost is None:
            notes.append("no TPOT SLO: the engine has no profile (run `python -m "
                         "engine_builder profile`, or give --tpot-slo-ms)")
        else:
            tpot = round(TPOT_FACTOR * 1000 * cost.predict(lone), 1)
            notes.append(f"TPOT SLO derived: {TPOT_FACTOR:g}x the predicted lone decode step")
    ttft: float | None = ttft_ms if ttft_ms > 0 else None
    if ttft_ms == 0 and cost is not None:
        ttft = round(1000 * cost.predict(prefill) + (tpot or 0.0), 1)
        notes.append(
            f"TTFT SLO derived: the predicted prefill of {capacity.max_tokens_per_step} tokens"
            + (" plus the TPOT SLO" if tpot else "")
        )
    return Slos(tpot, ttft, "; ".join(notes) or "as configured")
