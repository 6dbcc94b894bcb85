"""Property-based tests: random blasts of requests through the scheduler and a fake executor,
checking DESIGN.md's invariants after every pass and every stream at the end."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_builder.step_cost import FEATURES, LinearStepCost, OnlineStepCost
from server.executor.base import ExecRequest, SamplingParams
from server.scheduler import BackfillScheduler, Outcome, SchedRequest, SchedulerConfig, Tier
from tests.fakes import PlannedScriptedExecutor, ScriptedExecutor
from tests.unit.scheduler.helpers import FakeClock, Recorder, Shape

pytestmark = pytest.mark.unit

MAX_SEQ_LEN = 48
TPB = 4


@dataclass(frozen=True)
class Submit:
    tier: Tier
    prompt: tuple[int, ...]
    max_tokens: int
    deadline_in: float | None
    tenant: str = ""  # offline work is shared fairly between tenants (weighted by weight)
    weight: float = 1.0


@dataclass(frozen=True)
class Phase:
    """A burst of arrivals and cancels, then a few passes with the clock moving dt each."""

    submits: list[Submit]
    cancels: list[int]  # indices into the submitted ids, modulo their number
    passes: int
    dt: float


submits = st.builds(
    Submit,
    tier=st.sampled_from(Tier),
    prompt=st.lists(st.integers(0, 60), min_size=1, max_size=16).map(tuple),
    max_tokens=st.integers(1, 30),
    deadline_in=st.none() | st.sampled_from([0.5, 2.0, 10.0]),
    tenant=st.sampled_from(["", "a", "b"]),
    weight=st.sampled_from([1.0, 1.0, 3.0]),
)
phases = st.builds(
    Phase,
    submits=st.lists(submits, max_size=6),
    cancels=st.lists(st.integers(0, 100), max_size=1),
    passes=st.integers(1, 4),
    dt=st.sampled_from([0.0, 0.0, 0.5]),
)
configs = st.builds(
    SchedulerConfig,
    offline_reserve=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    preemption=st.sampled_from(["recompute", "off"]),
    policy=st.sampled_from(["backfill", "backfill", "fcfs"]),
    # A TPOT budget (with the cost below, 20 ms fits 2 tokens a step, 60 ms 10), followed by
    # plan-following executors and enforced by admission on the others.
    tpot_slo_ms=st.sampled_from([None, None, 20.0, 60.0]),
)
COST = LinearStepCost(0.010, [0.005 if name == "tokens" else 0.0 for name in FEATURES])


def stop_after(prompt: tuple[int, ...]) -> int | None:
    """Some prompts STOP on their own before max_tokens."""
    return 1 + prompt[0] % 6 if prompt[0] % 3 == 0 else None


def error_at(request: ExecRequest, done: int) -> str | None:
    return "engine failure" if request.prompt_token_ids[0] == 59 and done == 1 else None


def reject(request: ExecRequest) -> str | None:
    return "refused" if request.prompt_token_ids[0] == 58 else None


class Harness:
    """Drives one scheduler and checks the invariants after each pass."""

    def __init__(self, slots: int, config: SchedulerConfig, follows_plans: bool = False) -> None:
        # A KV pool every slot can fill to max_seq_len, so only slots limit admission and the
        # invariants hold exactly (KV-limited admission has its own focused test).
        shape = Shape(
            slots=slots,
            kv_blocks=slots * (MAX_SEQ_LEN // TPB),
            tokens_per_block=TPB,
            max_tokens_per_step=24,
            max_seq_len=MAX_SEQ_LEN,
        )
        kind = PlannedScriptedExecutor if follows_plans else ScriptedExecutor
        self.ex = kind(
            shape.capacity(), stop_after=stop_after, error_fn=error_at, reject_fn=reject,
            step_cost=COST,
        )
        self.clock = FakeClock()
        self.config = config
        self.sched = BackfillScheduler(
            self.ex, config, clock=self.clock, step_cost=OnlineStepCost(COST)
        )
        self.rec = Recorder()
        self.slots = slots
        self.reserve = config.reserve_slots(slots)
        self.requests: dict[int, SchedRequest] = {}
        self.cancelled: set[int] = set()

    def submit(self, op: Submit) -> None:
        deadline = None if op.deadline_in is None else self.clock.now + op.deadline_in
        request = SchedRequest(
            op.prompt, SamplingParams(max_tokens=op.max_tokens), op.tier, ttft_deadline=deadline,
            tenant=op.tenant, weight=op.weight,
        )
        self.requests[self.sched.submit(request, self.rec)] = request

    def cancel(self, index: int) -> None:
        if self.requests:
            ids = sorted(self.requests)
            rid = ids[index % len(ids)]
            self.cancelled.add(rid)
            self.sched.cancel(rid)

    def step(self, dt: float) -> None:
        enqueued_before = len(self.ex.enqueued)
        self.clock.advance(dt)
        self.sched.run_pass()
        self.check_pass(self.ex.enqueued[enqueued_before:])

    def check_pass(self, started: list[ExecRequest]) -> None:
        snap = self.sched.snapshot()
        running = snap.online.running + snap.offline.running
        assert running <= self.slots
        assert self.ex.stats().active <= self.slots
        assert len(self.ex.live_ids) <= running  # a cancelled run counts until confirmed
        if self.config.policy == "fcfs":
            return
        free = self.slots - running
        demand = snap.offline.running + snap.offline.queued
        keep = min(self.reserve, demand)
        online_started = any(r.priority > 0.5 for r in started)
        if snap.offline.running < keep:
            # Only possible when online held the slots before the pass: nothing was free,
            # and no online request took a slot the reserve needed.
            assert free == 0 and not online_started
        if snap.online.queued:
            assert free == 0, "online waits while a slot is free"
            if self.config.preemption == "recompute":
                cancelling = self.offline_cancelling()
                preemptable = min(snap.offline.running - keep, snap.offline.running - cancelling)
                assert preemptable <= 0, "online waits while offline above the reserve runs"

    def offline_cancelling(self) -> int:
        return sum(
            1
            for rid in self.cancelled
            if self.requests[rid].tier is Tier.OFFLINE and not self.rec.finals(rid)
        )

    def finish(self) -> None:
        for _ in range(2000):
            if self.ex.is_idle() and all(self.rec.finals(i) for i in self.requests):
                break
            self.step(0.5)
        self.check_streams()
        assert self.ex.is_idle()
        assert self.ex.stats().kv_blocks_used == 0
        snap = self.sched.snapshot()
        assert snap.online.running == snap.offline.running == 0
        assert snap.online.queued == snap.offline.queued == 0
        assert snap.online.finished + snap.offline.finished == len(self.requests)

    def check_streams(self) -> None:
        for rid, request in self.requests.items():
            final = self.rec.final(rid)  # exactly one, and the last event
            tokens = self.rec.tokens(rid)
            expected, reason = self.ex.expected_output(request.prompt_token_ids, request.sampling)
            assert final.usage is not None and final.usage.completion_tokens == len(tokens)
            assert final.timing is not None
            if final.outcome in (Outcome.STOP, Outcome.LENGTH):
                # Preempted or not, the stream is what an uninterrupted run produces.
                assert tokens == expected
                assert final.outcome.value == reason.value
            else:
                assert tokens == expected[: len(tokens)]
            if final.outcome is Outcome.DEADLINE:
                assert tokens == () and request.ttft_deadline is not None
            if final.outcome is Outcome.CANCELLED:
                assert rid in self.cancelled
            if final.outcome is Outcome.ERROR:
                assert request.prompt_token_ids[0] in (58, 59)
            if final.timing.preemptions:
                assert request.tier is Tier.OFFLINE and self.config.preempts


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.integers(1, 4), config=configs, follows_plans=st.booleans(),
       program=st.lists(phases, min_size=1, max_size=12))
def test_invariants_hold_after_every_pass(
    slots: int, config: SchedulerConfig, follows_plans: bool, program: list[Phase]
) -> None:
    h = Harness(slots, config, follows_plans)
    for phase in program:
        for submit in phase.submits:
            h.submit(submit)
        for index in phase.cancels:
            h.cancel(index)
        for _ in range(phase.passes):
            h.step(phase.dt)
    h.finish()


@settings(max_examples=25, deadline=None)
@given(slots=st.integers(2, 4), lengths=st.lists(st.integers(1, 14), min_size=1, max_size=10))
def test_online_bursts_preempt_offline_and_streams_stay_exact(
    slots: int, lengths: list[int]
) -> None:
    """Offline fills every slot, then online arrives: preemption must happen, and the
    preempted streams still equal uninterrupted runs."""
    h = Harness(slots, SchedulerConfig(offline_reserve=0.1))
    for i in range(slots * 2):
        h.submit(Submit(Tier.OFFLINE, (1 + i, 2), 14, None))
    for _ in range(3):
        h.step(0.0)
    for i, n in enumerate(lengths):
        h.submit(Submit(Tier.ONLINE, (40 + i, 1), n, None))
        h.step(0.0)
    h.finish()
    assert h.sched.snapshot().offline.preemptions > 0


@settings(max_examples=20, deadline=None)
@given(slots=st.integers(1, 4), backlog=st.integers(20, 60), small=st.integers(1, 6),
       weight=st.sampled_from([1.0, 2.0]))
def test_a_small_tenant_is_served_within_its_share_of_a_backlogged_tier(
    slots: int, backlog: int, small: int, weight: float
) -> None:
    """Tenant a's backlog is queued first, then tenant b's few requests (same size): b's
    requests each start within about two admissions of a's (its share), not after the
    backlog, and every stream is still exact."""
    h = Harness(slots, SchedulerConfig(offline_reserve=0.1))
    for i in range(backlog):
        h.submit(Submit(Tier.OFFLINE, (1 + i % 50, 2), 6, None, tenant="a"))
    h.step(0.0)
    for i in range(small):
        h.submit(Submit(Tier.OFFLINE, (1 + i, 3), 6, None, tenant="b", weight=weight))
    h.finish()
    runs = h.ex.enqueued  # every run, in start order (no preemption here: one per request)
    assert len(runs) == backlog + small
    b_started = [i for i, r in enumerate(runs) if r.prompt_token_ids[1] == 3]
    # b joins at the virtual time of a's last admission, then takes turns with a
    assert b_started[-1] <= slots + 2 * small - 1, b_started
