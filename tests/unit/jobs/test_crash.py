"""kill -9 in the middle of a job, then a restart on the same job store: no finished result is
lost or changed, none is reported twice, and the job completes. A real ``python -m server``
process on the tiny engine (the real CPU executor), really SIGKILLed."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from client import Client, JobState
from client.bench.local_server import LocalServer

pytestmark = pytest.mark.unit

TOTAL = 300


def requests() -> list[dict[str, object]]:
    return [{"id": f"q{i}", "token_ids": [3 + i % 200, 5 + i % 7], "max_tokens": 48,
             "temperature": 0.0, "ignore_eos": True} for i in range(TOTAL)]


def test_kill_9_mid_job_loses_nothing_and_the_job_completes(
    tiny_engine: Path, tmp_path: Path
) -> None:
    store = tmp_path / "jobs.db"
    args = ("--metrics-port", "-1", "--job-store", str(store))
    first = LocalServer(tiny_engine, *args, log_path=tmp_path / "first.log")
    try:
        with Client(first.address, tenant="crash") as client:
            job = client.submit_batch(requests(), idempotency_key="crash-test")
            deadline = time.monotonic() + 120
            while (progress := client.get_batch(job.id)).completed < 40:
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.02)
            before = []
            with client.results(job.id) as results:
                for result in results:
                    before.append(result)
                    if len(before) == 30:
                        break
    finally:
        first.proc.kill()  # SIGKILL: no drain, no flush, no goodbye
        first.proc.wait()
        first.stop()
    assert first.proc.returncode == -9
    assert progress.completed < TOTAL, "the job finished before the kill; make it longer"

    second = LocalServer(tiny_engine, *args, log_path=tmp_path / "second.log")
    try:
        with Client(second.address, tenant="crash") as client:
            resumed = client.get_batch(job.id)
            assert resumed.completed >= progress.completed  # nothing committed was lost
            assert resumed.state in (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED)
            after = list(client.results(job.id))
            done = client.get_batch(job.id)
    finally:
        second.stop()
    assert [r.index for r in after] == list(range(TOTAL))  # each result once, in order
    assert after[:30] == before  # byte for byte, finish time included: never rewritten
    assert all(r.error is None and len(r.token_ids) == 48 for r in after)
    assert done.state is JobState.COMPLETED
    assert (done.completed, done.failed, done.cancelled) == (TOTAL, 0, 0)
    with sqlite3.connect(store) as db:
        (ended,) = db.execute("SELECT count(*) FROM items WHERE outcome != 0").fetchone()
        (counted,) = db.execute("SELECT completed FROM jobs").fetchone()
    assert ended == counted == TOTAL
