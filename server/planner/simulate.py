"""The simulation loop: a pool of replicas, each the real ``BackfillScheduler`` over a
``SimulatedExecutor``, driven on one virtual clock by a trace of online arrivals and an offline
backlog.

Timing follows the server's threads. The executor runs steps back to back on its own thread:
when a step ends its output is ready and the next step starts at once with whatever had been
enqueued. The scheduler thread runs a pass whenever output is ready (at each step end) and at
most ``window_ms`` after the previous pass otherwise (its poll timeout), so a request that
arrives is admitted at the first such pass. Passes that would see nothing new are skipped
(they change nothing). A pool routes each online request to the replica with the fewest
online requests in flight (the least-loaded choice of an inference gateway's endpoint picker)
and feeds replicas offline work from one shared backlog, as replicas sharing a job store do,
keeping ``offline_in_flight`` requests submitted to each.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from client.bench.trace import TraceRequest
from engine_builder.step_cost import OnlineStepCost, StepCostModel
from server.executor.base import Capacity, SamplingParams
from server.planner.executor import PlanFollowingSimulatedExecutor, SimClock, SimulatedExecutor
from server.planner.results import RequestRecord, SimResult, tier_figures
from server.scheduler import BackfillScheduler, SchedEvent, SchedRequest, SchedulerConfig, Tier

_FIRST_PLAIN_ID = 100  # prompts avoid the low ids that real vocabularies reserve


@dataclass(frozen=True, slots=True)
class Engine:
    """What one replica is: its slots and KV blocks, how long its steps take, and what it
    costs. ``model`` gives each step's duration; ``prior`` is what the scheduler's step-cost
    model starts from (the engine's profile), by default the same model."""

    label: str
    capacity: Capacity
    model: StepCostModel
    peak_tokens_per_s: float  # 100% utilization: the engine's highest decode rate
    gpus: int = 1  # accelerators one replica occupies (tensor parallel size)
    follows_plans: bool = False  # PlanFollower (the CPU executor) or admission-bounded
    prior: StepCostModel | None = None
    jitter: float = 0.0  # log-normal sigma of step durations around the model
    layers: int | None = None  # a plan follower's overtakers wait for the layer in flight
    head_share: float = 0.0  # the LM head's share of the weights (its steps' last part)


@dataclass(frozen=True, slots=True)
class Workload:
    """Online arrivals (time-ordered) and the offline backlog's lengths (all there at 0).

    Online requests arriving before ``duration_s`` are sent; those still running then get up
    to ``drain_s`` more. Offline work stops at ``duration_s`` (unfinished requests are
    cancelled, as a load generator's window ends) unless ``offline_until_done``: then the run
    lasts until the backlog is done (its completion time is a result)."""

    online: tuple[TraceRequest, ...]
    offline: tuple[TraceRequest, ...] = ()
    duration_s: float = 60.0
    drain_s: float = 30.0
    offline_until_done: bool = False
    seed: int = 0  # the prompts' ids and the engines' step-time jitter


@dataclass(frozen=True, slots=True)
class Pool:
    replicas: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    batching: str = "inflight"  # "static": no in-flight batching (the baseline)
    # Offline requests kept submitted to each replica; None: the whole backlog at once,
    # spread over the replicas.
    offline_in_flight: int | None = None
    price_per_gpu_hour: float = 2.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.offline_in_flight is not None and self.offline_in_flight < 1:
            raise ValueError("offline_in_flight must be >= 1 (or None)")


class _Tally:
    """Tokens per tier generated inside the measuring window."""

    __slots__ = ("offline", "online", "window_end")

    def __init__(self, window_end: float) -> None:
        self.online = self.offline = 0
        self.window_end = window_end


class _Tracked:
    """One request's sink: fills its record from the scheduler's events."""

    __slots__ = ("clock", "record", "replica", "tally")

    def __init__(self, clock: SimClock, record: RequestRecord, replica: _Replica,
                 tally: _Tally) -> None:
        self.clock, self.record, self.replica, self.tally = clock, record, replica, tally

    def __call__(self, event: SchedEvent) -> None:
        now = self.clock.now
        rec = self.record
        n = len(event.token_ids)
        if n:
            if rec.first_token_s is None:
                rec.first_token_s = now
            rec.tokens += n
            if now <= self.tally.window_end:
                if rec.tier is Tier.ONLINE:
                    self.tally.online += n
                else:
                    self.tally.offline += n
        if event.outcome is not None:
            rec.end_s, rec.outcome = now, event.outcome.value
            self.replica.ended(rec)


class _Replica:
    """One engine: the real scheduler over a simulated executor."""

    def __init__(self, index: int, engine: Engine, pool: Pool, clock: SimClock,
                 seed: int) -> None:
        self.index = index
        self.clock = clock
        self.executor: SimulatedExecutor
        if engine.follows_plans:
            self.executor = PlanFollowingSimulatedExecutor(
                engine.capacity, engine.model, clock=clock, batching=pool.batching,
                jitter=engine.jitter, seed=seed, layers=engine.layers,
                head_share=engine.head_share)
        else:
            self.executor = SimulatedExecutor(engine.capacity, engine.model, clock=clock,
                                              batching=pool.batching, jitter=engine.jitter,
                                              seed=seed)
        prior = engine.prior if engine.prior is not None else engine.model
        self.scheduler = BackfillScheduler(self.executor, pool.scheduler, clock=clock,
                                           step_cost=OnlineStepCost(prior))
        self.window_s = pool.scheduler.window_s
        self.last_pass = 0.0
        self.pass_due: float | None = None
        self.pushed_step: float | None = None
        self.online_live = 0
        self.offline_live: dict[int, RequestRecord] = {}  # by scheduler id
        self.slot_seconds = 0.0  # busy slots integrated over the window, for occupancy
        self.counted_until = 0.0

    def ended(self, record: RequestRecord) -> None:
        if record.tier is Tier.ONLINE:
            self.online_live -= 1
        else:
            self.offline_live.pop(record.sched_id, None)

    def account(self, until: float) -> None:
        """Busy slots (the executor's live requests: what the scheduler counts as running)
        are constant between this replica's own events."""
        if until > self.counted_until:
            self.slot_seconds += self.executor.num_live * (until - self.counted_until)
            self.counted_until = until

    def next_tick(self, t: float) -> float:
        """The scheduler's first pass at or after t if no output comes first (its poll times
        out every window after the last pass)."""
        ticks = math.ceil(max(0.0, t - self.last_pass) / self.window_s - 1e-9)
        return self.last_pass + ticks * self.window_s

    def run_pass(self) -> None:
        self.scheduler.run_pass()
        self.last_pass = self.clock.now
        self.pass_due = None
        self.executor.wake()


_STEP, _PASS = 0, 1


class Simulation:
    """One run of a workload on a pool of identical replicas; ``run()`` returns its figures."""

    def __init__(self, engine: Engine, pool: Pool, workload: Workload, *,
                 run_ahead: bool = True) -> None:
        """``run_ahead=False`` runs a scheduler pass after every step even when it has
        nothing to do (the same figures, several times slower; for tests)."""
        self.engine, self.pool, self.workload = engine, pool, workload
        self._run_ahead = run_ahead
        self.clock = SimClock()
        # Step jitter: one stream per replica, another set for another workload seed.
        self.replicas = [_Replica(i, engine, pool, self.clock, workload.seed * 1009 + i)
                         for i in range(pool.replicas)]
        self.records: list[RequestRecord] = []
        window_end = math.inf if workload.offline_until_done else workload.duration_s
        self.tally = _Tally(window_end)
        self._rng = np.random.default_rng(workload.seed)
        self._events: list[tuple[float, int, int]] = []  # (time, kind, replica index)
        self._backlog = list(reversed(workload.offline))  # popped from the end: in order
        self._offline_open = True
        self._turn = 0  # round-robin tie-break of the router

    # -- requests -------------------------------------------------------------------------

    def _prompt(self, n: int) -> tuple[int, ...]:
        vocab = self.engine.capacity.vocab_size
        low = _FIRST_PLAIN_ID if vocab > 2 * _FIRST_PLAIN_ID else 0
        return tuple(self._rng.integers(low, vocab, n).tolist())

    def _submit(self, replica: _Replica, tier: Tier, req: TraceRequest) -> None:
        cap = self.engine.capacity
        prompt_len = max(1, min(req.prompt_tokens, cap.max_seq_len - 1))
        max_tokens = max(1, min(req.output_tokens, cap.max_seq_len - prompt_len))
        record = RequestRecord(tier, self.clock.now, prompt_len, max_tokens, replica.index)
        self.records.append(record)
        request = SchedRequest(self._prompt(prompt_len),
                               SamplingParams(max_tokens=max_tokens, ignore_eos=True), tier)
        sink = _Tracked(self.clock, record, replica, self.tally)
        record.sched_id = replica.scheduler.submit(request, sink)
        if tier is Tier.ONLINE:
            replica.online_live += 1
        else:
            replica.offline_live[record.sched_id] = record
        self._want_pass(replica)

    def _want_pass(self, replica: _Replica) -> None:
        if replica.pass_due is None:
            replica.pass_due = replica.next_tick(self.clock.now)
            self._push(replica.pass_due, _PASS, replica)

    def _route(self) -> _Replica:
        """The replica with the fewest online requests in flight, then the fewest requests;
        ties go round robin."""
        n = len(self.replicas)
        if n == 1:
            return self.replicas[0]
        self._turn = (self._turn + 1) % n
        return min(self.replicas, key=lambda r: (r.online_live, r.executor.num_live,
                                                 (r.index - self._turn) % n))

    def _feed_offline(self, replica: _Replica) -> None:
        limit = self.pool.offline_in_flight
        while self._offline_open and self._backlog and (
            limit is None or len(replica.offline_live) < limit
        ):
            self._submit(replica, Tier.OFFLINE, self._backlog.pop())

    def _seed_offline(self) -> None:
        if self.pool.offline_in_flight is not None:
            for replica in self.replicas:
                self._feed_offline(replica)
            return
        index = 0
        while self._backlog:  # the whole backlog at once, round robin
            self._submit(self.replicas[index % len(self.replicas)], Tier.OFFLINE,
                         self._backlog.pop())
            index += 1

    def _close_window(self) -> None:
        """Unfinished offline requests are cancelled (the load generator's window ended)."""
        self._offline_open = False
        self._backlog.clear()
        for replica in self.replicas:
            for record in list(replica.offline_live.values()):
                record.cut = True
                replica.scheduler.cancel(record.sched_id)
            if replica.offline_live:
                self._want_pass(replica)

    # -- the loop -------------------------------------------------------------------------

    def _push(self, t: float, kind: int, replica: _Replica) -> None:
        heapq.heappush(self._events, (t, kind, replica.index))

    def _settle(self, replica: _Replica, next_input: float) -> None:
        """After a replica's pass: more offline work from the shared backlog; the steps that
        need no pass run ahead up to the next input (when the scheduler holds nothing the
        executor does not, a pass between plain decode steps has nothing to do); an event
        for the step in flight."""
        if self.pool.offline_in_flight is not None and self._backlog:
            self._feed_offline(replica)
        self._run_ahead_of(replica, next_input)
        self._push_step(replica)

    def _run_ahead_of(self, replica: _Replica, next_input: float) -> bool:
        """Runs the replica's steps ahead while the passes between them would have nothing
        to do: the scheduler holds nothing the executor does not, and no input is due."""
        holds_nothing_more = (
            replica.online_live + len(replica.offline_live) == replica.executor.num_live
        )
        if not (self._run_ahead and replica.pass_due is None and holds_nothing_more
                and replica.executor.run_ahead(next_input)):
            return False
        # The last skipped pass came when the step in flight started; later passes tick from
        # there, as they would have.
        replica.last_pass = replica.executor.step_start or replica.last_pass
        return True

    def _push_step(self, replica: _Replica) -> None:
        end = replica.executor.step_end
        if end is not None and end != replica.pushed_step:
            replica.pushed_step = end
            self._push(end, _STEP, replica)

    def run(self) -> SimResult:
        started = time.perf_counter()
        w = self.workload
        online = [r for r in w.online if r.arrival_s < w.duration_s]
        self._seed_offline()
        arrival, closed = 0, w.offline_until_done
        horizon = math.inf if w.offline_until_done else w.duration_s + w.drain_s

        def next_input() -> float:
            t = online[arrival].arrival_s if arrival < len(online) else horizon
            return t if closed else min(t, w.duration_s)

        for replica in self.replicas:
            replica.run_pass()
            self._settle(replica, next_input())
        while True:
            t_event = self._events[0][0] if self._events else math.inf
            t_arrival = online[arrival].arrival_s if arrival < len(online) else math.inf
            t = min(t_event, t_arrival)
            if not closed and t > w.duration_s:
                self.clock.now = max(self.clock.now, w.duration_s)
                self._close_window()
                closed = True
                continue
            if t == math.inf or t > horizon:
                break
            self.clock.now = t
            if t_arrival <= t_event:
                self._submit(self._route(), Tier.ONLINE, online[arrival])
                arrival += 1
                continue
            _, kind, index = heapq.heappop(self._events)
            replica = self.replicas[index]
            if kind == _STEP:
                if replica.executor.step_end != t:
                    continue
                replica.account(min(t, self.tally.window_end))
                if self._run_ahead_of(replica, next_input()):
                    # Stopped earlier only by an input that went to another replica.
                    self._push_step(replica)
                    continue
                replica.executor.finish_step()
                # This step's event is spent: the next step may end at the same time (a step
                # that resumes with nothing left after a nested one) and needs its own.
                replica.pushed_step = None
            elif replica.pass_due != t:
                continue
            else:
                replica.account(min(t, self.tally.window_end))
            replica.run_pass()
            self._settle(replica, next_input())
            if arrival >= len(online) and closed and self._idle():
                break
        return self._result(time.perf_counter() - started)

    def _idle(self) -> bool:
        return not self._backlog and all(
            r.online_live == 0 and not r.offline_live for r in self.replicas
        )

    def _result(self, wall_s: float) -> SimResult:
        end = self.clock.now
        window = end if self.workload.offline_until_done else self.workload.duration_s
        for replica in self.replicas:
            replica.account(min(end, window))
        records, engine, pool = self.records, self.engine, self.pool
        online = tier_figures(records, Tier.ONLINE, self.tally.online, window, end)
        offline = tier_figures(records, Tier.OFFLINE, self.tally.offline, window, end)
        tps = online.tokens_per_s + offline.tokens_per_s
        gpus = pool.replicas * engine.gpus
        cost = pool.price_per_gpu_hour * gpus / 3600.0 / tps * 1e6 if tps > 0 else None
        offline_records = [r for r in records if r.tier is Tier.OFFLINE]
        done = [r for r in offline_records if r.completed]
        all_done = bool(offline_records) and len(done) == len(self.workload.offline)
        slots = engine.capacity.max_slots * pool.replicas
        stats = [r.executor.stats() for r in self.replicas]
        snaps = [r.scheduler.snapshot() for r in self.replicas]
        return SimResult(
            label=engine.label,
            replicas=pool.replicas,
            gpus=gpus,
            window_s=window,
            end_s=end,
            online=online,
            offline=offline,
            tokens_per_s=tps,
            occupancy=sum(r.slot_seconds for r in self.replicas) / (slots * window),
            utilization=tps / (engine.peak_tokens_per_s * pool.replicas),
            busy_fraction=sum(s.busy_seconds for s in stats) / (pool.replicas * end or 1.0),
            price_per_gpu_hour=pool.price_per_gpu_hour,
            cost_per_million_tokens=cost,
            offline_total=len(self.workload.offline),
            offline_completed=len(done),
            offline_done_s=max((r.end_s or 0.0) for r in done) if all_done else None,
            steps=sum(s.steps for s in stats),
            preemptions=sum(s.preemptions for s in stats)
            + sum(sn.offline.preemptions for sn in snaps),
            wall_s=wall_s,
        )


def draw_lengths(pool: Sequence[TraceRequest], count: int, seed: int) -> tuple[TraceRequest, ...]:
    """``count`` lengths drawn from a pool, as the benchmark's load generator draws its
    offline backlog."""
    rng = random.Random(seed)
    return tuple(rng.choice(pool) for _ in range(count))
