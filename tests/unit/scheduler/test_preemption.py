"""Preemption by recompute: who is preempted, and that resumed streams continue exactly."""

from __future__ import annotations

import pytest

from server.executor.base import SamplingParams
from server.scheduler import BackfillScheduler, Outcome, SchedulerConfig
from tests.fakes import ScriptedExecutor
from tests.unit.scheduler.helpers import Recorder, Shape, fake, live_prompts, offline, online

pytestmark = pytest.mark.unit

OFFLINE_PROMPTS = [tuple(range(10 * i + 1, 10 * i + 7)) for i in range(1, 4)]  # 6 tokens each


def _three_offline_running(
    preemption: str,
) -> tuple[BackfillScheduler, ScriptedExecutor, Recorder, list[int]]:
    """3 slots, reserve 1; offline o1, o2, o3 started one pass apart (o3 newest)."""
    ex = fake(Shape(slots=3))
    config = SchedulerConfig(offline_reserve=0.34, preemption=preemption)
    sched = BackfillScheduler(ex, config)
    rec = Recorder()
    ids = []
    for prompt in OFFLINE_PROMPTS:
        ids.append(sched.submit(offline(prompt, max_tokens=20), rec))
        sched.run_pass()
        sched.run_pass()
    assert sched.snapshot().offline.running == 3
    return sched, ex, rec, ids


def test_preempts_offline_above_reserve_newest_first() -> None:
    sched, ex, rec, (_, o2, o3) = _three_offline_running("recompute")
    sched.submit(online((1,), max_tokens=3), rec)
    sched.run_pass()
    assert live_prompts(ex) == {OFFLINE_PROMPTS[0], OFFLINE_PROMPTS[1], (1,)}
    sched.submit(online((2,), max_tokens=3), rec)
    sched.submit(online((3,), max_tokens=3), rec)
    sched.run_pass()
    # o2 goes too, but o1 holds the reserve; the third online request waits.
    assert live_prompts(ex) == {OFFLINE_PROMPTS[0], (1,), (2,)}
    assert sched.snapshot().online.queued == 1
    assert sched.snapshot().offline.preemptions == 2
    assert rec.outcome(o2) is None and rec.outcome(o3) is None


def test_preempted_stream_resumes_without_gap_or_repeat() -> None:
    sched, ex, rec, ids = _three_offline_running("recompute")
    before = {i: rec.tokens(i) for i in ids}
    assert all(before[i] for i in ids[1:])  # they had produced tokens
    online_ids = [sched.submit(online((k,), max_tokens=3), rec) for k in (1, 2)]
    for _ in range(200):
        if all(rec.finals(i) for i in ids + online_ids):
            break
        sched.run_pass()
    sampling = SamplingParams(max_tokens=20)
    for i, prompt in zip(ids, OFFLINE_PROMPTS, strict=True):
        final = rec.final(i)
        expected, _ = ex.expected_output(prompt, sampling)
        assert rec.tokens(i) == expected
        assert final.outcome is Outcome.LENGTH
        assert final.usage is not None and final.usage.completion_tokens == 20
    assert [rec.final(i).timing.preemptions for i in ids] == [0, 1, 1]  # type: ignore[union-attr]
    # Each resumed run: a new executor id, the original prompt, the tokens streamed so far.
    resumed = [r for r in ex.enqueued if r.resume_token_ids]
    assert {r.prompt_token_ids for r in resumed} == {OFFLINE_PROMPTS[1], OFFLINE_PROMPTS[2]}
    for r in resumed:
        sid = ids[OFFLINE_PROMPTS.index(r.prompt_token_ids)]
        assert r.resume_token_ids[: len(before[sid])] == before[sid]
        assert r.resume_token_ids == rec.tokens(sid)[: len(r.resume_token_ids)]
    assert len({r.request_id for r in ex.enqueued}) == len(ex.enqueued)
    # The resumed context was found in the prefix cache.
    assert ex.stats().cached_prompt_tokens > 0
    assert ex.is_idle()


def test_preemption_off_never_preempts() -> None:
    sched, ex, rec, ids = _three_offline_running("off")
    oid = sched.submit(online((1,), max_tokens=3), rec)
    sched.run_pass()
    assert sched.snapshot().online.queued == 1
    for _ in range(200):
        if all(rec.finals(i) for i in [*ids, oid]):
            break
        sched.run_pass()
    assert ex.cancels == []
    assert sched.snapshot().offline.preemptions == 0
    assert rec.final(oid).outcome is Outcome.LENGTH


def test_no_preemption_when_it_cannot_make_room() -> None:
    # The online prompt needs more KV blocks than preempting the offline run above the
    # reserve would free (the other one holds the reserve and is not preemptable).
    ex = fake(Shape(slots=2, kv_blocks=12, tokens_per_block=4, max_seq_len=48))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.5))
    rec = Recorder()
    sched.submit(offline((1, 2, 3), max_tokens=40), rec)
    sched.submit(offline((4, 5, 6), max_tokens=40), rec)
    for _ in range(3):
        sched.run_pass()
    assert ex.stats().kv_blocks_used == 4
    big = sched.submit(online(tuple(range(40)), max_tokens=2), rec)  # needs 11 of 12 blocks
    sched.run_pass()
    assert ex.cancels == []
    assert rec.outcome(big) is None
    assert sched.snapshot().online.queued == 1


def test_preempts_for_kv_blocks_when_a_slot_is_free() -> None:
    ex = fake(Shape(slots=3, kv_blocks=12, tokens_per_block=4))
    sched = BackfillScheduler(ex, SchedulerConfig(offline_reserve=0.0))
    rec = Recorder()
    first = sched.submit(offline(tuple(range(1, 13)), max_tokens=8), rec)
    sched.run_pass()
    second = sched.submit(offline(tuple(range(21, 33)), max_tokens=8), rec)
    sched.run_pass()
    sched.run_pass()
    assert ex.stats().kv_blocks_used == 8  # two runs of 13-14 tokens, 4 blocks each
    on = sched.submit(online(tuple(range(41, 57)), max_tokens=2), rec)  # needs 5 blocks
    sched.run_pass()
    assert live_prompts(ex) == {tuple(range(1, 13)), tuple(range(41, 57))}
    assert rec.outcome(second) is None and sched.snapshot().offline.preemptions == 1
    for _ in range(300):
        if all(rec.finals(i) for i in (first, second, on)):
            break
        sched.run_pass()
    expected, _ = ex.expected_output(tuple(range(21, 33)), SamplingParams(max_tokens=8))
    assert rec.tokens(second) == expected
    assert [rec.final(i).outcome for i in (first, second, on)] == [Outcome.LENGTH] * 3
