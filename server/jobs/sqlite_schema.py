"""The SQLite job store's schema and row helpers (see ``sqlite_store``)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import IO, Any

from server.jobs.store import JobRecord, JobState, JobStoreInUseError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
INDEX_BITS = 32
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    no INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    digest BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, no);
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY,
    job INTEGER NOT NULL,
    custom_id TEXT,
    url TEXT NOT NULL,
    model TEXT NOT NULL,
    request BLOB,
    outcome INTEGER NOT NULL,
    result BLOB,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_by_custom_id ON items (job, custom_id);
"""
JOB_COLUMNS = (
    "id, tenant, labels, state, total, completed, failed, cancelled, expired, "
    "completion_tokens, created_at, expires_at, started_at, finished_at, error"
)
MAX_PARAMS = 500  # bound parameters per IN (...) query


def key_range(no: int) -> tuple[int, int]:
    low = no << INDEX_BITS
    return low, low + (1 << INDEX_BITS) - 1


def job_record(row: Sequence[Any]) -> JobRecord:
    return JobRecord(
        id=row[0],
        tenant=row[1],
        labels=json.loads(row[2]),
        state=JobState(row[3]),
        total=row[4],
        completed=row[5],
        failed=row[6],
        cancelled=row[7],
        expired=row[8],
        completion_tokens=row[9],
        created_at=row[10],
        expires_at=row[11],
        started_at=row[12],
        finished_at=row[13],
        error=row[14],
    )


def placeholders(values: Collection[object]) -> str:
    return ",".join("?" * len(values))


def lock_exclusively(path: Path) -> IO[str]:
    lock = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115 (held until close)
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise JobStoreInUseError(
                f"job store {path} is in use by another server; give each server its own "
                "--job-store"
            ) from None
    return lock
