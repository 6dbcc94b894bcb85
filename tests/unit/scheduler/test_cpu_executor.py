"""The scheduler over the real CPU executor (tiny random model): preemption by recompute
must give the same greedy streams as uninterrupted runs, through the background thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.executor.base import SamplingParams
from server.executor.cpu import CpuExecutor
from server.scheduler import BackfillScheduler, Outcome, SchedRequest, SchedulerConfig, Tier
from tests.unit.scheduler.helpers import Recorder

pytestmark = pytest.mark.unit

OFFLINE = [tuple(range(5 + 7 * i, 17 + 7 * i)) for i in range(4)]
ONLINE = [tuple(range(100 + 5 * i, 108 + 5 * i)) for i in range(3)]
# Long enough that the offline runs are still going when the online requests arrive: on this
# engine a step takes well under a millisecond, and 60 tokens were over before a busy test
# thread got to submit them.
LONG = SamplingParams(max_tokens=1000, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, ignore_eos=True)


def _wait_for_tokens(rec: Recorder, ids: list[int], n: int, timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while any(len(rec.tokens(i)) < n for i in ids):
        assert time.monotonic() < give_up, "offline requests did not start"
        time.sleep(0.001)


def _run(engine: Path, config: SchedulerConfig, online: bool) -> tuple[Recorder, list[int], int]:
    sched = BackfillScheduler(CpuExecutor.open(engine), config)
    rec = Recorder()
    sched.start()
    ids = [sched.submit(SchedRequest(p, LONG, Tier.OFFLINE), rec) for p in OFFLINE]
    if online:
        _wait_for_tokens(rec, ids[:3], 2, timeout=30.0)  # three slots, all offline
        ids += [sched.submit(SchedRequest(p, SHORT, Tier.ONLINE), rec) for p in ONLINE]
    assert rec.wait_final(ids, timeout=60.0)
    assert sched.stop(grace_s=5.0) == []
    assert sched.executor_stats().kv_blocks_used == 0
    return rec, ids, sched.snapshot().offline.preemptions


def test_preempted_offline_streams_match_uninterrupted_runs(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    engine = tiny_engine_factory(max_batch_size=3)
    baseline, base_ids, _ = _run(engine, SchedulerConfig(policy="fcfs"), online=False)
    config = SchedulerConfig(offline_reserve=0.34, window_ms=1.0)
    rec, ids, preemptions = _run(engine, config, online=True)
    assert preemptions >= 2  # two offline runs above the one-slot reserve made way
    for base_id, rid in zip(base_ids, ids, strict=False):
        assert rec.final(rid).outcome is Outcome.LENGTH
        assert rec.tokens(rid) == baseline.tokens(base_id)
    assert all(rec.final(i).outcome is Outcome.LENGTH for i in ids[len(OFFLINE) :])
