"""Offline batch jobs: a durable store (SQLite by default), the runner that feeds their
requests to the scheduler a bounded number at a time, and the API the servicer calls."""

from __future__ import annotations

from pathlib import Path

from engine_builder.fetch import backfill_home
from server.jobs.api import Jobs
from server.jobs.config import MEMORY_STORE, JobsConfig
from server.jobs.memory_store import MemoryJobStore
from server.jobs.runner import JobRunner
from server.jobs.sqlite_store import SQLiteJobStore
from server.jobs.store import JobStore, JobStoreInUseError

DEFAULT_STORE_NAME = "jobs.db"


def store_path(config: JobsConfig) -> Path | None:
    """Where the store lives: ``config.store``, else ``$BACKFILL_HOME/jobs.db``; None for the
    in-memory store."""
    if config.store == MEMORY_STORE:
        return None
    if config.store:
        return Path(config.store).expanduser()
    return backfill_home() / DEFAULT_STORE_NAME


def files_path(config: JobsConfig) -> Path | None:
    """Where the HTTP surface keeps uploaded files: beside the store (``jobs.files/`` for
    ``jobs.db``); None (a temporary directory) for the in-memory store."""
    path = store_path(config)
    return None if path is None else path.with_suffix(".files")


def open_store(config: JobsConfig) -> JobStore:
    """The configured store (JobStoreInUseError when another server holds the file)."""
    path = store_path(config)
    return MemoryJobStore() if path is None else SQLiteJobStore(path)


__all__ = [
    "MEMORY_STORE",
    "JobRunner",
    "JobStore",
    "JobStoreInUseError",
    "Jobs",
    "JobsConfig",
    "MemoryJobStore",
    "SQLiteJobStore",
    "files_path",
    "open_store",
    "store_path",
]
