"""Priority in the CPU runner: the waiting queue orders by it, and a higher-priority prefill
runs without lower-priority decodes in its step (so a first token is not delayed by them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, SamplingParams
from server.executor.cpu.executor import build_runner

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
