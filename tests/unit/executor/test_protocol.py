"""The executor protocol (server/executor/base.py), checked the same way on every executor:
the CPU executor on the tiny engine, both TensorRT-LLM adapters over their fake engines, the
scripted fakes the scheduler tests use, and the capacity planner's simulated executors. One
final delta per request, cancel frees what the request held, bad input is a ValueError,
resumed tokens count as generated, and the calls after shutdown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_builder.step_cost import LinearStepCost
from server.executor.base import (
    Capacity,
    ExecRequest,
    Executor,
    FinishReason,
    PlanFollower,
    SamplingParams,
    StepPlan,
    StepReporter,
    TokenDelta,
)
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import Collected, collect
from server.executor.factory import load_executor
from server.planner.executor import PlanFollowingSimulatedExecutor, SimulatedExecutor
from tests.fakes import PlannedScriptedExecutor, ScriptedExecutor
from tests.unit.trtllm import fake_model
from tests.unit.trtllm.conftest import install_fakes, make_engine_dir, make_llmapi_dir

pytestmark = pytest.mark.unit

SLOTS = 4
FAKE_CAPACITY = Capacity(
    max_slots=SLOTS, num_kv_blocks=64, tokens_per_block=4, max_tokens_per_step=64,
    max_seq_len=128, vocab_size=1000,
)
STEP_COST = LinearStepCost(0.004, [0.0, 0.0005, 0.0, 0.0, 0.0, 0.0, 0.0])


@dataclass(frozen=True)
class Where:
    tiny: Callable[..., Path]
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch


def _trtllm(where: Where, make_dir: Callable[..., Path]) -> Executor:
    install_fakes(where.monkeypatch, fake_model.FakeDevice())
    return load_executor(make_dir(where.tmp_path / "engine", max_batch_size=SLOTS))


KINDS: dict[str, Callable[[Where], Executor]] = {
    "cpu": lambda w: CpuExecutor.open(w.tiny(max_batch_size=SLOTS, max_seq_len=128)),
    "trtllm": lambda w: _trtllm(w, make_engine_dir),
    "trtllm-llmapi": lambda w: _trtllm(w, make_llmapi_dir),
    "scripted": lambda _: ScriptedExecutor(FAKE_CAPACITY, step_cost=STEP_COST),
    "scripted-planned": lambda _: PlannedScriptedExecutor(FAKE_CAPACITY),
    "simulated": lambda _: SimulatedExecutor(FAKE_CAPACITY, STEP_COST),
    "simulated-planned": lambda _: PlanFollowingSimulatedExecutor(FAKE_CAPACITY, STEP_COST),
}


@pytest.fixture(params=list(KINDS))
def executor(
    request: pytest.FixtureRequest,
    tiny_engine_factory: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Executor]:
    ex = KINDS[request.param](Where(tiny_engine_factory, tmp_path, monkeypatch))
    yield ex
    ex.shutdown()


def req(rid: int, n: int = 6, max_tokens: int = 4, resume: tuple[int, ...] = ()) -> ExecRequest:
    prompt = tuple(3 + (rid * 37 + i * 11) % 200 for i in range(n))
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return ExecRequest(rid, prompt, sampling, resume_token_ids=resume)


def poll_until(ex: Executor, out: dict[int, Collected], done: Callable[[], bool],
               polls: int = 2000) -> None:
    for _ in range(polls):
        if done():
            return
        for delta in ex.poll(0.05):
            out.setdefault(delta.request_id, Collected()).add(delta, 0.0)
    raise AssertionError("the executor made no progress")


def quiet(ex: Executor, polls: int = 5) -> list[TokenDelta]:
    """Whatever still arrives (nothing should, for finished requests)."""
    return [d for _ in range(polls) for d in ex.poll(0.01)]


def assert_idle(ex: Executor) -> None:
    st = ex.stats()
    assert (st.active, st.queued, st.kv_blocks_used) == (0, 0, 0)
    assert st.kv_blocks_free + st.kv_blocks_cached == st.kv_blocks_total


def test_every_request_ends_once_with_its_tokens(executor: Executor) -> None:
    requests = [req(i, n=3 + i, max_tokens=2 + i % 5) for i in range(3 * SLOTS)]
    out = collect(executor, requests)  # raises on a second final or a delta after one
    for r in requests:
        got = out[r.request_id]
        assert got.finish is FinishReason.LENGTH
        assert len(got.token_ids) == r.sampling.max_tokens
        assert got.cached_prompt_tokens is not None and got.cached_prompt_tokens >= 0
    assert quiet(executor) == []
    st = executor.stats()
    assert st.generated_tokens == sum(r.sampling.max_tokens for r in requests)
    assert st.kv_blocks_total == executor.capacity.num_kv_blocks
    assert_idle(executor)


def test_never_more_running_than_slots(executor: Executor) -> None:
    requests = [req(i, max_tokens=8) for i in range(3 * SLOTS)]
    for r in requests:
        executor.enqueue(r)
    out: dict[int, Collected] = {}
    peak = 0

    def done() -> bool:
        nonlocal peak
        peak = max(peak, executor.stats().active)
        return len(out) == len(requests) and all(c.finish for c in out.values())

    poll_until(executor, out, done)
    assert 0 < peak <= SLOTS


def test_a_live_id_cannot_be_enqueued_twice_but_a_finished_one_can(executor: Executor) -> None:
    executor.enqueue(req(1, max_tokens=50))
    with pytest.raises(ValueError):
        executor.enqueue(req(1))
    executor.cancel(1)
    first = collect(executor)
    poll_until(executor, first, lambda: first.get(1, Collected()).finish is not None)
    again = collect(executor, [req(1, max_tokens=3)])
    assert len(again[1].token_ids) == 3 and again[1].finish is FinishReason.LENGTH


@pytest.mark.parametrize("bad", ["empty", "too long", "out of vocabulary"])
def test_requests_the_engine_cannot_run_are_value_errors(executor: Executor, bad: str) -> None:
    cap = executor.capacity
    prompt = {
        "empty": (),
        "too long": tuple(5 for _ in range(cap.max_seq_len)),
        "out of vocabulary": (5, cap.vocab_size, 6),
    }[bad]
    with pytest.raises(ValueError):
        executor.enqueue(ExecRequest(7, prompt, SamplingParams(max_tokens=2)))
    assert quiet(executor) == []  # a refused request leaves no trace
    assert collect(executor, [req(7, max_tokens=2)])[7].finish is FinishReason.LENGTH


def test_cancel_ends_queued_and_running_requests_and_frees_everything(
    executor: Executor,
) -> None:
    requests = [req(i, max_tokens=60) for i in range(SLOTS + 2)]  # two wait for a slot
    for r in requests:
        executor.enqueue(r)
    out: dict[int, Collected] = {}
    poll_until(executor, out, lambda: bool(out) and any(c.token_ids for c in out.values()))
    for r in requests:
        executor.cancel(r.request_id)
    poll_until(executor, out, lambda: all(out.get(r.request_id, Collected()).finish
                                          for r in requests))
    assert {out[r.request_id].finish for r in requests} == {FinishReason.CANCELLED}
    executor.cancel(requests[0].request_id)  # finished: a no-op
    executor.cancel(12345)  # unknown: a no-op
    assert quiet(executor) == []
    assert_idle(executor)


def test_resumed_tokens_count_as_generated(executor: Executor) -> None:
    out = collect(executor, [req(1, max_tokens=5, resume=(40, 41, 42))])
    assert len(out[1].token_ids) == 2 and out[1].finish is FinishReason.LENGTH
    spent = req(2, max_tokens=3, resume=(40, 41, 42))
    try:  # refused, or ended at once: either way it never emits a token
        executor.enqueue(spent)
    except ValueError:
        return
    done = collect(executor, results={2: Collected()})
    assert done[2].token_ids == [] and done[2].finish is FinishReason.LENGTH


def test_shutdown_cancels_live_requests_and_later_calls_are_safe(executor: Executor) -> None:
    for r in [req(i, max_tokens=100) for i in range(SLOTS + 1)]:
        executor.enqueue(r)
    out: dict[int, Collected] = {}
    for delta in executor.poll(0.05):
        out.setdefault(delta.request_id, Collected()).add(delta, 0.0)
    executor.shutdown()
    executor.shutdown()  # idempotent
    poll_until(executor, out, lambda: len(out) == SLOTS + 1
               and all(c.finish is not None for c in out.values()))
    assert {c.finish for c in out.values()} == {FinishReason.CANCELLED}
    with pytest.raises(ValueError):
        executor.enqueue(req(99))
    executor.cancel(0)
    assert quiet(executor) == []
    executor.stats()  # still answers


def test_reported_steps_account_for_every_token(executor: Executor) -> None:
    if not isinstance(executor, StepReporter):
        pytest.skip("this executor does not report its steps")
    executor.take_step_samples()
    out = collect(executor, [req(i, n=5 + 3 * i, max_tokens=3 + i) for i in range(6)])
    samples = executor.take_step_samples()
    assert all(s.seconds > 0 and not s.shape.empty for s in samples)
    assert sum(s.shape.samples for s in samples) == sum(len(c.token_ids) for c in out.values())
    assert sum(s.shape.prefill_tokens + s.shape.decode_rows for s in samples) >= sum(
        5 + 3 * i for i in range(6)
    )


def test_a_plan_pauses_a_sequence_without_ending_it(executor: Executor) -> None:
    if not isinstance(executor, PlanFollower):
        pytest.skip("this executor plans its own steps")
    executor.enqueue(req(1, max_tokens=40))
    executor.enqueue(req(2, max_tokens=40))
    out: dict[int, Collected] = {}
    poll_until(executor, out, lambda: all(len(out.get(i, Collected()).token_ids) > 0
                                          for i in (1, 2)))
    executor.set_plan(StepPlan({1: 0}))
    mark = len(out[2].token_ids)
    poll_until(executor, out, lambda: len(out[2].token_ids) >= mark + 3)  # the plan is in force
    paused_at = len(out[1].token_ids)
    poll_until(executor, out, lambda: out[2].finish is not None)
    assert len(out[1].token_ids) == paused_at and out[1].finish is None
    executor.set_plan(StepPlan())
    poll_until(executor, out, lambda: out[1].finish is not None)
    assert len(out[1].token_ids) == 40 and out[1].finish is FinishReason.LENGTH
