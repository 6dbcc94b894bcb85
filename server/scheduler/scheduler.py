"""BackfillScheduler: the thread-safe front of the two-tier scheduler (docs/scheduler-api.md).

Threads: ``submit``/``cancel``/``snapshot``/``begin_drain``/``stop`` may be called from any
thread; they touch only a small inbox and counters under ``_lock``. Everything else (queues,
the executor id map, sinks) belongs to the scheduler thread: the background thread after
``start()``, or whoever calls ``run_pass`` (tests). Sinks are called with no lock held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from engine_builder.step_cost import OnlineStepCost, StepSample
from server.executor.base import Capacity, Executor, ExecutorStats, StepReporter
from server.scheduler.config import SchedulerConfig
from server.scheduler.core import SchedulerCore
from server.scheduler.counters import TierCounters
from server.scheduler.live import LiveRequest
from server.scheduler.slo import SloPlanner
from server.scheduler.speculation import SpeculationPolicy
from server.scheduler.types import (
    DrainingError,
    EventSink,
    Outcome,
    QueueFullError,
    SchedEvent,
    SchedRequest,
    SchedulerSnapshot,
    StepBudgetSnapshot,
    Tier,
)

# Called on the scheduler's thread for every executor step: the sample and what the step-cost
# model predicted for it beforehand (None while it had nothing to predict with). Must not block.
StepObserver = Callable[[StepSample, float | None], None]

log = logging.getLogger(__name__)


class BackfillScheduler:
    """Admits online and offline requests onto an executor's slots; see DESIGN.md.

    Invariant: every accepted request (``submit`` returned an id) gets exactly one final event,
    whatever happens: finish, cancel, deadline, executor error or ``stop``.
    """

    def __init__(
        self,
        executor: Executor,
        config: SchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        step_cost: OnlineStepCost | None = None,
        step_observer: StepObserver | None = None,
    ) -> None:
        """``step_cost`` is the engine's step-cost model (a fresh, uncalibrated one that learns
        from the executor's steps when None); the TPOT budget uses it when
        ``config.tpot_slo_ms`` is set."""
        self._executor = executor
        self._config = config if config is not None else SchedulerConfig()
        self._clock = clock
        self._counters = TierCounters()
        self._step_cost = step_cost if step_cost is not None else OnlineStepCost(None)
        self._step_observer = step_observer
        self._reporter = executor if isinstance(executor, StepReporter) else None
        slo = self._config.tpot_slo_s
        self._planner = (
            None if slo is None
            else SloPlanner(self._step_cost, slo, executor.capacity, clock,
                            self._config.max_online_slowdown)
        )
        speculation = SpeculationPolicy(
            self._step_cost, executor.capacity, self._config.speculation, slo, self._planner
        )
        self._core = SchedulerCore(
            executor, self._config, clock, self._counters, self._planner, speculation
        )
        self._lock = threading.Lock()  # guards the fields below up to _stopped
        self._inbox: list[LiveRequest] = []
        self._cancels: list[int] = []
        self._next_id = 1
        self._draining = False
        self._stopped = False
        self._pass_lock = threading.Lock()  # one pass at a time (thread, tests, stop)
        self._passes = 0
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._unfinished_offline: list[int] = []

    @property
    def capacity(self) -> Capacity:
        return self._executor.capacity

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def step_cost(self) -> OnlineStepCost:
        return self._step_cost

    @property
    def planner(self) -> SloPlanner | None:
        return self._planner

    def set_step_observer(self, observer: StepObserver | None) -> None:
        """Called with every executor step from now on (see StepObserver)."""
        self._step_observer = observer

    # ---- any thread -----------------------------------------------------------------------

    def submit(self, request: SchedRequest, sink: EventSink) -> int:
        """Queues a request; see docs/scheduler-api.md for the errors it raises."""
        if self._draining:
            raise DrainingError("the scheduler is draining")
        self._check_runnable(request)
        with self._lock:
            if self._draining:
                raise DrainingError("the scheduler is draining")
            if not self._counters.try_queue(request.tier, self._queue_bound(request.tier)):
                raise QueueFullError(f"the {request.tier.value} queue is full")
            request_id = self._next_id
            self._next_id += 1
            self._inbox.append(LiveRequest(request_id, request, sink, arrival=self._clock()))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Idempotent; takes effect in the next pass (before any further tokens are sent)."""
        with self._lock:
            self._cancels.append(request_id)

    def begin_drain(self) -> None:
        """Refuses new work from now on; the next pass also ends every queued offline
        request (SHUTDOWN) and admits no offline request again (SchedulerCore.close_offline)."""
        with self._lock:
            self._draining = True

    def snapshot(self) -> SchedulerSnapshot:
        decision = self._core.decision
        error, _ = self._step_cost.error_summary()
        return SchedulerSnapshot(
            online=self._counters.snapshot(Tier.ONLINE),
            offline=self._counters.snapshot(Tier.OFFLINE),
            slots_total=self.capacity.max_slots,
            passes=self._passes,
            draining=self._draining,
            step_budget=StepBudgetSnapshot(
                tpot_slo_ms=self._config.tpot_slo_ms,
                ttft_slo_ms=self._config.ttft_slo_ms,
                step_budget_ms=(
                    None if self._planner is None else 1000.0 * self._planner.budget_s
                ),
                online_present=decision.online_present,
                offline_held_back=decision.held_back,
                predicted_step_ms=1000.0 * decision.predicted_s,
                prediction_error=error,
                steps_observed=self._step_cost.observed_steps,
            ),
        )

    def executor_stats(self) -> ExecutorStats:
        return self._executor.stats()

    # ---- the scheduler thread -------------------------------------------------------------

    def run_pass(self, poll_timeout: float = 0.0) -> None:
        """One executor poll, then one scheduling pass (DESIGN.md steps 1-4), then events.

        Polling first means completions free their slots before admission, so after a pass
        the invariants hold for the state the executor will run next.
        """
        with self._pass_lock:
            if self._stopped:
                return
            self._core.apply(self._executor.poll(poll_timeout))
            self._learn_step_costs()
            self._take_inbox()
            if self._draining:
                self._core.close_offline()
            self._core.drop_expired()
            self._core.schedule()
            self._passes += 1
            events = self._core.take_events()
        self._deliver(events)

    def start(self) -> None:
        """Runs passes on a background thread until ``stop``; each polls for up to W."""
        with self._lock:
            if self._stopped or self._thread is not None:
                raise RuntimeError("the scheduler was already started or stopped")
            self._thread = threading.Thread(target=self._loop, name="backfill-scheduler")
            self._thread.daemon = True
            self._thread.start()

    def stop(self, grace_s: float) -> list[int]:
        """Drains: waits up to grace_s (wall time) for online requests in flight, then ends
        everything left with SHUTDOWN and shuts the executor down. Returns the ids of offline
        requests that did not finish. Idempotent (later calls return the same ids)."""
        self.begin_drain()
        give_up = time.monotonic() + max(0.0, grace_s)
        if self._thread is not None:
            self._wait_for_online(give_up)
            self._halt.set()
            self._thread.join()
        else:
            while self._online_in_flight() and (left := give_up - time.monotonic()) > 0:
                self.run_pass(min(self._config.window_s, left))
            self._end_everything(Outcome.SHUTDOWN)
        return list(self._unfinished_offline)

    # ---- helpers --------------------------------------------------------------------------

    def _check_runnable(self, request: SchedRequest) -> None:
        """ValueError for a request no amount of waiting would let the engine run."""
        cap = self.capacity
        n = len(request.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + 1 > cap.max_seq_len:
            raise ValueError(
                f"a prompt of {n} tokens leaves no room for output (max_seq_len {cap.max_seq_len})"
            )
        if cap.blocks_for(n + 1) > cap.num_kv_blocks:
            raise ValueError(
                f"a prompt of {n} tokens needs more KV blocks than the pool ({cap.num_kv_blocks})"
            )
        ids = request.prompt_token_ids
        if min(ids) < 0 or max(ids) >= cap.vocab_size:  # C loops: prompts can be long
            raise ValueError(f"a token id is outside the vocabulary (size {cap.vocab_size})")

    def _queue_bound(self, tier: Tier) -> int:
        if tier is Tier.ONLINE:
            return self._config.max_online_queue
        return self._config.max_offline_queue

    def _learn_step_costs(self) -> None:
        """Feeds the executor's finished steps to the step-cost model (and the observer)."""
        if self._reporter is None:
            return
        for sample in self._reporter.take_step_samples():
            predicted = self._step_cost.observe(sample.shape, sample.seconds)
            if self._step_observer is not None:
                try:
                    self._step_observer(sample, predicted)
                except Exception:
                    log.exception("step observer failed")

    def _take_inbox(self) -> None:
        with self._lock:
            arrivals, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        for seq in arrivals:
            self._core.add(seq)
        for request_id in cancels:
            self._core.cancel(request_id)

    def _deliver(self, events: list[tuple[EventSink, SchedEvent]]) -> None:
        for sink, event in events:
            try:
                sink(event)
            except Exception:
                # One broken consumer must not stall every other request's stream.
                log.exception("event sink for request %d failed", event.request_id)

    def _online_in_flight(self) -> bool:
        return self._counters.in_flight(Tier.ONLINE) > 0

    def _wait_for_online(self, give_up: float) -> None:
        while self._online_in_flight() and self._thread is not None and self._thread.is_alive():
            left = give_up - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(self._config.window_s, left))

    def _loop(self) -> None:
        outcome = Outcome.SHUTDOWN
        try:
            while not self._halt.is_set():
                self.run_pass(self._config.window_s)
        except Exception:
            log.exception("the scheduler loop failed; ending every request")
            self.begin_drain()
            outcome = Outcome.ERROR
        self._end_everything(outcome)

    def _end_everything(self, outcome: Outcome) -> None:
        """Ends all live requests (on the scheduler thread) and shuts the executor down."""
        with self._pass_lock:
            if self._stopped:
                return
            self._take_inbox()
            self._unfinished_offline = self._core.end_all(outcome)
            self._stopped = True
            events = self._core.take_events()
        self._executor.shutdown()
        self._deliver(events)
