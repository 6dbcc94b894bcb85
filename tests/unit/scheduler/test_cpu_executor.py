"""The scheduler over the real CPU executor (tiny random model): preemption by recompute
must give the same greedy streams as uninterrupted runs, through the background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.executor.base import SamplingParams
from server.executor.cpu import CpuExecutor
from server.executor.cpu.engine import CpuEngine, StepRun
from server.scheduler import BackfillScheduler, Outcome, SchedRequest, SchedulerConfig, Tier
from tests.unit.scheduler.helpers import Recorder

pytestmark = pytest.mark.unit

OFFLINE = [tuple(range(5 + 7 * i, 17 + 7 * i)) for i in range(4)]
ONLINE = [tuple(range(100 + 5 * i, 108 + 5 * i)) for i in range(3)]
LONG = SamplingParams(max_tokens=64, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, ignore_eos=True)
HOLD_TIMEOUT_S = 30.0  # a held engine goes on by itself after this, so a failing test ends


class EngineHold:
    """Stops the executor's worker before a step once three sequences run with two tokens
    each, until ``release`` is set: the offline runs are then certainly mid-way (on this
    engine a step takes well under a millisecond, so without a hold they could finish before
    a busy test thread submits the online requests)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = threading.Event()
        self.release = threading.Event()
        original = CpuEngine.begin_step

        def begin_step(engine: CpuEngine, only: set[int] | None = None, extra_slots: int = 0,
                       *, preempt: bool = True) -> StepRun | None:
            if only is None and not self.held.is_set() and self.due(engine):
                self.held.set()
                self.release.wait(HOLD_TIMEOUT_S)
            return original(engine, only, extra_slots, preempt=preempt)

        monkeypatch.setattr(CpuEngine, "begin_step", begin_step)

    @staticmethod
    def due(engine: CpuEngine) -> bool:
        running = engine.running
        return len(running) == 3 and all(len(s.generated_ids) >= 2 for s in running)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while not predicate() and time.monotonic() < give_up:
        time.sleep(0.001)


def _run(engine: Path, config: SchedulerConfig,
         hold: EngineHold | None = None) -> tuple[Recorder, list[int], int]:
    """Runs the offline requests; with a hold, the online ones arrive while three offline
    runs are held mid-way, and the engine goes on once the scheduler has preempted two."""
    sched = BackfillScheduler(CpuExecutor.open(engine), config)
    rec = Recorder()
    sched.start()
    ids = [sched.submit(SchedRequest(p, LONG, Tier.OFFLINE), rec) for p in OFFLINE]
    if hold is not None:
        assert hold.held.wait(HOLD_TIMEOUT_S), "offline requests did not start"
        ids += [sched.submit(SchedRequest(p, SHORT, Tier.ONLINE), rec) for p in ONLINE]
        _wait_for(lambda: sched.snapshot().offline.preemptions >= 2, timeout=10.0)
        hold.release.set()
    assert rec.wait_final(ids, timeout=60.0)
    assert sched.stop(grace_s=5.0) == []
    assert sched.executor_stats().kv_blocks_used == 0
    return rec, ids, sched.snapshot().offline.preemptions


def test_preempted_offline_streams_match_uninterrupted_runs(
    tiny_engine_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = tiny_engine_factory(max_batch_size=3)
    baseline, base_ids, _ = _run(engine, SchedulerConfig(policy="fcfs"))
    config = SchedulerConfig(offline_reserve=0.34, window_ms=1.0)
    hold = EngineHold(monkeypatch)
    try:
        rec, ids, preemptions = _run(engine, config, hold)
    finally:
        hold.release.set()
    assert preemptions >= 2  # two offline runs above the one-slot reserve made way
    for base_id, rid in zip(base_ids, ids, strict=False):
        assert rec.final(rid).outcome is Outcome.LENGTH
        assert rec.tokens(rid) == baseline.tokens(base_id)
    assert all(rec.final(i).outcome is Outcome.LENGTH for i in ids[len(OFFLINE) :])
