"""The offline tier's weighted fair queue (server/scheduler/policy.py: FairQueue)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.executor.base import SamplingParams
from server.scheduler.live import LiveRequest
from server.scheduler.policy import FairQueue, request_cost
from server.scheduler.types import SchedRequest, Tier

pytestmark = pytest.mark.unit

_ids = itertools.count(1)


def seq(tenant: str, max_tokens: int = 8, weight: float = 1.0, prompt: int = 2) -> LiveRequest:
    rid = next(_ids)
    request = SchedRequest(tuple(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens),
                           Tier.OFFLINE, tenant=tenant, weight=weight)
    return LiveRequest(rid, request, lambda e: None, arrival=float(rid))


def take_all(q: FairQueue, n: int | None = None) -> list[LiveRequest]:
    out = []
    while (head := q.peek()) is not None and (n is None or len(out) < n):
        q.take(head)
        out.append(head)
    return out


def test_a_small_job_is_not_stuck_behind_a_backlog_queued_before_it() -> None:
    q = FairQueue()
    for _ in range(10_000):
        q.push(seq("a"))
    small = [seq("b") for _ in range(10)]
    for s in small:
        q.push(s)
    first = take_all(q, 20)
    assert [s for s in first if s.request.tenant == "b"] == small  # all of b, in order
    assert len(q) == 10_000 - 10


def test_weights_share_admissions_in_proportion() -> None:
    q = FairQueue()
    for _ in range(400):
        q.push(seq("a", weight=3.0))
        q.push(seq("b", weight=1.0))
    counts = Counter(s.request.tenant for s in take_all(q, 100))
    assert abs(counts["a"] - 75) <= 1 and abs(counts["b"] - 25) <= 1


def test_cost_is_the_token_budget_so_long_requests_get_fewer_turns() -> None:
    q = FairQueue()
    for _ in range(100):
        q.push(seq("long", max_tokens=62))  # cost 64
        q.push(seq("short", max_tokens=14))  # cost 16
    counts = Counter(s.request.tenant for s in take_all(q, 50))
    assert counts["short"] == 4 * counts["long"]


def test_an_idle_tenant_banks_no_credit_and_a_newcomer_owes_nothing() -> None:
    q = FairQueue()
    for _ in range(200):
        q.push(seq("a"))
    take_all(q, 50)  # a alone for a while
    for _ in range(20):
        q.push(seq("b"))
    order = [s.request.tenant for s in take_all(q, 20)]
    assert order.count("b") == 10  # alternating from here on, not 50 turns of b
    assert "bbb" not in "".join(order) and "aaa" not in "".join(order)


def test_cancelled_requests_cost_their_tenant_nothing() -> None:
    q = FairQueue()
    a = [seq("a") for _ in range(50)]
    for s in a:
        q.push(s)
    for _ in range(50):
        q.push(seq("b"))
    for s in a[:40]:  # cancelled while waiting, the head each time
        q.remove(s)
    order = [s.request.tenant for s in take_all(q, 20)]
    assert order.count("a") == 10


def test_preempted_sequences_resume_first_uncharged() -> None:
    q = FairQueue()
    for _ in range(5):
        q.push(seq("a"))
        q.push(seq("b"))
    first = q.peek()
    assert first is not None
    q.take(first)
    q.push_front(first)  # preempted: back at the head
    assert q.peek() is first
    q.take(first)
    order = [s.request.tenant for s in take_all(q)]
    assert Counter(order[:2]) == Counter({"a": 1, "b": 1})  # its resumption cost nothing


def test_iteration_is_the_admission_order() -> None:
    q = FairQueue()
    for i in range(30):
        q.push(seq("abc"[i % 3], max_tokens=1 + i % 7, weight=1.0 + i % 2))
    planned = list(q)
    assert take_all(q) == planned


# ---- properties -------------------------------------------------------------------------------

tenants = st.sampled_from(["", "a", "b", "c"])
pushes = st.tuples(tenants, st.integers(1, 40), st.sampled_from([0.5, 1.0, 3.0]))


@settings(max_examples=60, deadline=None)
@given(backlog=st.lists(pushes, min_size=2, max_size=120))
def test_backlogged_tenants_stay_within_one_request_of_their_fair_share(
    backlog: list[tuple[str, int, float]],
) -> None:
    """Start-time fair queueing's bound: while tenants i and j both have work waiting,
    |S_i/w_i - S_j/w_j| <= max_cost_i/w_i + max_cost_j/w_j (S: cost served)."""
    q = FairQueue()
    weight = {name: w for name, _, w in backlog}  # one weight per tenant (its last)
    left: Counter[str] = Counter()
    bound: dict[str, float] = {}
    for name, max_tokens, _ in backlog:
        s = seq(name, max_tokens, weight[name])
        q.push(s)
        left[name] += 1
        bound[name] = max(bound.get(name, 0.0), request_cost(s) / weight[name])
    served: Counter[str] = Counter()
    while (head := q.peek()) is not None:
        q.take(head)
        name = head.request.tenant
        served[name] += request_cost(head)
        left[name] -= 1
        waiting = [t for t in left if left[t] > 0]
        for i, j in itertools.combinations(waiting, 2):
            gap = abs(served[i] / weight[i] - served[j] / weight[j])
            assert gap <= bound[i] + bound[j] + 1e-9


ops = st.lists(st.tuples(st.sampled_from(["push", "push", "take", "remove", "preempt"]),
                         tenants, st.integers(0, 1000)), max_size=200)


@settings(max_examples=80, deadline=None)
@given(program=ops)
def test_random_operations_keep_the_queue_consistent(
    program: list[tuple[str, str, int]],
) -> None:
    q = FairQueue()
    queued: dict[int, LiveRequest] = {}
    taken: list[LiveRequest] = []
    resumed: set[int] = set()
    for op, name, k in program:
        if op == "push":
            s = seq(name, 1 + k % 30)
            q.push(s)
            queued[s.id] = s
        elif op == "take" and (head := q.peek()) is not None:
            q.take(head)
            del queued[head.id]
            taken.append(head)
        elif op == "remove" and queued:
            victim = list(queued.values())[k % len(queued)]
            q.remove(victim)
            del queued[victim.id]
        elif op == "preempt" and taken:
            s = taken.pop(k % len(taken))
            q.push_front(s)
            queued[s.id] = s
            resumed.add(s.id)
        assert len(q) == len(queued)
        planned = list(q)
        assert {s.id for s in planned} == set(queued)
        assert q.peek() is (planned[0] if planned else None)
        assert len(q._heap) <= 64 + 2 * len(q._lines) + 1  # stale entries do not pile up
    order = take_all(q)
    waiting_resumed = [s for s in order if s.id in resumed]
    assert order[: len(waiting_resumed)] == waiting_resumed, "a preempted sequence waited"
    by_tenant: dict[str, list[int]] = {}
    for s in order[len(waiting_resumed):]:
        by_tenant.setdefault(s.request.tenant, []).append(s.id)
    for ids in by_tenant.values():
        assert ids == sorted(ids), "a tenant's requests left out of arrival order"
