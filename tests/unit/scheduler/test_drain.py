"""Drain and stop, stepped by hand and with the background thread."""

from __future__ import annotations

import threading

import pytest

from server.scheduler import BackfillScheduler, DrainingError, Outcome, SchedulerConfig
from tests.unit.scheduler.helpers import Recorder, Shape, fake, offline, online, run_until_idle

pytestmark = pytest.mark.unit


def test_begin_drain_refuses_new_work_but_finishes_old() -> None:
    sched = BackfillScheduler(fake(), SchedulerConfig())
    rec = Recorder()
    rid = sched.submit(online(), rec)
    sched.begin_drain()
    with pytest.raises(DrainingError):
        sched.submit(online(), rec)
    assert sched.snapshot().draining
    run_until_idle(sched, rec, [rid])
    assert rec.final(rid).outcome is Outcome.LENGTH


def test_stop_lets_online_finish_and_returns_unfinished_offline() -> None:
    ex = fake(Shape(slots=3))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.34))
    rec = Recorder()
    on = sched.submit(online((1,), max_tokens=5), rec)
    off_running = sched.submit(offline((2,), max_tokens=50), rec)
    off_queued = [sched.submit(offline((3 + i,), max_tokens=50), rec) for i in range(3)]
    sched.run_pass()
    unfinished = sched.stop(grace_s=5.0)
    assert rec.final(on).outcome is Outcome.LENGTH
    assert unfinished == sorted([off_running, *off_queued])
    for rid in unfinished:
        assert rec.final(rid).outcome is Outcome.SHUTDOWN
    assert ex.is_idle()
    with pytest.raises(DrainingError):
        sched.submit(online(), rec)
    assert sched.stop(grace_s=1.0) == unfinished  # idempotent
    assert all(len(rec.finals(i)) == 1 for i in [on, *unfinished])


def test_stop_with_no_grace_ends_online_too() -> None:
    ex = fake(Shape(slots=2))
    sched = BackfillScheduler(ex, SchedulerConfig())
    rec = Recorder()
    on = sched.submit(online((1,), max_tokens=50), rec)
    sched.run_pass()
    sched.run_pass()
    assert sched.stop(grace_s=0.0) == []
    final = rec.final(on)
    assert final.outcome is Outcome.SHUTDOWN
    assert final.usage is not None and final.usage.completion_tokens == len(rec.tokens(on)) > 0


def test_background_thread_delivers_events_from_its_own_thread() -> None:
    ex = fake(Shape(slots=4))
    sched = BackfillScheduler(ex, SchedulerConfig(window_ms=2.0))
    rec = Recorder()
    sched.start()
    with pytest.raises(RuntimeError):
        sched.start()
    ids: list[int] = []

    def client(base: int) -> None:
        for i in range(5):
            ids.append(sched.submit(online((base + i,), max_tokens=3), rec))
            ids.append(sched.submit(offline((base + 100 + i,), max_tokens=6), rec))

    threads = [threading.Thread(target=client, args=(k * 10,)) for k in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.wait_final(ids, timeout=20.0)
    assert sched.stop(grace_s=1.0) == []
    assert rec.threads == {"backfill-scheduler"}
    assert len(set(ids)) == 30
    assert all(rec.final(i).outcome is Outcome.LENGTH for i in ids)
    assert ex.is_idle()


def test_background_stop_shuts_down_unfinished_offline() -> None:
    ex = fake(Shape(slots=2))
    sched = BackfillScheduler(ex, SchedulerConfig(window_ms=2.0))
    rec = Recorder()
    sched.start()
    off = [sched.submit(offline((i,), max_tokens=100_000 // 1000), rec) for i in (1, 2, 3)]
    on = sched.submit(online((9,), max_tokens=3), rec)
    unfinished = sched.stop(grace_s=5.0)
    assert rec.final(on).outcome is Outcome.LENGTH
    assert set(unfinished) <= set(off)
    for rid in off:
        expected = Outcome.SHUTDOWN if rid in unfinished else Outcome.LENGTH
        assert rec.final(rid).outcome is expected
    assert rec.threads == {"backfill-scheduler"}


def test_draining_admits_no_queued_offline_work_and_ends_it_at_once() -> None:
    """Once draining starts, offline requests still queued never start (their results would
    be thrown away at stop): they end with SHUTDOWN in the next pass, while running offline
    work and online requests go on."""
    ex = fake(Shape(slots=3))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.34))
    rec = Recorder()
    on = sched.submit(online((1,), max_tokens=40), rec)
    running = [sched.submit(offline((2 + i,), max_tokens=3), rec) for i in range(2)]
    queued = [sched.submit(offline((10 + i,), max_tokens=3), rec) for i in range(20)]
    sched.run_pass()
    runs_before = len(ex.enqueued)
    sched.begin_drain()
    sched.run_pass()
    for rid in queued:
        assert rec.final(rid).outcome is Outcome.SHUTDOWN
    run_until_idle(sched, rec, [on, *running])
    assert len(ex.enqueued) == runs_before, "an offline request started while draining"
    assert rec.final(on).outcome is Outcome.LENGTH
    assert all(rec.final(rid).outcome is Outcome.LENGTH for rid in running)
    assert sched.stop(grace_s=0.0) == sorted(queued)
