"""The scheduler's configuration: every knob in one frozen, validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("backfill", "fcfs")
PREEMPTION_MODES = ("recompute", "off")
SPECULATION_MODES = ("auto", "off")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Parameters of the two-tier backfill scheduler (see DESIGN.md, "The backfill scheduler").

    ``policy="backfill"`` is the two-tier scheduler: online first in earliest-deadline order,
    a reserve of slots kept for offline, offline preempted (by recompute) for online, offline
    filling whatever is left. ``policy="fcfs"`` is the benchmark baseline: one queue in arrival
    order for both tiers, no reserve and no preemption (``offline_reserve`` and ``preemption``
    are then ignored).
    """

    window_ms: float = 10.0  # collection window W: a pass runs at least this often
    offline_reserve: float = 0.10  # fraction of slots kept for offline (at least 1 when > 0)
    preemption: str = "recompute"  # "recompute" | "off"
    max_online_queue: int = 1024  # queued (not running) online requests; beyond: QueueFullError
    max_offline_queue: int = 100_000  # queued (not running) offline requests
    policy: str = "backfill"  # "backfill" | "fcfs"
    # Online time per output token that the step budget protects (slo.py); None: no budget,
    # offline fills every step. Also what online requests' TPOT attainment is judged by.
    tpot_slo_ms: float | None = None
    # Online time to first token that attainment is judged by; None: not judged.
    ttft_slo_ms: float | None = None
    # With the TPOT SLO set: a step that carries online work is planned to cost at most this
    # many times what its online work alone would (predicted), so offline work slows each
    # online token by about this factor at most, not merely up to the SLO (which online
    # tokens would otherwise drift towards); None: the SLO alone.
    max_online_slowdown: float | None = 1.2
    # Speculative decoding for requests that leave it to the server (speculation.py):
    # "auto" speculates for online requests when the step-cost model predicts a gain at the
    # current batch, never for offline ones; "off" only where a request asks.
    speculation: str = "auto"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_ms) and self.window_ms > 0.0):
            raise ValueError(f"window_ms must be > 0, got {self.window_ms}")
        if not 0.0 <= self.offline_reserve <= 1.0:
            raise ValueError(f"offline_reserve must be in [0, 1], got {self.offline_reserve}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption must be one of {PREEMPTION_MODES}, got {self.preemption!r}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.speculation not in SPECULATION_MODES:
            raise ValueError(
                f"speculation must be one of {SPECULATION_MODES}, got {self.speculation!r}"
            )
        if self.max_online_queue < 0:
            raise ValueError(f"max_online_queue must be >= 0, got {self.max_online_queue}")
        if self.max_offline_queue < 0:
            raise ValueError(f"max_offline_queue must be >= 0, got {self.max_offline_queue}")
        for name in ("tpot_slo_ms", "ttft_slo_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 (or None for none), got {value}")
        slowdown = self.max_online_slowdown
        if slowdown is not None and not (math.isfinite(slowdown) and slowdown >= 1.0):
            raise ValueError(f"max_online_slowdown must be >= 1 (or None for none), got {slowdown}")

    @property
    def window_s(self) -> float:
        return self.window_ms / 1000.0

    @property
    def tpot_slo_s(self) -> float | None:
        return None if self.tpot_slo_ms is None else self.tpot_slo_ms / 1000.0

    @property
    def ttft_slo_s(self) -> float | None:
        return None if self.ttft_slo_ms is None else self.ttft_slo_ms / 1000.0

    @property
    def preempts(self) -> bool:
        """Whether offline sequences may be preempted for online ones."""
        return self.policy == "backfill" and self.preemption == "recompute"

    def reserve_slots(self, max_slots: int) -> int:
        """Slots kept for offline: max(1, round(r * slots)) when r > 0, never above slots."""
        if self.policy != "backfill" or self.offline_reserve == 0.0:
            return 0
        return min(max_slots, max(1, round(self.offline_reserve * max_slots)))
