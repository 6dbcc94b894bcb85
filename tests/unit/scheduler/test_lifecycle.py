"""One request's life: tokens, finals, deadlines, cancels, executor errors, timing, counters."""

from __future__ import annotations

import pytest

from server.executor.base import ExecRequest, SamplingParams
from server.scheduler import BackfillScheduler, Outcome, SchedEvent, SchedulerConfig
from tests.unit.scheduler.helpers import (
    FakeClock,
    Recorder,
    Shape,
    fake,
    offline,
    online,
    run_until_idle,
)

pytestmark = pytest.mark.unit


def test_stream_matches_executor_output_with_one_final_event() -> None:
    ex = fake()
    ex.script((7, 7), (5, 6, 7))  # STOP after three tokens
    sched = BackfillScheduler(ex, SchedulerConfig())
    rec = Recorder()
    a = sched.submit(online((7, 7), max_tokens=10), rec)
    b = sched.submit(offline((8, 8), max_tokens=4), rec)
    run_until_idle(sched, rec, [a, b])
    assert rec.tokens(a) == (5, 6, 7)
    assert rec.final(a).outcome is Outcome.STOP
    assert rec.tokens(b) == ex.expected_output((8, 8), SamplingParams(max_tokens=4))[0]
    assert rec.final(b).outcome is Outcome.LENGTH
    usage = rec.final(b).usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 4)
    assert "".join(e.text for e in rec.events[a]) == "<5><6><7>"


def test_timing_uses_the_scheduler_clock() -> None:
    clock = FakeClock(100.0)
    sched = BackfillScheduler(fake(), SchedulerConfig(), clock=clock)
    rec = Recorder()
    rid = sched.submit(online(max_tokens=2), rec)
    clock.advance(1.0)
    sched.run_pass()  # admitted at 101
    clock.advance(2.0)
    sched.run_pass()  # first token at 103
    clock.advance(4.0)
    run_until_idle(sched, rec, [rid])  # final at 107
    timing = rec.final(rid).timing
    assert timing is not None
    assert (timing.queue_seconds, timing.ttft_seconds, timing.total_seconds) == (1.0, 3.0, 7.0)
    assert timing.preemptions == 0


def test_queued_request_past_its_deadline_is_dropped_without_running() -> None:
    clock = FakeClock()
    ex = fake(Shape(slots=1))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.0), clock=clock)
    rec = Recorder()
    long = sched.submit(online((1,), max_tokens=30), rec)
    sched.run_pass()  # takes the only slot
    late = sched.submit(online((2,), deadline=5.0), rec)
    on_time = sched.submit(online((3,), max_tokens=2, deadline=50.0), rec)
    sched.run_pass()
    clock.advance(6.0)
    sched.run_pass()
    final = rec.final(late)
    assert final.outcome is Outcome.DEADLINE
    assert rec.tokens(late) == ()
    assert final.usage is not None and final.usage.completion_tokens == 0
    assert final.timing is not None and final.timing.ttft_seconds is None
    assert (2,) not in {r.prompt_token_ids for r in ex.enqueued}
    run_until_idle(sched, rec, [long, on_time])
    assert rec.final(on_time).outcome is Outcome.LENGTH


def test_cancel_queued_ends_at_once_and_never_runs() -> None:
    ex = fake(Shape(slots=1))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.0))
    rec = Recorder()
    sched.submit(online((1,), max_tokens=30), rec)
    queued = sched.submit(online((2,)), rec)
    sched.run_pass()
    sched.cancel(queued)
    sched.cancel(queued)  # idempotent
    sched.run_pass()
    assert rec.final(queued).outcome is Outcome.CANCELLED
    assert rec.tokens(queued) == ()
    assert (2,) not in {r.prompt_token_ids for r in ex.enqueued}
    assert sched.snapshot().online.queued == 0


def test_cancel_running_frees_slot_and_blocks_when_the_executor_confirms() -> None:
    ex = fake(Shape(slots=2))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.0))
    rec = Recorder()
    rid = sched.submit(online(tuple(range(1, 10)), max_tokens=30), rec)
    for _ in range(3):
        sched.run_pass()
    assert ex.stats().kv_blocks_used > 0 and rec.tokens(rid)
    sched.cancel(rid)
    sched.run_pass()  # tells the executor
    sched.run_pass()  # collects its CANCELLED final
    assert rec.final(rid).outcome is Outcome.CANCELLED
    assert ex.is_idle()
    assert sched.snapshot().online.running == 0
    sched.cancel(rid)
    sched.cancel(12345)  # unknown ids are a no-op
    sched.run_pass()
    assert len(rec.finals(rid)) == 1


def test_executor_refusal_fails_only_that_request() -> None:
    ex = fake(reject_fn=lambda r: "poisoned" if r.prompt_token_ids[0] == 13 else None)
    sched = BackfillScheduler(ex, SchedulerConfig())
    rec = Recorder()
    ids = [sched.submit(online((p, 1), max_tokens=3), rec) for p in (12, 13, 14)]
    run_until_idle(sched, rec, ids)
    bad = rec.final(ids[1])
    assert bad.outcome is Outcome.ERROR and bad.error is not None and "poisoned" in bad.error
    assert [rec.final(i).outcome for i in (ids[0], ids[2])] == [Outcome.LENGTH] * 2
    assert ex.is_idle()


def test_executor_error_ends_the_request_with_its_message() -> None:
    def fail(request: ExecRequest, done: int) -> str | None:
        return "NaN in logits" if request.prompt_token_ids == (9,) and done == 2 else None

    ex = fake(error_fn=fail)
    sched = BackfillScheduler(ex, SchedulerConfig())
    rec = Recorder()
    bad = sched.submit(online((9,), max_tokens=5), rec)
    good = sched.submit(online((8,), max_tokens=5), rec)
    run_until_idle(sched, rec, [bad, good])
    assert rec.final(bad).outcome is Outcome.ERROR
    assert rec.final(bad).error == "NaN in logits"
    assert len(rec.tokens(bad)) == 2
    assert rec.final(good).outcome is Outcome.LENGTH


def test_a_failing_sink_does_not_stop_other_streams() -> None:
    def broken(event: SchedEvent) -> None:
        raise RuntimeError("client went away")

    sched = BackfillScheduler(fake(), SchedulerConfig())
    rec = Recorder()
    sched.submit(online((1,)), broken)
    rid = sched.submit(online((2,)), rec)
    run_until_idle(sched, rec, [rid])
    assert rec.final(rid).outcome is Outcome.LENGTH


def test_snapshot_counts_per_tier() -> None:
    sched = BackfillScheduler(fake(Shape(slots=2)), SchedulerConfig(offline_reserve=0.5))
    rec = Recorder()
    ids = [sched.submit(online((i,), max_tokens=3), rec) for i in (1, 2)]
    ids += [sched.submit(offline((i,), max_tokens=5), rec) for i in (3, 4)]
    snap = sched.snapshot()
    assert (snap.online.queued, snap.offline.queued, snap.slots_total) == (2, 2, 2)
    sched.run_pass()
    snap = sched.snapshot()
    assert (snap.online.running, snap.offline.running) == (1, 1)
    assert (snap.online.queued, snap.offline.queued) == (1, 1)
    run_until_idle(sched, rec, ids)
    snap = sched.snapshot()
    assert (snap.online.finished, snap.offline.finished) == (2, 2)
    assert (snap.online.generated_tokens, snap.offline.generated_tokens) == (6, 10)
    assert snap.online.running == snap.offline.running == 0
    assert snap.passes > 0 and not snap.draining
