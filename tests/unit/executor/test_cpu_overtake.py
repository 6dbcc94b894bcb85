"""Overtaking on the CPU executor: a request marked ``overtake`` that arrives during a step has
its prefill run between two of the step's layers, and then its next tokens from decode steps
nested in that step, as often as the plan's ``overtake_interval_s`` asks; nested steps never
preempt a sequence of the outer one. Every output equals its solo run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, SamplingParams, StepPlan, TokenDelta
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import Collected, collect
from server.executor.cpu.engine import CpuEngine, StepRun
from server.executor.cpu.open import build_engine

pytestmark = pytest.mark.unit


def _req(rid: int, prompt: tuple[int, ...], max_tokens: int, priority: float,
         overtake: bool = False) -> ExecRequest:
    return ExecRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       priority=priority, overtake=overtake)


def _engine(path: Path) -> CpuEngine:
    return build_engine(path, Manifest.load(path))[0]


def _solo(path: Path, request: ExecRequest) -> list[int]:
    engine = _engine(path)
    engine.add(request, seed=request.request_id)
    tokens: list[int] = []
    while engine.has_work:
        engine.step()
        for delta in engine.drain():
            tokens.extend(delta.token_ids)
    return tokens


def _arrive_during_decodes(
    monkeypatch: pytest.MonkeyPatch, executor: CpuExecutor, *requests: ExecRequest
) -> None:
    """Enqueues ``requests`` once, after the first layer of the first step in which every
    running sequence decodes: they arrive while that step is in flight."""
    from server.executor.cpu.model import ForwardPass

    original = ForwardPass.advance
    sent: list[bool] = []

    def advance(self: ForwardPass) -> None:
        original(self)
        engine = executor._engine
        if not sent and engine.running and all(not s.prefilling for s in engine.running):
            sent.append(True)
            for request in requests:
                executor.enqueue(request)

    monkeypatch.setattr(ForwardPass, "advance", advance)


def _tokens_published_inside(
    monkeypatch: pytest.MonkeyPatch, method: str, request_id: int
) -> list[int]:
    """The tokens of ``request_id`` that ``CpuExecutor.<method>`` publishes (read as they
    are published, on the worker's thread: the caller's poll drains the outbox
    concurrently, so the outbox itself cannot tell)."""
    tokens: list[int] = []
    inside = [False]
    original_method = getattr(CpuExecutor, method)
    original_publish = CpuExecutor._publish

    def wrapped(self: CpuExecutor, run: StepRun) -> None:
        inside[0] = True
        try:
            original_method(self, run)
        finally:
            inside[0] = False

    def publish(self: CpuExecutor, deltas: list[TokenDelta]) -> None:
        if inside[0]:
            tokens.extend(t for d in deltas if d.request_id == request_id for t in d.token_ids)
        original_publish(self, deltas)

    monkeypatch.setattr(CpuExecutor, method, wrapped)
    monkeypatch.setattr(CpuExecutor, "_publish", publish)
    return tokens


def _run_with_background(
    executor: CpuExecutor, path: Path, urgent: list[ExecRequest], *,
    interval: float | None = None, draft_len: int = 0,
) -> None:
    """Four background requests, then the urgent ones that arrive among them, under a plan of
    that overtake interval and draft length; checks every output against its solo run, and
    the executor's books."""
    background = [_req(rid, tuple(range(rid, rid + 8)), 16, 0.0) for rid in range(1, 5)]
    drafts = {r.request_id: draft_len for r in [*background, *urgent]} if draft_len else {}
    executor.set_plan(StepPlan(draft_lens=drafts, overtake_interval_s=interval))
    results = collect(executor, background)
    for request in urgent:
        results.setdefault(request.request_id, Collected())
    collect(executor, results=results)
    for request in [*background, *urgent]:
        assert results[request.request_id].token_ids == _solo(path, request)
    executor.check_integrity()


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculating"])
def test_an_overtaking_prefill_runs_inside_the_step_in_flight(
    tiny_engine_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, speculate: bool
) -> None:
    """Its first token goes out from inside the step; also while that step verifies drafted
    tokens (the tiny model drafting for itself, so every background step carries drafts)."""
    tiny_engine = tiny_engine_factory()
    executor = CpuExecutor.open(tiny_engine_factory(draft_seed=0) if speculate else tiny_engine)
    urgent = _req(99, tuple(range(10, 50)), 5, 1.0, overtake=True)
    _arrive_during_decodes(monkeypatch, executor, urgent)
    first = _tokens_published_inside(monkeypatch, "_overtake", 99)
    try:
        _run_with_background(executor, tiny_engine, [urgent], draft_len=3 if speculate else 0)
        assert len(first) == 1  # its first token, and no other, from the overtaking prefill
        if speculate:
            assert executor.stats().draft_tokens_accepted > 0
    finally:
        executor.shutdown()


