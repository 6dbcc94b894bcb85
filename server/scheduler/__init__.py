"""The two-tier backfill scheduler; its API is docs/scheduler-api.md."""

from server.scheduler.config import SchedulerConfig
from server.scheduler.scheduler import BackfillScheduler
from server.scheduler.types import (
    DrainingError,
    EventSink,
    Outcome,
    QueueFullError,
    SchedEvent,
    SchedRequest,
    SchedulerSnapshot,
    Tier,
    TierSnapshot,
    Timing,
    Usage,
)

__all__ = [
    "BackfillScheduler",
    "DrainingError",
    "EventSink",
    "Outcome",
    "QueueFullError",
    "SchedEvent",
    "SchedRequest",
    "SchedulerConfig",
    "SchedulerSnapshot",
    "Tier",
    "TierSnapshot",
    "Timing",
    "Usage",
]
