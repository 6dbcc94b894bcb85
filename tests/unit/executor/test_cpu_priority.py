"""Priority in the CPU runner: the waiting queue orders by it, and a higher-priority prefill
runs without lower-priority decodes in its step (so a first token is not delayed by them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, FinishReason, SamplingParams, TokenDelta
from server.executor.cpu.drive import Collected
from server.executor.cpu.executor import build_runner
from server.executor.cpu.runner import Runner

pytestmark = pytest.mark.unit


def _req(rid: int, prompt_len: int, priority: float) -> ExecRequest:
    prompt = tuple(10 + (rid * 7 + i) % 250 for i in range(prompt_len))
    return ExecRequest(rid, prompt, SamplingParams(max_tokens=20, ignore_eos=True),
                       priority=priority)


def test_high_priority_prefill_runs_alone_then_everyone_decodes(tiny_engine: Path) -> None:
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    for rid in (1, 2, 3):
        runner.add(_req(rid, 5, priority=0.0), seed=rid)
    runner.step()  # three low-priority prefills
    runner.step()  # three decodes
    assert runner.counters.last_step_tokens == 3
    runner.add(_req(9, 40, priority=1.0), seed=9)
    deltas = runner.step()
    assert runner.counters.last_step_tokens == 40  # the prefill alone, no background decodes
    assert {d.request_id for d in deltas} == {9}  # only it produced a token
    runner.step()
    assert runner.counters.last_step_tokens == 4  # then all four decode together
    runner.check_integrity()


def test_equal_priorities_keep_mixed_steps(tiny_engine: Path) -> None:
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    runner.add(_req(1, 5, priority=0.5), seed=1)
    runner.step()
    runner.add(_req(2, 30, priority=0.5), seed=2)
    runner.step()
    assert runner.counters.last_step_tokens == 31  # one decode packed with the prefill


def test_waiting_queue_orders_by_priority_then_arrival(tiny_engine: Path) -> None:
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    for rid, priority in [(1, 0.0), (2, 1.0), (3, 0.0), (4, 1.0), (5, 0.5)]:
        runner.add(_req(rid, 4, priority), seed=rid)
    assert [s.request_id for s in runner.waiting] == [2, 4, 5, 1, 3]


def _solo_tokens(engine: Path, request: ExecRequest) -> list[int]:
    runner, _ = build_runner(engine, Manifest.load(engine))
    runner.add(request, seed=request.request_id)
    tokens: list[int] = []
    while runner.has_work:
        tokens += [t for d in runner.step() for t in d.token_ids]
    return tokens


def test_urgent_prefill_overtakes_a_step_in_flight(tiny_engine: Path) -> None:
    """A higher-priority request handed over between layers gets its first token before the
    background step it arrived during finishes, and nobody's output changes."""
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    background = [_req(rid, 6, priority=0.0) for rid in (1, 2, 3)]
    for r in background:
        runner.add(r, seed=r.request_id)
    tokens: dict[int, list[int]] = {r.request_id: [] for r in background}
    for delta in runner.step():  # prefills
        tokens[delta.request_id] += delta.token_ids
    urgent = _req(9, 30, priority=1.0)
    tokens[9] = []
    seen_during_step: list[int] = []

    def hook() -> None:
        if 9 in seen_during_step or runner.step_priority is None:
            return
        runner.add(urgent, seed=urgent.request_id)
        for delta in runner.urgent_prefill_step():
            seen_during_step.append(delta.request_id)
            tokens[delta.request_id] += delta.token_ids

    busy_before, wall_start = runner.counters.busy_seconds, time.perf_counter()
    for delta in runner.step(hook):  # a background decode step, overtaken by the prefill
        tokens[delta.request_id] += delta.token_ids
    wall = time.perf_counter() - wall_start
    assert runner.counters.busy_seconds - busy_before <= wall  # nested time counted once
    assert seen_during_step == [9]
    assert len(tokens[9]) == 1  # its first token came from inside the background step
    assert all(len(tokens[r.request_id]) == 2 for r in background)  # that step still completed
    while runner.has_work:
        for delta in runner.step():
            tokens[delta.request_id] += delta.token_ids
        runner.check_integrity()
    for request in [*background, urgent]:
        assert tokens[request.request_id] == _solo_tokens(tiny_engine, request)


def test_urgent_prefill_step_only_runs_inside_a_step(tiny_engine: Path) -> None:
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    with pytest.raises(RuntimeError, match="inside a step"):
        runner.urgent_prefill_step()


