"""The job store contract, run against both implementations (SQLite and in-memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.jobs import JobStoreInUseError, MemoryJobStore, SQLiteJobStore
from server.jobs.store import (
    ItemResult,
    JobState,
    JobStore,
    NewItem,
    NewJob,
    Outcome,
)

pytestmark = pytest.mark.unit


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s: JobStore = SQLiteJobStore(tmp_path / "jobs.db") if request.param == "sqlite" \
        else MemoryJobStore()
    yield s
    s.close()


def new_job(store: JobStore, job_id: str, n: int, tenant: str = "t", failed: int = 0,
            key: str = "", expires_at: float = 1e12) -> None:
    store.create_job(NewJob(job_id, tenant, {"a": "b"}, 1.0, expires_at))
    items = [NewItem(i, f"c{i}", "", "m", b"req%d" % i) for i in range(n - failed)]
    items += [NewItem(i, f"c{i}", "", "m", None, fail(job_id, i)) for i in range(n - failed, n)]
    store.add_items(job_id, items)
    store.commit_job(job_id, key, b"digest-" + job_id.encode(), 2.0)


def fail(job_id: str, index: int) -> ItemResult:
    return ItemResult(job_id, index, Outcome.FAILED, b"bad%d" % index, 0, 1.5)


def ok(job_id: str, index: int, tokens: int = 3) -> ItemResult:
    return ItemResult(job_id, index, Outcome.COMPLETED, b"ok%d" % index, tokens, 3.0)


def test_upload_is_invisible_until_committed(store: JobStore) -> None:
    store.create_job(NewJob("j", "t", {}, 1.0, 100.0))
    store.add_items("j", [NewItem(0, "x", "/v1/completions", "m", b"r0")])
    assert store.get_job("t", "j") is None and store.list_jobs("t", 0, "").jobs == []
    assert store.known_custom_ids("j", {"x", "y"}) == {"x"}
    keyed = store.commit_job("j", "", b"d", 2.0)
    assert keyed.job.state is JobState.QUEUED and keyed.job.total == 1
    assert store.get_job("t", "j") == keyed.job


def test_jobs_are_scoped_by_tenant(store: JobStore) -> None:
    new_job(store, "a", 1, tenant="alice")
    new_job(store, "b", 1, tenant="bob")
    assert store.get_job("bob", "a") is None and store.get_job("alice", "a") is not None
    assert [j.id for j in store.list_jobs("alice", 0, "").jobs] == ["a"]
    assert store.list_jobs("bob", 0, "a").jobs == []  # another tenant's cursor is unknown


def test_list_pages_newest_first(store: JobStore) -> None:
    for i in range(5):
        new_job(store, f"j{i}", 1)
    page = store.list_jobs("t", 2, "")
    assert [j.id for j in page.jobs] == ["j4", "j3"] and page.has_more
    page = store.list_jobs("t", 2, "j3")
    assert [j.id for j in page.jobs] == ["j2", "j1"] and page.has_more
    page = store.list_jobs("t", 2, "j1")
    assert [j.id for j in page.jobs] == ["j0"] and not page.has_more


def test_results_are_recorded_once_and_counted(store: JobStore) -> None:
    new_job(store, "j", 3, failed=1)
    assert store.get_job("t", "j").failed == 1  # type: ignore[union-attr]
    assert [p.index for p in store.pending_items("j", 0, 10)] == [0, 1]
    assert store.record_results([ok("j", 0)]) == set()
    # A second result for the same request (a replay) changes nothing.
    assert store.record_results([ok("j", 0, tokens=99)]) == set()
    job = store.get_job("t", "j")
    assert job is not None and (job.completed, job.completion_tokens) == (1, 3)
    assert [p.index for p in store.pending_items("j", 0, 10)] == [1]
    assert store.record_results([ok("j", 1)]) == {"j"}
    assert store.get_job("t", "j").state is JobState.FINALIZING  # type: ignore[union-attr]
    store.finalize("j", 9.0)
    job = store.get_job("t", "j")
    assert job is not None and job.state is JobState.COMPLETED and job.finished_at == 9.0
    results = store.results("j", 0, 10)
    assert [(r.index, r.custom_id, r.outcome, r.result) for r in results] == [
        (0, "c0", Outcome.COMPLETED, b"ok0"), (1, "c1", Outcome.COMPLETED, b"ok1"),
        (2, "c2", Outcome.FAILED, b"bad2")]
    assert [r.index for r in store.results("j", 1, 1)] == [1]


def test_every_line_failed_is_a_failed_job(store: JobStore) -> None:
    new_job(store, "j", 2, failed=2)
    job = store.get_job("t", "j")
    assert job is not None and job.state is JobState.FAILED and job.error
    assert job.terminal and store.unfinished_jobs() == []


def test_idempotency_key_keeps_the_first_job(store: JobStore) -> None:
    new_job(store, "first", 1, key="k")
    store.create_job(NewJob("second", "t", {}, 1.0, 100.0))
    store.add_items("second", [NewItem(0, "", "", "m", b"r")])
    keyed = store.commit_job("second", "k", b"other", 2.0)
    assert keyed.job.id == "first" and keyed.digest == b"digest-first"
    assert store.get_job("t", "second") is None  # discarded
    found = store.find_key("t", "k")
    assert found is not None and found.job.id == "first"
    assert store.find_key("other-tenant", "k") is None


def test_cancel_and_expiry_close_what_is_pending(store: JobStore) -> None:
    new_job(store, "c", 3)
    new_job(store, "e", 3)
    store.record_results([ok("c", 0), ok("e", 0)])
    assert store.transition("c", {JobState.QUEUED, JobState.RUNNING}, JobState.CANCELLING, 4.0)
    assert not store.transition("c", {JobState.QUEUED}, JobState.RUNNING, 4.0)
    store.close_pending("c", Outcome.CANCELLED, 5.0)
    store.close_pending("e", Outcome.EXPIRED, 5.0)
    c, e = store.get_job("t", "c"), store.get_job("t", "e")
    assert c is not None and (c.state, c.completed, c.cancelled) == (JobState.CANCELLED, 1, 2)
    assert e is not None and (e.state, e.completed, e.expired) == (JobState.EXPIRED, 1, 2)
    assert [r.outcome for r in store.results("e", 0, 5)] == [
        Outcome.COMPLETED, Outcome.EXPIRED, Outcome.EXPIRED]
    assert store.results("e", 1, 1)[0].result is None


def test_close_pending_leaves_a_job_that_ended_meanwhile(store: JobStore) -> None:
    new_job(store, "j", 1)
    store.record_results([ok("j", 0)])  # FINALIZING now
    store.close_pending("j", Outcome.EXPIRED, 5.0)
    store.finalize("j", 6.0)
    job = store.get_job("t", "j")
    assert job is not None and job.state is JobState.COMPLETED and job.expired == 0


def test_restart_drops_unfinished_uploads_and_lists_unfinished_jobs(store: JobStore) -> None:
    new_job(store, "run", 2)
    assert store.transition("run", {JobState.QUEUED}, JobState.RUNNING, 3.0)
    new_job(store, "done", 1)
    store.record_results([ok("done", 0)])
    store.finalize("done", 4.0)
    store.create_job(NewJob("half", "t", {}, 1.0, 100.0))
    unfinished = store.unfinished_jobs()
    assert [j.id for j in unfinished] == ["run"]
    assert unfinished[0].state is JobState.RUNNING and unfinished[0].started_at == 3.0


def test_purge_deletes_jobs_past_retention(store: JobStore) -> None:
    for name in ("old", "new"):
        new_job(store, name, 1)
        store.record_results([ok(name, 0)])
    store.finalize("old", 10.0)
    store.finalize("new", 20.0)
    assert store.purge(15.0, 10) == 1
    assert store.get_job("t", "old") is None and store.get_job("t", "new") is not None


def test_sqlite_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    new_job(store, "j", 2)
    store.record_results([ok("j", 0)])
    store.close()
    store = SQLiteJobStore(path)
    try:
        job = store.get_job("t", "j")
        assert job is not None and job.completed == 1
        assert [p.index for p in store.pending_items("j", 0, 5)] == [1]
        assert store.results("j", 0, 1)[0].result == b"ok0"
    finally:
        store.close()


def test_sqlite_store_serves_one_server_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    try:
        with pytest.raises(JobStoreInUseError, match="in use by another server"):
            SQLiteJobStore(path)
    finally:
        store.close()
    SQLiteJobStore(path).close()  # the lock went with the first one


def test_a_completed_result_makes_a_queued_job_running(store: JobStore) -> None:
    """The runner marks a job RUNNING in a call of its own, which may come after the first
    result is written; a job with a completed result never reads as QUEUED."""
    new_job(store, "j", 3)
    store.record_results([fail("j", 1)])
    assert store.get_job("t", "j").state is JobState.QUEUED  # type: ignore[union-attr]
    store.record_results([ok("j", 0)])
    job = store.get_job("t", "j")
    assert job is not None and (job.state, job.started_at) == (JobState.RUNNING, 3.0)
    assert not store.transition("j", {JobState.QUEUED}, JobState.RUNNING, 4.0)  # the late mark
    store.record_results([ok("j", 2)])
    assert store.get_job("t", "j").state is JobState.FINALIZING  # type: ignore[union-attr]
    assert store.get_job("t", "j").started_at == 3.0  # type: ignore[union-attr]
