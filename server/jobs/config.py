"""The job store's and job runner's knobs, in one frozen, validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

MEMORY_STORE = ":memory:"  # the job_store value that keeps jobs in memory only (nothing survives)


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """How batch jobs are stored and fed to the scheduler."""

    # SQLite file of the durable job store; "" = $BACKFILL_HOME/jobs.db; ":memory:" = none.
    store: str = ""
    # Job requests handed to the scheduler at once (all jobs together); the rest wait in the
    # store, so a job of any size holds a bounded amount of memory.
    max_in_flight: int = 1024
    completion_window_s: float = 24 * 3600.0  # a job's default time to finish before it expires
    retention_s: float = 7 * 24 * 3600.0  # finished jobs are deleted this long after they end
    flush_ms: float = 50.0  # finished results are written to the store at least this often

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"job_max_in_flight must be >= 1, got {self.max_in_flight}")
        for name in ("completion_window_s", "retention_s", "flush_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"job_{name} must be > 0, got {value}")

    @property
    def flush_s(self) -> float:
        return self.flush_ms / 1000.0
