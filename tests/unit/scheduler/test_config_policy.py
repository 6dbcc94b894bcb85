"""Config validation, ordering keys and queues, and the per-pass budget."""

from __future__ import annotations

import math

import pytest

from server.executor.base import SamplingParams
from server.scheduler import SchedRequest, SchedulerConfig, Tier
from server.scheduler.budget import PassBudget
from server.scheduler.live import LiveRequest
from server.scheduler.policy import DeadlineQueue, FifoQueue, TierQueues
from tests.unit.scheduler.helpers import Recorder, Shape

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_ms": 0.0},
        {"window_ms": math.inf},
        {"offline_reserve": -0.1},
        {"offline_reserve": 1.5},
        {"preemption": "swap"},
        {"policy": "priority"},
        {"max_online_queue": -1},
        {"max_offline_queue": -1},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_derived_values() -> None:
    assert SchedulerConfig().window_s == pytest.approx(0.01)
    assert SchedulerConfig().preempts
    assert not SchedulerConfig(preemption="off").preempts
    assert not SchedulerConfig(policy="fcfs").preempts


def seq(
    sid: int, tier: Tier = Tier.ONLINE, deadline: float | None = None, arrival: float = 0.0
) -> LiveRequest:
    request = SchedRequest((1, 2, 3), SamplingParams(), tier, ttft_deadline=deadline)
    return LiveRequest(sid, request, Recorder(), arrival=arrival)


def test_deadline_queue_orders_by_deadline_then_arrival_then_id() -> None:
    q = DeadlineQueue()
    items = [
        seq(1, deadline=None, arrival=0.0),
        seq(2, deadline=9.0, arrival=1.0),
        seq(3, deadline=5.0, arrival=2.0),
        seq(4, deadline=5.0, arrival=1.5),
        seq(5, deadline=None, arrival=0.0),
    ]
    for s in items:
        q.push(s)
    assert [s.id for s in q] == [4, 3, 2, 1, 5]
    q.remove(items[2])
    assert [s.id for s in q] == [4, 2, 1, 5]
    assert q.peek() is items[3] and len(q) == 4


def test_fifo_queue_puts_preempted_at_the_head() -> None:
    q = FifoQueue()
    a, b, c = seq(1, Tier.OFFLINE), seq(2, Tier.OFFLINE), seq(3, Tier.OFFLINE)
    q.push(a)
    q.push(b)
    q.push_front(c)
    assert [s.id for s in q] == [3, 1, 2]
    q.remove(a)
    assert [s.id for s in q] == [3, 2] and q.peek() is c


def test_fcfs_shares_one_queue_between_tiers() -> None:
    queues = TierQueues.for_config(SchedulerConfig(policy="fcfs"))
    assert queues.of(Tier.ONLINE) is queues.of(Tier.OFFLINE)
    queues = TierQueues.for_config(SchedulerConfig())
    assert queues.of(Tier.ONLINE) is not queues.of(Tier.OFFLINE)


def test_budget_keeps_the_reserve_from_online_and_counts_blocks() -> None:
    cap = Shape(slots=4, kv_blocks=100, tokens_per_block=4).capacity()
    budget = PassBudget(
        cap, free_slots=3, free_blocks=3, reserve=2, offline_demand=5, offline_holding=1
    )
    assert budget.reserved_slots == 1  # keep 2, offline holds 1
    assert budget.try_admit(seq(1))  # 3 tokens + 1 -> 1 block
    assert budget.try_admit(seq(2))
    assert not budget.try_admit(seq(5))  # the last free slot is offline's
    off = seq(3, Tier.OFFLINE)
    assert budget.try_admit(off)
    assert budget.free_slots == 0 and budget.free_blocks == 0 and budget.reserved_slots == 0
    budget.refund(off)  # refused: it is gone, so offline demand shrinks too
    assert budget.offline_demand == 4 and budget.free_slots == 1 and budget.reserved_slots == 1
    big = seq(4, Tier.OFFLINE)
    big.tokens.extend(range(10))  # 13 context tokens + 1 -> 4 blocks
    assert not budget.fits(big)
    budget.release(big)  # preempting a run of 13 tokens frees 4 blocks
    assert budget.free_blocks == 5 and budget.free_slots == 2
