"""KV admission must not trust executor stats that lag behind earlier admissions.

A threaded executor (the CPU one) allocates a run's blocks only at its next step, so for a
while its stats still show them free. Passes in that window must charge those runs anyway.
"""

from __future__ import annotations

import pytest

from server.executor.base import Capacity, SamplingParams, TokenDelta
from server.scheduler import BackfillScheduler, SchedRequest, SchedulerConfig, Tier
from tests.fakes import ScriptedExecutor
from tests.unit.scheduler.helpers import FakeClock, Recorder

pytestmark = pytest.mark.unit


class StalledExecutor(ScriptedExecutor):
    """Accepts work but never steps, so its stats keep showing every block free."""

    def poll(self, timeout: float) -> list[TokenDelta]:
        return []


def test_passes_do_not_over_admit_while_stats_lag() -> None:
    capacity = Capacity(max_slots=8, num_kv_blocks=10, tokens_per_block=4,
                        max_tokens_per_step=64, max_seq_len=64, vocab_size=100)
    executor = StalledExecutor(capacity)
    scheduler = BackfillScheduler(executor, SchedulerConfig(offline_reserve=0.0),
                                  clock=FakeClock())
    recorder = Recorder()
    sampling = SamplingParams(max_tokens=4)
    for i in range(5):
        prompt = tuple(range(i * 10, i * 10 + 8))  # 8 tokens + 1 → 3 blocks each
        scheduler.submit(SchedRequest(prompt, sampling, Tier.OFFLINE), recorder)
    for _ in range(4):
        scheduler.run_pass(0.0)
    assert executor.stats().kv_blocks_free == 10  # the stall: nothing allocated
    assert len(executor.enqueued) == 3  # 3 × 3 blocks fit in 10; a 4th would not
