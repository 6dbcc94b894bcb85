"""The CPU engine's batching: priority orders its queue, and the scheduler's standing step plan
caps what each sequence computes per step (0 pauses it, resident, with nothing recomputed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, FinishReason, SamplingParams, StepPlan
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import Collected, collect
from server.executor.cpu.engine import CpuEngine
from server.executor.cpu.open import build_engine

pytestmark = pytest.mark.unit


def _req(rid: int, prompt_len: int, priority: float = 0.5, max_tokens: int = 20) -> ExecRequest:
    prompt = tuple(10 + (rid * 7 + i) % 250 for i in range(prompt_len))
    return ExecRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       priority=priority)


def _engine(path: Path) -> CpuEngine:
    return build_engine(path, Manifest.load(path))[0]


def _run(engine: CpuEngine) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    while engine.has_work:
        engine.step()
        for delta in engine.drain():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        engine.check_integrity()
    return tokens


def _solo(path: Path, request: ExecRequest) -> list[int]:
    engine = _engine(path)
    engine.add(request, seed=request.request_id)
    return _run(engine)[request.request_id]


def test_waiting_queue_orders_by_priority_then_arrival(tiny_engine: Path) -> None:
    engine = _engine(tiny_engine)
    for rid, priority in [(1, 0.0), (2, 1.0), (3, 0.0), (4, 1.0), (5, 0.5)]:
        engine.add(_req(rid, 4, priority), seed=rid)
    assert [s.request_id for s in engine.batcher.waiting] == [2, 4, 5, 1, 3]


def test_without_a_plan_every_decode_and_prefill_share_the_step(tiny_engine: Path) -> None:
    engine = _engine(tiny_engine)
    for rid in (1, 2, 3):
        engine.add(_req(rid, 5, priority=0.0), seed=rid)
    engine.step()  # three prefills
    engine.add(_req(9, 40, priority=1.0), seed=9)
    engine.step()
    assert engine.counters.last_step_tokens == 3 + 40  # no policy of its own: all of it


def test_a_paused_sequence_sits_steps_out_and_resumes_without_recompute(
    tiny_engine: Path,
) -> None:
    engine = _engine(tiny_engine)
    requests = [_req(rid, 6, max_tokens=8) for rid in (1, 2, 3)]
    for r in requests:
        engine.add(r, seed=r.request_id)
    engine.step()  # prefills
    engine.drain()
    engine.set_plan(StepPlan({2: 0}))
    for _ in range(3):
        engine.step()
        assert engine.counters.last_step_tokens == 2  # 1 and 3 decode, 2 sits out
    assert {d.request_id for d in engine.drain()} == {1, 3}
    paused = next(s for s in engine.running if s.request_id == 2)
    assert len(paused.token_ids) == 6 + 1 and paused.num_computed == 6  # resident, waiting
    engine.set_plan(StepPlan())
    computed = engine.counters.computed_tokens
    engine.step()
    assert engine.counters.computed_tokens - computed == 3  # 2's pending token joins 1 and 3
    tokens = _run(engine)
    assert len(tokens[2]) == 7  # 8 tokens in all, the first came before the pause
    assert tokens[2] == _solo(tiny_engine, requests[1])[1:]


def test_a_prefill_cap_chunks_the_prompt(tiny_engine: Path) -> None:
    engine = _engine(tiny_engine)
    engine.add(_req(1, 5, priority=1.0), seed=1)
    engine.step()  # it decodes from now on
    background = _req(2, 30, priority=0.0, max_tokens=3)
    engine.add(background, seed=2)
    engine.set_plan(StepPlan({2: 8}))
    chunks = []
    while True:
        engine.step()
        if any(d.request_id == 2 and d.token_ids for d in engine.drain()):
            break
        chunks.append(engine.counters.last_step_tokens)
    assert chunks == [1 + 8, 1 + 8, 1 + 8]  # one decode + 8 prompt tokens per step
    assert engine.counters.last_step_tokens == 1 + 6  # the last 6, and its first token
    assert _run(engine)[2] == _solo(tiny_engine, background)[1:]


def test_preemption_for_kv_takes_the_newest_of_the_lowest_priority(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    engine = _engine(tiny_engine_factory(num_kv_blocks=12, max_batch_size=8, max_seq_len=192))
    engine.add(_req(1, 20, priority=0.0, max_tokens=60), seed=1)
    engine.add(_req(2, 20, priority=0.0, max_tokens=60), seed=2)
    engine.add(_req(3, 20, priority=1.0, max_tokens=60), seed=3)
    while engine.batcher.num_preemptions == 0:
        assert engine.has_work
        engine.step()
        engine.drain()
    assert engine.batcher.waiting[0].request_id == 2
    assert {s.request_id for s in engine.running} == {1, 3}


def test_step_samples_describe_each_step(tiny_engine: Path) -> None:
    engine = _engine(tiny_engine)
    engine.add(_req(1, 12), seed=1)
    engine.add(_req(2, 7), seed=2)
    engine.step()
    engine.step()
    first, second = engine.take_step_samples()
    assert (first.shape.prefill_tokens, first.shape.prefill_segments, first.shape.samples) == (
        19, 2, 2)
    assert (second.shape.decode_rows, second.shape.decode_context) == (2, 13 + 8)
    assert second.shape.decode_context_max == 13
    assert first.seconds > 0 and second.seconds > 0
    assert engine.take_step_samples() == []


@pytest.mark.parametrize("cached", [False, True])
def test_stats_count_context_requests_with_one_pending_token(
    tiny_engine: Path, cached: bool
) -> None:
    """A one-token prompt, or one the prefix cache covers but for its last token, is in its
    context phase (Triton's "context" requests) until it samples."""
    executor = CpuExecutor(*build_engine(tiny_engine, Manifest.load(tiny_engine)))
    engine = executor._engine
    try:
        prompt_len = engine.batcher.blocks.tokens_per_block + 1 if cached else 1
        request = _req(9, prompt_len)
        with executor._step_lock:  # hold the worker off while the engine is arranged
            if cached:
                engine.add(ExecRequest(8, request.prompt_token_ids,
                                       SamplingParams(max_tokens=1)), seed=8)
                _run(engine)
            engine.add(request, seed=9)
            engine.batcher.admit()
            assert executor._snapshot().context_requests == 1
            engine.step()
            assert executor._snapshot().context_requests == 0
    finally:
        executor.shutdown()


def test_the_executor_waits_instead_of_spinning_when_everything_is_paused(
    tiny_engine: Path,
) -> None:
    executor = CpuExecutor.open(tiny_engine)
    try:
        executor.set_plan(StepPlan({1: 0}))
        executor.enqueue(_req(1, 6, max_tokens=5))
        time.sleep(0.3)
        steps = executor.counters.steps
        time.sleep(0.3)
        assert executor.counters.steps == steps == 0  # admitted, paused, and idle
        assert executor.stats().active == 1
        executor.set_plan(StepPlan())
        results = collect(executor, results={1: Collected()})
        assert len(results[1].token_ids) == 5
    finally:
        executor.shutdown()


def test_a_cancel_right_after_an_enqueue_ends_the_request_without_running(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    """A request enqueued and cancelled before the worker takes either (the scheduler
    preempting its newest run) ends CANCELLED with no tokens and holds nothing."""
    executor = CpuExecutor.open(tiny_engine_factory(max_batch_size=2))
    try:
        with executor._step_lock:  # the worker cannot start a step meanwhile
            executor.enqueue(_req(7, 5))
            executor.cancel(7)
        results = collect(executor, results={7: Collected()})
        assert results[7].finish is FinishReason.CANCELLED and results[7].token_ids == []
        stats = executor.stats()
        assert (stats.active, stats.queued) == (0, 0)
        executor.check_integrity()
    finally:
        executor.shutdown()


def test_an_overtaking_prefill_runs_between_the_layers_of_a_step(tiny_engine: Path) -> None:
    """Begun, a step can pause after any layer while a second step runs the prefill of new
    sequences; both then finish, and every output equals its solo run."""
    engine = _engine(tiny_engine)
    background = [_req(rid, 6, priority=0.0) for rid in (1, 2, 3)]
    for r in background:
        engine.add(r, seed=r.request_id)
    engine.step()  # prefills
    tokens = {d.request_id: list(d.token_ids) for d in engine.drain()}
    run = engine.begin_step()
    assert run is not None and run.ids == {1, 2, 3}
    run.advance()
    urgent = _req(9, 30, priority=1.0)
    engine.add(urgent, seed=9)
    nested = engine.begin_step({9})
    assert nested is not None and nested.ids == {9}
    engine.finish_step(nested)
    first = engine.drain()
    assert [(d.request_id, len(d.token_ids)) for d in first] == [(9, 1)]  # only its token
    engine.finish_step(run)
    for d in engine.drain():
        tokens.setdefault(d.request_id, []).extend(d.token_ids)
    tokens[9] = list(first[0].token_ids)
    for rid, more in _run(engine).items():
        tokens[rid].extend(more)
    for request in [*background, urgent]:
        assert tokens[request.request_id] == _solo(tiny_engine, request)
    outer, inner = engine.take_step_samples()[1:3][::-1]
    assert (outer.shape.decode_rows, inner.shape.prefill_tokens) == (3, 30)


def test_a_decode_that_preempts_a_sequence_already_packed_drops_its_chunk(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    """Four KV blocks: the older, lower-priority sequence decodes first in the step and is
    packed; the newer one's decode then needs a block and preempts it. Its chunk leaves the
    step with it (its blocks are gone), and it resumes later with nothing lost."""
    path = tiny_engine_factory(num_kv_blocks=4, max_seq_len=64)
    engine = _engine(path)
    low = ExecRequest(1, tuple(range(10, 26)), SamplingParams(max_tokens=4, ignore_eos=True),
                      priority=0.0)
    high = ExecRequest(2, tuple(range(30, 62)), SamplingParams(max_tokens=4, ignore_eos=True),
                       priority=1.0)
    engine.add(low, seed=1)
    engine.step()  # low: 1 block, its prefill
    engine.add(high, seed=2)
    engine.step()  # high: 2 blocks, its prefill; low's decode takes the last one
    tokens = _run(engine)  # high's decode needs a fifth block: low, packed first, goes
    assert engine.batcher.num_preemptions >= 1
    engine.check_integrity()
    for request in (low, high):
        assert tokens[request.request_id] == _solo(path, request)