@pytest.mark.parametrize(
    ("interval", "speculate"),
    [(0.0, False), (0.0, True), (None, False), (60.0, False)],
    ids=["every-layer", "every-layer-speculating", "no-interval", "a-minute"],
)
def test_an_overtaking_request_decodes_inside_the_step_it_overtook(
    tiny_engine_factory: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    interval: float | None,
    speculate: bool,
) -> None:
    """The background step is in flight when the urgent request arrives: its prefill runs
    after a layer, and with an interval of 0 a decode of it after that layer and the next
    too, before the background step ends."""
    tiny_engine = tiny_engine_factory()
    executor = CpuExecutor.open(tiny_engine_factory(draft_seed=0) if speculate else tiny_engine)
    urgent = _req(99, tuple(range(10, 50)), 6, 1.0, overtake=True)
    _arrive_during_decodes(monkeypatch, executor, urgent)
    nested = _tokens_published_inside(monkeypatch, "_decode_overtakers", 99)
    try:
        _run_with_background(executor, tiny_engine, [urgent], interval=interval,
                             draft_len=3 if speculate else 0)
        if interval == 0.0:
            assert len(nested) >= 2  # after the layer it arrived at, and after the next
        else:
            assert nested == []
    finally:
        executor.shutdown()


def test_a_nested_decode_sits_out_rather_than_preempt(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    """Four KV blocks, all held: the newer sequence's decode needs a fifth. Nested in a step
    (preempt=False) it sits out and nobody is preempted; a step of its own preempts."""
    path = tiny_engine_factory(num_kv_blocks=4, max_seq_len=64)
    engine = _engine(path)
    low = _req(1, tuple(range(10, 26)), 4, 0.0)
    high = _req(2, tuple(range(30, 62)), 4, 1.0)
    engine.add(low, seed=1)
    engine.step()  # low: 1 block, its prefill
    engine.add(high, seed=2)
    engine.step()  # high: 2 blocks, its prefill; low's decode takes the last one
    assert engine.begin_step({2}, preempt=False) is None
    assert engine.batcher.num_preemptions == 0
    assert {s.request_id for s in engine.running} == {1, 2}
    engine.check_integrity()
    run = engine.begin_step({2})
    assert run is not None and run.ids == {2}
    assert engine.batcher.num_preemptions == 1  # low made room



def test_overtakers_decode_together_once_one_is_due(
    tiny_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests overtake the same step, after its first and its second layer, 10 s apart
    on the executor's clock; with a 5 s interval the first is due when the second has just
    prefilled. The nested decode is a step of both: one at a time, each would fall due while
    the other's ran, and the step in flight would get no further."""
    from server.executor.cpu import executor as executor_module
    from server.executor.cpu.model import ForwardPass

    clock = [1000.0]

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock[0]

    executor = CpuExecutor.open(tiny_engine)
    nested_steps: list[set[int]] = []
    outer: list[ForwardPass] = []
    original_advance = ForwardPass.advance
    original_begin = CpuEngine.begin_step
    urgent = [_req(rid, tuple(range(rid, rid + 20)), 6, 1.0, overtake=True) for rid in (98, 99)]

    def advance(self: ForwardPass) -> None:
        original_advance(self)
        engine = executor._engine
        if not outer and engine.running and all(not s.prefilling for s in engine.running):
            outer.append(self)
            executor.enqueue(urgent[0])  # after the first layer of a step of decodes
        elif outer and self is outer[0] and len(outer) == 1:
            outer.append(self)
            clock[0] += 10.0
            executor.enqueue(urgent[1])  # after its second

    def begin_step(self: CpuEngine, only: set[int] | None = None, extra_slots: int = 0, *,
                   preempt: bool = True) -> StepRun | None:
        if not preempt:  # only nested decodes pass preempt=False
            nested_steps.append(set(only or ()))
        return original_begin(self, only, extra_slots, preempt=preempt)

    monkeypatch.setattr(executor_module, "time", FakeTime)
    monkeypatch.setattr(ForwardPass, "advance", advance)
    monkeypatch.setattr(CpuEngine, "begin_step", begin_step)
    try:
        _run_with_background(executor, tiny_engine, urgent, interval=5.0)
        assert len(outer) == 2
        assert nested_steps == [{98, 99}]  # the second layer was the step's last
    finally:
        executor.shutdown()
