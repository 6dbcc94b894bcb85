"""The ScriptedExecutor itself: other tests (scheduler, service) rely on its model."""

from __future__ import annotations

import pytest

from server.executor.base import (
    Capacity,
    ExecRequest,
    Executor,
    FinishReason,
    SamplingParams,
    TokenDelta,
)
from tests.fakes import ScriptedExecutor

pytestmark = pytest.mark.unit

CAP = Capacity(
    max_slots=2,
    num_kv_blocks=16,
    tokens_per_block=4,
    max_tokens_per_step=32,
    max_seq_len=32,
    vocab_size=100,
)


def drain(ex: ScriptedExecutor, steps: int = 100) -> list[TokenDelta]:
    out: list[TokenDelta] = []
    for _ in range(steps):
        out += ex.poll(0.0)
    return out


def stream(deltas: list[TokenDelta], request_id: int) -> tuple[int, ...]:
    return tuple(t for d in deltas if d.request_id == request_id for t in d.token_ids)


def test_is_an_executor_and_runs_one_token_per_step() -> None:
    ex = ScriptedExecutor(CAP)
    assert isinstance(ex, Executor)
    ex.enqueue(ExecRequest(1, (1, 2, 3), SamplingParams(max_tokens=3)))
    first = ex.poll(0.0)
    assert [len(d.token_ids) for d in first] == [1] and first[0].cached_prompt_tokens == 0
    rest = drain(ex)
    assert [d.finish for d in rest] == [None, FinishReason.LENGTH]
    expected, reason = ex.expected_output((1, 2, 3), SamplingParams(max_tokens=3))
    assert stream(first + rest, 1) == expected and reason is FinishReason.LENGTH
    assert ex.is_idle() and ex.poll(0.0) == []


def test_slots_bound_running_and_the_rest_wait() -> None:
    ex = ScriptedExecutor(CAP)
    for rid in (1, 2, 3):
        ex.enqueue(ExecRequest(rid, (rid,), SamplingParams(max_tokens=2)))
    drain(ex)
    assert all(len(rec.running) <= 2 for rec in ex.step_log)
    assert ex.step_log[0].queued == (3,)
    assert set(ex.finishes) == {1, 2, 3}


def test_resume_continues_the_same_stream() -> None:
    ex = ScriptedExecutor(CAP)
    sampling = SamplingParams(max_tokens=6)
    expected, _ = ex.expected_output((5, 6, 7, 8, 9), sampling)
    ex.enqueue(ExecRequest(1, (5, 6, 7, 8, 9), sampling))
    got = stream(ex.poll(0.0) + ex.poll(0.0), 1)
    ex.cancel(1)
    cancelled = ex.poll(0.0)
    assert cancelled[-1].finish is FinishReason.CANCELLED
    ex.enqueue(ExecRequest(2, (5, 6, 7, 8, 9), sampling, resume_token_ids=got))
    deltas = drain(ex)
    assert got + stream(deltas, 2) == expected
    assert deltas[0].cached_prompt_tokens == 4  # the first full block was still cached
    assert ex.finishes[2] is FinishReason.LENGTH


def test_scripts_stop_ids_and_errors() -> None:
    ex = ScriptedExecutor(
        CAP, error_fn=lambda r, done: "boom" if r.prompt_token_ids == (3,) and done == 1 else None
    )
    ex.script((1,), (10, 11))
    ex.enqueue(ExecRequest(1, (1,), SamplingParams(max_tokens=9)))
    ex.enqueue(ExecRequest(2, (2,), SamplingParams(stop_token_ids=(ex.token_at((2,), 1),))))
    deltas = drain(ex)
    assert stream(deltas, 1) == (10, 11) and ex.finishes[1] is FinishReason.STOP
    assert len(stream(deltas, 2)) == 2 and ex.finishes[2] is FinishReason.STOP
    ex.enqueue(ExecRequest(3, (3,)))
    deltas = drain(ex)
    assert ex.finishes[3] is FinishReason.ERROR
    assert [d.error for d in deltas if d.finish] == ["boom"]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (ExecRequest(1, tuple(range(32))), "max_seq_len"),
        (ExecRequest(1, (100,)), "vocabulary"),
        (ExecRequest(1, ()), "empty"),
    ],
)
def test_enqueue_validates(request_: ExecRequest, message: str) -> None:
    ex = ScriptedExecutor(CAP)
    with pytest.raises(ValueError, match=message):
        ex.enqueue(request_)
    assert ex.rejected and not ex.enqueued


def test_duplicate_live_id_is_refused() -> None:
    ex = ScriptedExecutor(CAP)
    ex.enqueue(ExecRequest(1, (1,)))
    with pytest.raises(ValueError, match="duplicate"):
        ex.enqueue(ExecRequest(1, (2,)))


def test_kv_blocks_are_tracked_and_freed() -> None:
    ex = ScriptedExecutor(CAP)
    ex.enqueue(ExecRequest(1, tuple(range(10)), SamplingParams(max_tokens=20)))
    ex.poll(0.0)
    assert ex.stats().kv_blocks_used == CAP.blocks_for(11)
    ex.cancel(1)
    st = ex.stats()
    assert st.kv_blocks_used == 0 and st.active == 0
    assert st.kv_blocks_free + st.kv_blocks_cached == CAP.num_kv_blocks
    assert ex.cancels == [1]
    ex.cancel(1)  # unknown now: no second final
    assert [d.finish for d in ex.poll(0.0)] == [FinishReason.CANCELLED]


def test_shutdown_cancels_everything() -> None:
    ex = ScriptedExecutor(CAP)
    ex.enqueue(ExecRequest(1, (1,)))
    ex.enqueue(ExecRequest(2, (2,)))
    ex.enqueue(ExecRequest(3, (3,)))
    ex.poll(0.0)
    ex.shutdown()
    finals = [d for d in ex.poll(0.0) if d.finish]
    assert {d.request_id for d in finals} == {1, 2, 3}
    assert ex.is_idle()
    with pytest.raises(ValueError):
        ex.enqueue(ExecRequest(4, (4,)))


def test_making_room_never_evicts_the_prefix_being_reused() -> None:
    # Found by the property test: admission evicted the very cached blocks it had matched.
    cap = Capacity(
        max_slots=2,
        num_kv_blocks=8,
        tokens_per_block=4,
        max_tokens_per_step=64,
        max_seq_len=64,
        vocab_size=100,
    )
    ex = ScriptedExecutor(cap)
    prefix = tuple(range(1, 9))
    ex.enqueue(ExecRequest(1, prefix, SamplingParams(max_tokens=1)))
    drain(ex, 3)
    assert ex.stats().kv_blocks_cached == 2
    ex.enqueue(ExecRequest(2, tuple(range(20, 40)), SamplingParams(max_tokens=3)))
    ex.poll(0.0)  # holds the 6 free blocks
    ex.enqueue(ExecRequest(3, (*prefix, 50, 51, 52, 53), SamplingParams(max_tokens=2)))
    deltas = drain(ex, 10)
    first = next(d for d in deltas if d.request_id == 3)
    assert first.cached_prompt_tokens == 8
    assert ex.finishes[3] is FinishReason.LENGTH and ex.is_idle()