def test_executor_with_an_urgent_arrival_keeps_every_output(tiny_engine: Path) -> None:
    """Through CpuExecutor (the hook wired to its inbox): an online request enqueued while
    background steps run finishes, and every output equals its solo run."""

    from server.executor.cpu import CpuExecutor
    from server.executor.cpu.drive import Collected, collect

    executor = CpuExecutor.open(tiny_engine)
    try:
        background = [_req(rid, 20, priority=0.0) for rid in range(1, 9)]
        results = {r.request_id: Collected() for r in background}
        for r in background:
            executor.enqueue(r)
        time.sleep(0.01)
        urgent = _req(99, 40, priority=1.0)
        executor.enqueue(urgent)
        results[99] = Collected()
        collect(executor, results=results)
        for request in [*background, urgent]:
            assert results[request.request_id].token_ids == _solo_tokens(tiny_engine, request)
        executor.check_integrity()
    finally:
        executor.shutdown()


def test_urgent_prefill_may_take_the_slot_of_a_cancelled_sequence(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    """All slots full: a preemption (cancel) for the urgent request only lands when the step
    ends, but the urgent prefill may use that slot at once; without it, it must wait."""
    engine = tiny_engine_factory(max_batch_size=2)
    for leaving, expect_first_token in [(0, False), (1, True)]:
        runner, _ = build_runner(engine, Manifest.load(engine))
        for rid in (1, 2):
            runner.add(_req(rid, 6, priority=0.0), seed=rid)
        runner.step()
        got: list[TokenDelta] = []

        def hook(runner: Runner = runner, leaving: int = leaving, got: list = got) -> None:
            if got or runner.step_priority is None:
                return
            if not any(s.request_id == 9 for s in [*runner.running, *runner.waiting]):
                runner.add(_req(9, 12, priority=1.0), seed=9)
            got.extend(runner.urgent_prefill_step(leaving))

        runner.step(hook)
        assert any(d.request_id == 9 and d.token_ids for d in got) is expect_first_token
        runner.cancel(2)  # the preemption lands
        while runner.has_work:
            runner.step()
        runner.check_integrity()


def test_cancel_arriving_during_a_step_for_a_request_still_in_the_inbox(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    """A request enqueued and cancelled while a step runs (the scheduler preempting its
    newest run) must end CANCELLED without running; a lost cancel would leave a zombie that
    holds a slot the scheduler believes free."""
    from server.executor.cpu import CpuExecutor
    from server.executor.cpu.drive import collect

    engine = tiny_engine_factory(max_batch_size=2)
    executor = CpuExecutor.open(engine)
    try:
        runner = executor._runner
        original_step = runner.step
        injected: list[bool] = []

        def step(between_layers: Callable[[], None] | None = None) -> list[TokenDelta]:
            if runner.running and not injected:
                injected.append(True)
                executor.enqueue(_req(7, 5, priority=0.0))  # lands in the inbox mid-step
                executor.cancel(7)
            return original_step(between_layers)

        runner.step = step  # type: ignore[method-assign]
        results = collect(executor, [_req(1, 5, priority=0.0), _req(2, 5, priority=0.0)])
        results.update(collect(executor, results={7: results.get(7) or Collected()}))
        assert injected
        assert results[7].finish is FinishReason.CANCELLED
        assert results[7].token_ids == []
        stats = executor.stats()
        assert (stats.active, stats.queued) == (0, 0)
        executor.check_integrity()
    finally:
        executor.shutdown()


def test_stats_count_sequences_in_prefill(tiny_engine: Path) -> None:
    """ExecutorStats.context_requests (Triton's "context" requests) counts prefilling ones."""
    from server.executor.cpu import CpuExecutor

    runner, capacity = build_runner(tiny_engine, Manifest.load(tiny_engine))
    executor = CpuExecutor(runner, capacity)
    try:
        with executor._step_lock:  # hold the worker off while the runner is arranged
            runner.add(_req(1, 40, priority=0.5), seed=1)
            runner._admit()
            assert executor._snapshot().context_requests == 1
            runner.step()
            assert executor._snapshot().context_requests == 0
    finally:
        executor.shutdown()


def test_urgent_prefill_overtakes_a_step_that_also_carries_online_decodes(
    tiny_engine: Path,
) -> None:
    """With online sequences decoding beside offline ones (the usual case under backfill), a
    new online request still overtakes the step: it is delayed by the offline work in it."""
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    for rid, priority in [(1, 0.0), (2, 0.0), (3, 1.0)]:
        runner.add(_req(rid, 6, priority), seed=rid)
    runner.step()
    got = _step_with_urgent_arrival(runner, _req(9, 12, priority=1.0))
    assert [d.request_id for d in got if d.token_ids] == [9]


def _step_with_urgent_arrival(runner: Runner, urgent: ExecRequest) -> list[TokenDelta]:
    """Runs one step during which ``urgent`` arrives (at the first layer boundary); returns
    what the urgent prefill steps nested in it produced."""
    got: list[TokenDelta] = []

    def hook() -> None:
        if got or runner.step_priority is None:
            return
        if not any(s.request_id == urgent.request_id for s in [*runner.running, *runner.waiting]):
            runner.add(urgent, seed=urgent.request_id)
        got.extend(runner.urgent_prefill_step())

    runner.step(hook)
    return got


@pytest.mark.parametrize("cached", [False, True])
def test_a_prompt_with_one_pending_token_is_a_prefill(tiny_engine: Path, cached: bool) -> None:
    """A one-token prompt, or a prompt the prefix cache covers but for its last token, has a
    single pending token like a decode, yet it awaits its first token: it overtakes a step in
    flight and runs its own step without the background decodes."""
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    for rid in (1, 2, 3):
        runner.add(_req(rid, 6, priority=0.0), seed=rid)
    prompt_len = runner.blocks.tokens_per_block + 1 if cached else 1
    urgent = _req(9, prompt_len, priority=1.0)
    if cached:  # put the prompt in the prefix cache, then let it go
        runner.add(ExecRequest(8, urgent.prompt_token_ids, SamplingParams(max_tokens=1),
                               priority=0.0), seed=8)
    runner.step()
    got = _step_with_urgent_arrival(runner, urgent)
    assert [d.request_id for d in got if d.token_ids] == [9]
    assert got[0].cached_prompt_tokens == prompt_len - 1

    runner2, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    for rid in (1, 2, 3):
        runner2.add(_req(rid, 6, priority=0.0), seed=rid)
    runner2.step()
    runner2.add(_req(9, 1, priority=1.0), seed=9)
    assert [d.request_id for d in runner2.step()] == [9]  # alone, no background decodes
    assert runner2.counters.last_step_tokens == 1


def test_background_prefill_is_capped_while_a_higher_priority_sequence_decodes(
    tiny_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offline prefill rides in steps with online decodes only up to the background budget
    (the online tokens wait for the whole step); alone, it takes the full step budget."""
    monkeypatch.setenv("BACKFILL_CPU_BACKGROUND_PREFILL_TOKENS", "8")
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    runner.add(_req(1, 5, priority=1.0), seed=1)
    runner.step()  # the online prompt; it decodes from now on
    runner.add(_req(2, 30, priority=0.0), seed=2)
    chunks = []
    while not any(d.request_id == 2 for d in runner.step()):
        chunks.append(runner.counters.last_step_tokens)
    assert chunks == [1 + 8, 1 + 8, 1 + 8]  # one online decode + 8 background prompt tokens
    assert runner.counters.last_step_tokens == 1 + 6  # the last 6 tokens, and its first token

    alone, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    alone.add(_req(2, 30, priority=0.0), seed=2)
    alone.step()
    assert alone.counters.last_step_tokens == 30  # no online decode: the whole prompt at once


def test_background_prefill_budget_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.executor.cpu.executor import background_prefill_tokens

    for bad in ("0", "x"):
        monkeypatch.setenv("BACKFILL_CPU_BACKGROUND_PREFILL_TOKENS", bad)
        with pytest.raises(ValueError, match="BACKFILL_CPU_BACKGROUND_PREFILL_TOKENS"):
            background_prefill_tokens()


def test_the_hook_runs_after_every_layer_including_the_last(tiny_engine: Path) -> None:
    """An arrival during the last layer is still served before the step's LM head."""
    runner, _ = build_runner(tiny_engine, Manifest.load(tiny_engine))
    runner.add(_req(1, 5, priority=0.0), seed=1)
    calls: list[float | None] = []
    runner.step(lambda: calls.append(runner.step_priority))
    assert calls == [0.0] * Manifest.load(tiny_engine).architecture.num_layers
