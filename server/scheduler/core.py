"""The single-threaded heart of the scheduler: queues, running set, executor id map.

Every method here runs on the scheduler thread (or the test driving ``run_pass``); nothing is
locked. ``BackfillScheduler`` feeds it submits and cancels taken from its thread-safe inbox and
delivers the events it collects, outside any lock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from server.executor.base import (
    DrafterStats,
    Executor,
    FinishReason,
    PlanFollower,
    StepPlan,
    TokenDelta,
)
from server.scheduler.budget import PassBudget
from server.scheduler.config import SchedulerConfig
from server.scheduler.counters import TierCounters
from server.scheduler.live import OUTCOME_OF, LiveRequest, Phase
from server.scheduler.policy import TierQueues, WaitQueue, exec_priority, overtakes
from server.scheduler.slo import SloDecision, SloPlanner
from server.scheduler.speculation import SpeculationPolicy
from server.scheduler.types import EventSink, Outcome, SchedEvent, Tier


class SchedulerCore:
    """Runs the four steps of a pass (DESIGN.md) and turns executor deltas into events.

    Invariants: a sequence is in exactly one of ``_queued`` (and its tier queue) or
    ``_running`` (and ``_by_exec`` under its current executor id) until it finishes; the
    running set never exceeds the executor's slots; every finished sequence emitted exactly
    one final event. Deltas of executor ids no longer mapped (a preempted run) are ignored.
    """

    def __init__(
        self,
        executor: Executor,
        config: SchedulerConfig,
        clock: Callable[[], float],
        counters: TierCounters,
        planner: SloPlanner | None = None,
        speculation: SpeculationPolicy | None = None,
    ) -> None:
        self._executor = executor
        self._config = config
        self._clock = clock
        self._counters = counters
        self._capacity = executor.capacity
        self._reserve = config.reserve_slots(self._capacity.max_slots)
        self._queues = TierQueues.for_config(config)
        self._queued: dict[int, LiveRequest] = {}
        self._running: dict[int, LiveRequest] = {}  # insertion order = run start order
        self._by_exec: dict[int, LiveRequest] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap of (ttft deadline, id) of queued
        self._next_exec_id = 1
        self._outbox: list[tuple[EventSink, SchedEvent]] = []
        self._stopping = False  # executor CANCELLED finishes now mean SHUTDOWN
        self._offline_open = True  # False once draining: no offline request starts again
        self._shut_offline: list[int] = []  # offline ids ended by close_offline
        self._planner = planner if config.policy == "backfill" else None
        self._speculation = speculation
        # Executors that take step plans get them; the others are bounded by admission.
        self._follower = executor if isinstance(executor, PlanFollower) else None
        self._sent_plan = StepPlan()  # the last plan sent
        self._drafter: DrafterStats | None = None  # the executor's drafter, as last reported
        self.decision = SloDecision(StepPlan(), False, None, 0, 0.0)

    # ---- intake -----------------------------------------------------------------------------

    def add(self, seq: LiveRequest) -> None:
        """A new request (already counted as queued by submit)."""
        self._queued[seq.id] = seq
        self._queues.of(seq.tier).push(seq)
        if seq.request.ttft_deadline is not None:
            heapq.heappush(self._deadlines, (seq.request.ttft_deadline, seq.id))

    def cancel(self, request_id: int) -> None:
        """Queued: final CANCELLED now. Running: tell the executor, finish when it confirms."""
        queued = self._queued.get(request_id)
        if queued is not None:
            self._finish(queued, Outcome.CANCELLED)
            return
        running = self._running.get(request_id)
        if running is not None and not running.cancel_requested and running.exec_id is not None:
            running.cancel_requested = True
            self._executor.cancel(running.exec_id)

    def close_offline(self) -> None:
        """Draining: offline requests are admitted no more. Queued ones end now with SHUTDOWN
        (batch job requests stay pending in the job store for the next start) instead of
        running into the grace period only to be ended at stop; running ones go on."""
        if not self._offline_open:
            return
        self._offline_open = False
        for seq in [s for s in self._queued.values() if s.tier is Tier.OFFLINE]:
            self._finish(seq, Outcome.SHUTDOWN)
            self._shut_offline.append(seq.id)

    # ---- step 1: drop the dead ------------------------------------------------------------

    def drop_expired(self) -> None:
        """Queued requests never admitted whose TTFT deadline has come get DEADLINE."""
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            seq = self._queued.get(request_id)
            if seq is not None and seq.admitted_at is None:
                self._finish(seq, Outcome.DEADLINE)
        if len(self._deadlines) > 64 + 2 * len(self._queued):
            # Entries of requests that were admitted linger until their deadline; compact so
            # far-off deadlines cannot grow the heap without bound.
            self._deadlines = [e for e in self._deadlines if e[1] in self._queued]
            heapq.heapify(self._deadlines)

    # ---- steps 2-4: admission -------------------------------------------------------------

    def schedule(self) -> None:
        budget = self._new_budget()
        if self._config.policy == "fcfs":
            self._admit_in_order(self._queues.online, budget)  # the one shared queue
            self._plan_steps(budget, waiting=False)
            return
        if self._queues.online.peek() is not None:
            # Online work is about to start: the offline rows it must not wait for are paused
            # before it is enqueued, so its first step already runs within the budget.
            self._plan_steps(budget, waiting=True)
        self._serve_online(budget)
        self._fill_offline(budget)
        if budget.free_slots:
            # Offline requests the executor refused shrank offline demand below the slots
            # kept for it; online may have those now.
            self._serve_online(budget)
        self._plan_steps(budget, waiting=False)

    def _plan_steps(self, budget: PassBudget, *, waiting: bool) -> None:
        """The TPOT budget for the next steps (slo.py) and the draft lengths of speculative
        decoding (speculation.py), sent to a plan-following executor when they changed.
        ``waiting`` counts the queued online heads as running."""
        if self._planner is not None:
            heads = self._online_heads(budget.free_slots) if waiting else []
            self.decision = self._planner.decide(
                self._running.values(), heads, budget.keep_offline
            )
        if self._follower is None:
            return
        draft_lens = {}
        if self._speculation is not None:
            draft_lens = self._speculation.decide(
                self._running.values(), self.decision.caps, self._drafter
            )
        plan = StepPlan(dict(self.decision.plan.token_caps), draft_lens)
        if plan != self._sent_plan:
            self._follower.set_plan(plan)
            self._sent_plan = plan

    def _online_heads(self, count: int) -> list[LiveRequest]:
        heads: list[LiveRequest] = []
        for seq in self._queues.online:
            if len(heads) >= max(1, count):
                break
            heads.append(seq)
        return heads

    def _serve_online(self, budget: PassBudget) -> None:
        self._admit_in_order(self._queues.online, budget)
        if self._config.preempts:
            self._preempt_for_online(budget)

    def _new_budget(self) -> PassBudget:
        stats = self._executor.stats()
        name = self._capacity.drafter
        self._drafter = next((d for d in stats.drafters if d.drafter == name), None)
        offline_running = self.num_running(Tier.OFFLINE)
        # Runs admitted in earlier passes that have not reported yet may hold no blocks in
        # the executor's stats; charge them here so that passes do not over-admit KV.
        unreported = sum(
            self._capacity.blocks_for(s.num_context_tokens + 1)
            for s in self._running.values()
            if not s.run_reported
        )
        return PassBudget(
            self._capacity,
            free_slots=self._capacity.max_slots - len(self._running),
            free_blocks=stats.kv_blocks_free + stats.kv_blocks_cached - unreported,
            reserve=self._reserve,
            offline_demand=offline_running
            + (len(self._queues.offline) if self._offline_open else 0),
            offline_holding=offline_running,
        )

    def _fill_offline(self, budget: PassBudget) -> None:
        """Step 4. While an online request still waits (then for KV blocks, as slots it
        would have had), offline takes only its reserve: blocks that free up go to the online
        head instead of to newer offline work, which could otherwise starve it."""
        if not self._offline_open:
            return
        offline = self._queues.offline
        rows = self._offline_row_bound()
        if rows is not None:
            # An executor that plans its own steps is bounded by how many offline requests
            # it holds while online work is present (the TPOT budget's offline rows).
            budget.offline_limit = max(budget.keep_offline, rows)
        if self._queues.online.peek() is None:
            self._admit_in_order(offline, budget)
            return
        while (
            budget.offline_holding < budget.keep_offline
            and (head := offline.peek()) is not None
            and self._try_start(head, budget)
        ):
            pass

    def _offline_row_bound(self) -> int | None:
        if self._planner is None or self._follower is not None:
            return None
        online = self.num_running(Tier.ONLINE) or self._queues.online.peek() is not None
        return self.decision.offline_rows if online else None

    def _admit_in_order(self, queue: WaitQueue, budget: PassBudget) -> None:
        """Admits from the head while it fits; a head that does not fit blocks the rest, so
        a large request is not starved by smaller ones behind it. Works on the head only, so
        a pass costs O(admitted), not O(queue length)."""
        while (head := queue.peek()) is not None and self._try_start(head, budget):
            pass

    def _preempt_for_online(self, budget: PassBudget) -> None:
        while (head := self._queues.online.peek()) is not None:
            victims = self._victims_for(head, budget)
            if not victims:
                return
            for victim in victims:
                self._preempt(victim, budget)
            self._admit_in_order(self._queues.online, budget)

    def _victims_for(self, head: LiveRequest, budget: PassBudget) -> list[LiveRequest]:
        """The fewest offline runs above the reserve, newest first, whose slots and blocks let
        head start; none when even all of them would not (preempting would waste work)."""
        spare = budget.offline_holding - budget.keep_offline
        candidates = [
            s
            for s in reversed(self._running.values())
            if s.tier is Tier.OFFLINE and not s.cancel_requested
        ][: max(0, spare)]
        slots = budget.free_slots - budget.reserved_slots
        blocks = budget.free_blocks
        need = budget.blocks_needed(head)
        chosen: list[LiveRequest] = []
        for seq in candidates:
            if slots >= 1 and blocks >= need:
                break
            chosen.append(seq)
            slots += 1
            blocks += budget.blocks_held(seq)
        return chosen if slots >= 1 and blocks >= need else []

    def _try_start(self, seq: LiveRequest, budget: PassBudget) -> bool:
        """Starts a run of seq if the budget allows. True when seq left the queue (started,
        or refused by the executor and finished with ERROR), so admission may go on."""
        if not budget.try_admit(seq):
            return False
        exec_id = self._next_exec_id
        self._next_exec_id += 1
        try:
            self._executor.enqueue(
                seq.exec_request(
                    exec_id,
                    exec_priority(self._config, seq.tier),
                    overtakes(self._config, seq.tier),
                )
            )
        except ValueError as exc:
            budget.refund(seq)
            self._finish(seq, Outcome.ERROR, error=f"executor refused the request: {exc}")
            return True
        self._dequeue(seq, started=True)
        seq.phase, seq.exec_id, seq.run_reported = Phase.RUNNING, exec_id, False
        seq.run_tokens = 0
        self._running[seq.id] = seq
        self._by_exec[exec_id] = seq
        if seq.admitted_at is None:
            seq.admitted_at = self._clock()
        self._counters.add(seq.tier, running=1)
        return True

    def _preempt(self, seq: LiveRequest, budget: PassBudget) -> None:
        """Cancels the run and puts seq at the head of its queue; it resumes from its tokens
        under a new executor id, and the old id's CANCELLED final is ignored (unmapped)."""
        assert seq.exec_id is not None
        self._executor.cancel(seq.exec_id)
        del self._by_exec[seq.exec_id]
        del self._running[seq.id]
        budget.release(seq)
        seq.phase, seq.exec_id = Phase.QUEUED, None
        seq.preemptions += 1
        self._queued[seq.id] = seq
        self._queues.of(seq.tier).push_front(seq)
        self._counters.add(seq.tier, running=-1, queued=1, preemptions=1)

    # ---- executor output ------------------------------------------------------------------

    def apply(self, deltas: list[TokenDelta]) -> None:
        # Generated tokens are tallied per tier and added once per poll: the counters take a
        # lock, and a poll of a full batch carries one delta per running sequence.
        generated = dict.fromkeys(Tier, 0)
        by_exec = self._by_exec
        for delta in deltas:
            seq = by_exec.get(delta.request_id)
            if seq is not None:
                generated[seq.tier] += len(delta.token_ids)
                self._apply_one(seq, delta)
        for tier, count in generated.items():
            if count:
                self._counters.add(tier, generated_tokens=count)

    def _apply_one(self, seq: LiveRequest, delta: TokenDelta) -> None:
        seq.run_reported = True
        if seq.cached_prompt_tokens is None and delta.cached_prompt_tokens is not None:
            seq.cached_prompt_tokens = delta.cached_prompt_tokens
        if delta.speculative_steps or delta.draft_tokens_proposed:
            seq.count_drafts(delta)
        if delta.token_ids:
            if seq.first_token_at is None:
                seq.first_token_at = self._clock()
            seq.tokens.extend(delta.token_ids)
            seq.run_tokens += len(delta.token_ids)
        if delta.finish is None:
            if delta.token_ids or delta.text:
                self._outbox.append((seq.sink, seq.token_event(delta)))
            return
        outcome = OUTCOME_OF[delta.finish]
        if self._stopping and delta.finish is FinishReason.CANCELLED:
            outcome = Outcome.SHUTDOWN
        error = (delta.error or "executor error") if outcome is Outcome.ERROR else None
        self._finish(seq, outcome, delta.token_ids, delta.text, error, delta)

    # ---- endings --------------------------------------------------------------------------

    def _dequeue(self, seq: LiveRequest, started: bool = False) -> None:
        queue = self._queues.of(seq.tier)
        if started:
            queue.take(seq)
        else:
            queue.remove(seq)
        del self._queued[seq.id]
        self._counters.add(seq.tier, queued=-1)

    def _finish(
        self,
        seq: LiveRequest,
        outcome: Outcome,
        token_ids: tuple[int, ...] = (),
        text: str = "",
        error: str | None = None,
        delta: TokenDelta | None = None,
    ) -> None:
        if seq.phase is Phase.QUEUED:
            self._dequeue(seq)
        elif seq.phase is Phase.RUNNING:
            assert seq.exec_id is not None
            del self._by_exec[seq.exec_id]
            del self._running[seq.id]
            self._counters.add(seq.tier, running=-1)
        seq.phase, seq.exec_id = Phase.FINISHED, None
        self._counters.add(seq.tier, finished=1)
        now = self._clock()
        if outcome in (Outcome.STOP, Outcome.LENGTH):
            self._judge(seq, now)
        event = seq.final_event(outcome, now, token_ids, text, error, delta)
        self._outbox.append((seq.sink, event))

    def _judge(self, seq: LiveRequest, now: float) -> None:
        """SLO attainment of a completed request: its time to first token, and its mean time
        per output token (met trivially with fewer than two tokens)."""
        ttft_slo, tpot_slo = self._config.ttft_slo_s, self._config.tpot_slo_s
        if ttft_slo is None and tpot_slo is None:
            return
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.arrival
        tpot = seq.time_per_output_token(now)
        tpot_met = tpot_slo is None or tpot is None or tpot <= tpot_slo
        self._counters.judge(
            seq.tier,
            ttft_met=ttft_slo is None or (ttft is not None and ttft <= ttft_slo),
            tpot_met=tpot_met,
        )
        if self._planner is not None and seq.tier is Tier.ONLINE and tpot is not None:
            self._planner.observe_tpot(tpot_met)

    def end_all(self, outcome: Outcome) -> list[int]:
        """Ends every live request with outcome (cancelling runs); returns the offline ids."""
        self._stopping = True
        live = [*self._running.values(), *self._queued.values()]
        for seq in live:
            if seq.exec_id is not None:
                self._executor.cancel(seq.exec_id)
            self._finish(seq, outcome)
        return sorted([*self._shut_offline, *(s.id for s in live if s.tier is Tier.OFFLINE)])

    # ---- views ----------------------------------------------------------------------------

    def take_events(self) -> list[tuple[EventSink, SchedEvent]]:
        out, self._outbox = self._outbox, []
        return out

    def num_running(self, tier: Tier) -> int:
        return sum(1 for s in self._running.values() if s.tier is tier)

    def running(self) -> list[LiveRequest]:
        """Running sequences in run start order (oldest first)."""
        return list(self._running.values())

    def queued(self, tier: Tier) -> list[LiveRequest]:
        """Queued sequences of a tier in admission order (fcfs: both tiers, one order)."""
        return list(self._queues.of(tier))
