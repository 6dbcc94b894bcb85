"""The result writer: a thread that commits finished requests to the job store in batches.

Finishes arrive from the scheduler's thread (one ``put`` per finished request, which never
blocks); the writer commits whatever has gathered at least every ``flush_s`` (sooner when a
batch is large), in one transaction, then reports the batch. One commit per batch, not per
request, is what keeps persistence cheap. A failed commit (a full disk) is retried with the
same batch, so nothing is lost; meanwhile the runner stops feeding new work, because what sits
here still counts as in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.jobs.store import ItemResult, JobStore

log = logging.getLogger(__name__)

BATCH_SIZE = 512  # finishes that wake the writer before its interval is up
RETRY_S = 1.0  # wait after a failed commit


@dataclass(frozen=True, slots=True)
class Finish:
    """A job request left the scheduler. ``make_result`` builds what to store (on the writer's
    thread, off the scheduler's); it returns None when nothing is to be stored (the server
    stopped it, so it stays pending for the next start)."""

    job_id: str
    index: int
    make_result: Callable[[], ItemResult | None]


# (the batch just committed, the jobs whose every request has now ended); the writer's thread
OnCommit = Callable[[Sequence[Finish], set[str]], None]


class ResultWriter:
    def __init__(self, store: JobStore, on_commit: OnCommit, flush_s: float) -> None:
        self._store = store
        self._on_commit = on_commit
        self._flush_s = flush_s
        self._queue: deque[Finish] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._idle = threading.Condition()
        self._put_lock = threading.Lock()  # puts come from the scheduler's and the loop's threads
        self._put_count = 0  # finishes put, ever
        self._done_count = 0  # finishes committed and reported, ever
        self._thread = threading.Thread(target=self._run, name="backfill-job-writer",
                                        daemon=True)
        self._thread.start()

    def put(self, finish: Finish) -> None:
        """Any thread; never blocks."""
        with self._put_lock:
            self._queue.append(finish)
            self._put_count += 1
        if len(self._queue) >= BATCH_SIZE:
            self._wake.set()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until everything put so far is committed; False on timeout."""
        target = self._put_count
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: self._done_count >= target, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self._flush_s)
            self._wake.clear()
            while self._queue:
                self._commit(self._take())

    def _take(self) -> list[Finish]:
        batch: list[Finish] = []
        while self._queue and len(batch) < 4 * BATCH_SIZE:
            batch.append(self._queue.popleft())
        return batch

    def _commit(self, batch: list[Finish]) -> None:
        results = [r for r in (f.make_result() for f in batch) if r is not None]
        while True:
            try:
                finished = self._store.record_results(results) if results else set()
                break
            except Exception:
                if self._closing:
                    log.exception("dropping %d job results: the store failed", len(results))
                    finished = set()
                    break
                log.exception("writing %d job results failed; retrying", len(results))
                time.sleep(RETRY_S)
        try:
            self._on_commit(batch, finished)
        except Exception:
            log.exception("reporting committed job results failed")
        with self._idle:
            self._done_count += len(batch)
            self._idle.notify_all()
