"""The embedded job store: one SQLite file in WAL mode.

Durability: WAL with ``synchronous=NORMAL`` makes every committed transaction survive the
process being killed (kill -9, a crash); a power loss may lose the last few transactions but
never corrupts the file. The writer commits finished results in batches, so the cost is one
commit per batch, not per token or per request.

Layout: a request's row key is ``job number << 32 | index``, so a job's requests are one
contiguous range of the table in index order (reads and scans need no other index).

One process at a time: an exclusive lock on ``PATH.lock`` (released by the OS when the process
dies, kill -9 included) keeps a second server from running the same jobs twice.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from server.jobs.sqlite_schema import (
    INDEX_BITS,
    JOB_COLUMNS,
    MAX_PARAMS,
    SCHEMA,
    SCHEMA_VERSION,
    job_record,
    key_range,
    lock_exclusively,
    placeholders,
)
from server.jobs.store import (
    COUNTERS,
    STOPPABLE_STATES,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    ItemResult,
    JobPage,
    JobRecord,
    JobState,
    KeyedJob,
    NewItem,
    NewJob,
    Outcome,
    PendingItem,
    StoredResult,
    UnknownJobError,
)


class SQLiteJobStore:
    """See ``server.jobs.store.JobStore``. One writing connection (serialized by a lock) and
    one reading connection per thread: WAL lets reads run while a write is in progress."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_exclusively(self.path)
        self._write = self._connect()
        self._write.execute("PRAGMA journal_mode=WAL")
        self._check_schema()
        self._write_lock = threading.Lock()
        self._readers = threading.local()
        self._all_readers: list[sqlite3.Connection] = []
        self._numbers: dict[str, int] = {}  # job id -> job number

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _check_schema(self) -> None:
        (version,) = self._write.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"job store {self.path} has schema {version}, newer than this server's "
                f"({SCHEMA_VERSION}); upgrade the server or use another --job-store"
            )
        self._write.executescript(SCHEMA)
        self._write.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._write_lock:
            cur = self._write.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _read(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._readers.conn = self._connect()
            conn.execute("PRAGMA query_only=1")
            self._all_readers.append(conn)
        return conn

    def _no(self, job_id: str) -> int | None:
        no = self._numbers.get(job_id)
        if no is None:
            row = self._read().execute("SELECT no FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is not None:
                no = self._numbers[job_id] = row[0]
        return no

    def _need_no(self, job_id: str) -> int:
        no = self._no(job_id)
        if no is None:
            raise UnknownJobError(job_id)
        return no

    # ---- uploads ------------------------------------------------------------------------------

    def create_job(self, job: NewJob) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO jobs (id, tenant, labels, state, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job.id, job.tenant, json.dumps(dict(job.labels), sort_keys=True),
                 JobState.VALIDATING.value, job.created_at, job.expires_at),
            )
            self._numbers[job.id] = int(cur.lastrowid or 0)

    def add_items(self, job_id: str, items: Sequence[NewItem]) -> None:
        no = self._need_no(job_id)
        base = no << INDEX_BITS
        rows = []
        failed = 0
        for item in items:
            f = item.failure
            failed += f is not None
            rows.append((
                base | item.index, no, item.custom_id or None, item.url, item.model, item.request,
                Outcome.PENDING if f is None else f.outcome, None if f is None else f.result,
                None if f is None else f.finished_at,
            ))
        with self._tx() as cur:
            cur.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            cur.execute("UPDATE jobs SET total=total+?, failed=failed+? WHERE no=?",
                        (len(rows), failed, no))

    def known_custom_ids(self, job_id: str, custom_ids: Collection[str]) -> set[str]:
        no = self._need_no(job_id)
        ids = list(custom_ids)
        found: set[str] = set()
        for i in range(0, len(ids), MAX_PARAMS):
            chunk = ids[i:i + MAX_PARAMS]
            rows = self._read().execute(
                f"SELECT custom_id FROM items WHERE job=? AND custom_id IN ({placeholders(chunk)})",
                (no, *chunk),
            )
            found.update(r[0] for r in rows)
        return found

    def commit_job(self, job_id: str, idempotency_key: str, digest: bytes, at: float) -> KeyedJob:
        no = self._need_no(job_id)
        with self._tx() as cur:
            tenant, total, failed = cur.execute(
                "SELECT tenant, total, failed FROM jobs WHERE no=?", (no,)
            ).fetchone()
            if idempotency_key:
                row = cur.execute(
                    f"SELECT {JOB_COLUMNS}, digest FROM jobs WHERE tenant=? AND "
                    "idempotency_key=?", (tenant, idempotency_key),
                ).fetchone()
                if row is not None:
                    self._delete(cur, no)
                    return KeyedJob(job_record(row), row[-1])
            everything_failed = total > 0 and failed == total
            cur.execute(
                "UPDATE jobs SET state=?, error=?, finished_at=?, idempotency_key=?, digest=? "
                "WHERE no=?",
                (
                    (JobState.FAILED if everything_failed else JobState.QUEUED).value,
                    "every request of the job failed validation" if everything_failed else "",
                    at if everything_failed else None,
                    idempotency_key or None, digest, no,
                ),
            )
            row = cur.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE no=?", (no,)).fetchone()
        return KeyedJob(job_record(row), digest)

    def discard_job(self, job_id: str) -> None:
        no = self._no(job_id)
        if no is not None:
            with self._tx() as cur:
                self._delete(cur, no)

    def _delete(self, cur: sqlite3.Cursor, no: int) -> None:
        row = cur.execute("SELECT id FROM jobs WHERE no=?", (no,)).fetchone()
        cur.execute("DELETE FROM items WHERE key BETWEEN ? AND ?", key_range(no))
        cur.execute("DELETE FROM jobs WHERE no=?", (no,))
        if row is not None:
            self._numbers.pop(row[0], None)

    # ---- reads --------------------------------------------------------------------------------

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        row = self._read().execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=? AND tenant=? AND state!=?",
            (job_id, tenant, JobState.VALIDATING.value),
        ).fetchone()
        return None if row is None else job_record(row)

    def list_jobs(self, tenant: str, limit: int, after: str) -> JobPage:
        conn = self._read()
        below = 2**63 - 1
        if after:
            row = conn.execute("SELECT no FROM jobs WHERE id=? AND tenant=?",
                               (after, tenant)).fetchone()
            if row is None:
                return JobPage()
            below = row[0]
        rows = conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE tenant=? AND no<? AND state!=? "
            "ORDER BY no DESC LIMIT ?",
            (tenant, below, JobState.VALIDATING.value, limit + 1 if limit else -1),
        ).fetchall()
        has_more = bool(limit) and len(rows) > limit
        return JobPage([job_record(r) for r in (rows[:limit] if limit else rows)], has_more)

    def find_key(self, tenant: str, idempotency_key: str) -> KeyedJob | None:
        row = self._read().execute(
            f"SELECT {JOB_COLUMNS}, digest FROM jobs WHERE tenant=? AND idempotency_key=?",
            (tenant, idempotency_key),
        ).fetchone()
        return None if row is None else KeyedJob(job_record(row), row[-1])

    def results(self, job_id: str, start: int, limit: int) -> list[StoredResult]:
        no = self._need_no(job_id)
        low, high = key_range(no)
        rows = self._read().execute(
            "SELECT key, custom_id, url, model, outcome, result, finished_at FROM items "
            "WHERE key BETWEEN ? AND ? ORDER BY key LIMIT ?",
            (low + start, high, limit),
        )
        return [
            StoredResult(key - low, cid or "", url, model, Outcome(outcome), result, finished)
            for key, cid, url, model, outcome, result, finished in rows
        ]

    # ---- running ------------------------------------------------------------------------------

    def unfinished_jobs(self) -> list[JobRecord]:
        with self._tx() as cur:
            stale = cur.execute("SELECT no FROM jobs WHERE state=?",
                                (JobState.VALIDATING.value,)).fetchall()
            for (no,) in stale:
                self._delete(cur, no)
        states = [s.value for s in UNFINISHED_STATES]
        rows = self._read().execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({placeholders(states)}) ORDER BY no",
            states,
        )
        return [job_record(r) for r in rows]

    def pending_items(self, job_id: str, start: int, limit: int) -> list[PendingItem]:
        no = self._need_no(job_id)
        low, high = key_range(no)
        rows = self._read().execute(
            "SELECT key, custom_id, url, model, request FROM items "
            "WHERE key BETWEEN ? AND ? AND outcome=? ORDER BY key LIMIT ?",
            (low + start, high, Outcome.PENDING, limit),
        )
        return [PendingItem(key - low, cid or "", url, model, request)
                for key, cid, url, model, request in rows]

    def transition(
        self, job_id: str, from_states: Collection[JobState], to: JobState, at: float
    ) -> bool:
        no = self._need_no(job_id)
        froms = [s.value for s in from_states]
        started = at if to is JobState.RUNNING else None
        with self._tx() as cur:
            cur.execute(
                f"UPDATE jobs SET state=?, started_at=coalesce(started_at, ?) "
                f"WHERE no=? AND state IN ({placeholders(froms)})",
                (to.value, started, no, *froms),
            )
            return cur.rowcount == 1

    def record_results(self, results: Sequence[ItemResult]) -> set[str]:
        by_key: dict[int, ItemResult] = {}
        for r in results:
            by_key.setdefault(self._need_no(r.job_id) << INDEX_BITS | r.index, r)
        counts: dict[str, dict[str, int]] = {}
        started: dict[str, float] = {}  # job id -> its earliest fresh result's end
        with self._tx() as cur:
            fresh = self._pending_keys(cur, list(by_key))
            cur.executemany(
                "UPDATE items SET outcome=?, result=?, finished_at=?, request=NULL WHERE key=?",
                [(by_key[k].outcome, by_key[k].result, by_key[k].finished_at, k) for k in fresh],
            )
            for k in fresh:
                r = by_key[k]
                c = counts.setdefault(r.job_id, dict.fromkeys((*COUNTERS.values(), "tokens"), 0))
                c[COUNTERS[r.outcome]] += 1
                c["tokens"] += r.completion_tokens
                started[r.job_id] = min(started.get(r.job_id, r.finished_at), r.finished_at)
            done: set[str] = set()
            for job_id, c in counts.items():
                no = self._need_no(job_id)
                if c["completed"]:  # a request ran even if the runner's own mark is not in yet
                    cur.execute(
                        "UPDATE jobs SET state=?, started_at=coalesce(started_at, ?) "
                        "WHERE no=? AND state=?",
                        (JobState.RUNNING.value, started[job_id], no, JobState.QUEUED.value),
                    )
                cur.execute(
                    "UPDATE jobs SET completed=completed+?, failed=failed+?, "
                    "cancelled=cancelled+?, expired=expired+?, "
                    "completion_tokens=completion_tokens+? WHERE no=?",
                    (c["completed"], c["failed"], c["cancelled"], c["expired"], c["tokens"], no),
                )
                cur.execute(
                    "UPDATE jobs SET state=? WHERE no=? AND state IN (?, ?) "
                    "AND completed+failed+cancelled+expired>=total",
                    (JobState.FINALIZING.value, no, JobState.QUEUED.value,
                     JobState.RUNNING.value),
                )
                if cur.rowcount:
                    done.add(job_id)
        return done

    @staticmethod
    def _pending_keys(cur: sqlite3.Cursor, keys: list[int]) -> list[int]:
        """Which of keys are requests still pending (the others have their result already)."""
        out: list[int] = []
        for i in range(0, len(keys), MAX_PARAMS):
            chunk = keys[i:i + MAX_PARAMS]
            out.extend(k for (k,) in cur.execute(
                f"SELECT key FROM items WHERE key IN ({placeholders(chunk)}) AND outcome=?",
                (*chunk, Outcome.PENDING)))
        return out

    def close_pending(self, job_id: str, outcome: Outcome, at: float) -> None:
        no = self._need_no(job_id)
        state = JobState.CANCELLED if outcome is Outcome.CANCELLED else JobState.EXPIRED
        with self._tx() as cur:
            (current,) = cur.execute("SELECT state FROM jobs WHERE no=?", (no,)).fetchone()
            if JobState(current) not in STOPPABLE_STATES:
                return  # it ended meanwhile (its last requests finished)
            cur.execute(
                "UPDATE items SET outcome=?, finished_at=?, request=NULL "
                "WHERE key BETWEEN ? AND ? AND outcome=?",
                (outcome, at, *key_range(no), Outcome.PENDING),
            )
            column = COUNTERS[outcome]
            cur.execute(
                f"UPDATE jobs SET {column}={column}+?, state=?, finished_at=? WHERE no=?",
                (cur.rowcount, state.value, at, no),
            )

    def finalize(self, job_id: str, at: float) -> None:
        no = self._need_no(job_id)
        with self._tx() as cur:
            cur.execute(
                "UPDATE jobs SET state=CASE WHEN expired>0 THEN ? ELSE ? END, finished_at=? "
                "WHERE no=? AND state=?",
                (JobState.EXPIRED.value, JobState.COMPLETED.value, at, no,
                 JobState.FINALIZING.value),
            )

    def purge(self, finished_before: float, limit: int) -> int:
        states = [s.value for s in TERMINAL_STATES]
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT no FROM jobs WHERE finished_at<? AND state IN ({placeholders(states)}) "
                "ORDER BY finished_at LIMIT ?",
                (finished_before, *states, limit),
            ).fetchall()
            for (no,) in rows:
                self._delete(cur, no)
        return len(rows)

    def close(self) -> None:
        for conn in self._all_readers:
            conn.close()
        with self._write_lock:
            with contextlib.suppress(sqlite3.Error):
                self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._write.close()
        self._lock_file.close()
