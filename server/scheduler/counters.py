"""Per-tier counters shared between the scheduler thread and callers of submit/snapshot."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from server.scheduler.types import Tier, TierSnapshot


@dataclass(slots=True)
class _Tally:
    running: int = 0
    queued: int = 0  # submitted and not running: new, preempted, or not yet seen by a pass
    finished: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    slo_judged: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    both_met: int = 0


class TierCounters:
    """Thread-safe tallies per tier. The queue bound is checked and taken in one step
    (``try_queue``) so two concurrent submits cannot both pass a bound with one place left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tally = {tier: _Tally() for tier in Tier}

    def try_queue(self, tier: Tier, bound: int) -> bool:
        with self._lock:
            tally = self._tally[tier]
            if tally.queued >= bound:
                return False
            tally.queued += 1
            return True

    def add(
        self,
        tier: Tier,
        *,
        running: int = 0,
        queued: int = 0,
        finished: int = 0,
        generated_tokens: int = 0,
        preemptions: int = 0,
    ) -> None:
        with self._lock:
            tally = self._tally[tier]
            tally.running += running
            tally.queued += queued
            tally.finished += finished
            tally.generated_tokens += generated_tokens
            tally.preemptions += preemptions

    def judge(self, tier: Tier, *, ttft_met: bool, tpot_met: bool) -> None:
        """Counts one completed request against the SLOs."""
        with self._lock:
            tally = self._tally[tier]
            tally.slo_judged += 1
            tally.ttft_met += ttft_met
            tally.tpot_met += tpot_met
            tally.both_met += ttft_met and tpot_met

    def in_flight(self, tier: Tier) -> int:
        """Requests of the tier that have not finished (queued or running)."""
        with self._lock:
            tally = self._tally[tier]
            return tally.running + tally.queued

    def snapshot(self, tier: Tier) -> TierSnapshot:
        with self._lock:
            t = self._tally[tier]
            return TierSnapshot(
                running=t.running,
                queued=t.queued,
                finished=t.finished,
                generated_tokens=t.generated_tokens,
                preemptions=t.preemptions,
                slo_judged=t.slo_judged,
                ttft_met=t.ttft_met,
                tpot_met=t.tpot_met,
                both_met=t.both_met,
            )
