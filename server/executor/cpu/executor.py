"""CpuExecutor: the Executor protocol over a CpuEngine driven by one worker thread.

Why a thread and not a process: every step is a few dozen large BLAS calls and NumPy releases
the GIL inside them, so the gRPC threads stay responsive while a step runs; a thread also shares
the weights and KV pool with no copies and no IPC per token. The Python parts of a step
(scheduling, sampling, stops) take a few milliseconds and hold the GIL only briefly.

The worker owns the engine. Callers talk to it through an inbox (new requests, cancels, the
scheduler's step plan) and an outbox of deltas and step samples, all under one lock; deltas for
the same request coalesce in the outbox when polls are slower than steps, so a slow reader gets
fewer, larger deltas instead of falling behind.

Between two layers of every step the worker checks, without taking the lock, whether a request
marked ``overtake`` has arrived; if one has, it runs that request's prefill as a step of its
own right there, publishes its first token, and goes on with the step in flight. On a CPU a
step of offline work takes hundreds of milliseconds, so this is what keeps an online request's
time to first token close to that of an idle engine without throwing the step's work away.
Its next tokens come the same way, from decode steps nested between later layers, whenever the
last is ``StepPlan.overtake_interval_s`` old, until the step it overtook ends.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from engine_builder.manifest import Manifest
from engine_builder.step_cost import StepSample
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import (
    Capacity,
    ExecRequest,
    ExecutorStats,
    FinishReason,
    StepPlan,
    TokenDelta,
    check_fits,
)
from server.executor.cpu.blas import default_threads, set_thread_compute_threads
from server.executor.cpu.engine import CpuEngine, EngineCounters, StepRun
from server.executor.cpu.open import build_engine
from server.executor.cpu.speculation import SpeculationConfig

log = logging.getLogger(__name__)

STEP_SAMPLES_KEPT = 4096  # step samples nobody took yet are dropped oldest first beyond this


class CpuExecutor:
    """The NumPy reference executor. Thread-safe; see server/executor/base.py for semantics.
    Follows step plans (``set_plan``) and reports step samples (``take_step_samples``)."""

    def __init__(
        self, engine: CpuEngine, capacity: Capacity, *, blas_threads: int | None = None,
        warm_up: bool = True,
    ) -> None:
        """``warm_up``: the worker's first act is ``CpuEngine.warm_up`` (a few steps of two
        short requests), and the constructor returns when it is done."""
        self._engine = engine
        self._warm_up = warm_up
        self._warmed = threading.Event()
        self._capacity = capacity
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the worker waits for something to do
        self._ready = threading.Condition(self._lock)  # pollers wait for deltas
        self._inbox: list[ExecRequest] = []
        self._cancels: list[int] = []
        self._plan: StepPlan | None = None  # a new plan for the worker to take
        self._new_input = False  # inbox, cancels or plan changed since the worker looked
        self._overtakers = 0  # requests in the inbox marked overtake (read without the lock)
        # Sequences that overtook the step in flight, by id: when each last got a token (the
        # worker's own; cleared as the step ends, the next one carrying them).
        self._overtaking: dict[int, float] = {}
        self._runnable = False  # the last step ran: the next may run without new input
        self._outbox: list[TokenDelta] = []
        self._samples: deque[StepSample] = deque(maxlen=STEP_SAMPLES_KEPT)
        # request id -> index in _outbox of its unfinished delta, which later deltas extend.
        # A finished delta is never extended: the id may be reused by a new request at once.
        self._open: dict[int, int] = {}
        self._live: set[int] = set()  # enqueued ids without a final delta yet
        # Requests taken from the inbox that the last stats snapshot does not show yet.
        self._handed_over = 0
        self._stopping = False
        self._step_lock = threading.Lock()  # held by the worker while it touches the engine
        self._blas_threads = default_threads() if blas_threads is None else blas_threads
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="cpu-executor", daemon=True)
        self._thread.start()
        self._warmed.wait()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def open(
        cls, engine_dir: str | Path, speculation: SpeculationConfig | None = None
    ) -> CpuExecutor:
        path = Path(engine_dir)
        return cls.from_manifest(path, Manifest.load(path), speculation)

    @classmethod
    def from_manifest(
        cls, engine_dir: Path, manifest: Manifest, speculation: SpeculationConfig | None = None
    ) -> CpuExecutor:
        return cls(*build_engine(engine_dir, manifest, speculation))

    # -- the protocol ---------------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return self._capacity

    @property
    def tokenizer(self) -> EngineTokenizer:
        return self._engine.tokenizer

    @property
    def weight_bytes(self) -> int:
        return self._engine.model.weights.nbytes

    @property
    def blas_threads(self) -> int:
        return self._blas_threads

    def enqueue(self, request: ExecRequest) -> None:
        self._validate(request)
        with self._lock:
            if self._stopping:
                raise ValueError("the executor is shut down")
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id} is already live")
            self._live.add(request.request_id)
            self._inbox.append(request)
            self._overtakers += request.overtake
            self._wake()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._live:
                self._cancels.append(request_id)
                self._wake()

    def set_plan(self, plan: StepPlan) -> None:
        with self._lock:
            self._plan = plan
            self._wake()

    def poll(self, timeout: float) -> list[TokenDelta]:
        with self._lock:
            if not self._outbox and timeout > 0:
                self._ready.wait_for(lambda: bool(self._outbox), timeout)
            deltas, self._outbox = self._outbox, []
            self._open.clear()
        return deltas

    def take_step_samples(self) -> list[StepSample]:
        with self._lock:
            samples = list(self._samples)
            self._samples.clear()
        return samples

    def stats(self) -> ExecutorStats:
        with self._lock:
            stats = self._stats
            queued = stats.queued + len(self._inbox) + self._handed_over
            return replace(stats, queued=queued)

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def counters(self) -> EngineCounters:
        """A copy of the engine's cumulative counters (computed tokens, busy seconds...)."""
        with self._step_lock:
            return replace(self._engine.counters)

    def check_integrity(self) -> None:
        """Engine and KV-pool invariants (AssertionError); for tests, between steps."""
        with self._step_lock:
            self._engine.check_integrity()

    # -- the worker -----------------------------------------------------------------------

    def _wake(self) -> None:
        """Under the lock: tells the worker there is new input."""
        self._new_input = True
        self._work.notify()

    def _validate(self, request: ExecRequest) -> None:
        cap = self._capacity
        check_fits(request, cap)
        for token in (*request.prompt_token_ids, *request.resume_token_ids):
            if not 0 <= token < cap.vocab_size:
                raise ValueError(f"token id {token} outside the vocabulary [0, {cap.vocab_size})")

    def _loop(self) -> None:
        set_thread_compute_threads(self._blas_threads)
        if self._warm_up:
            with self._step_lock:
                try:
                    self._engine.warm_up()
                except Exception:  # the requests will meet the failure, with its error
                    log.exception("cpu executor warm-up failed")
                    self._engine.cancel_all()
                    self._engine.drain()
        self._warmed.set()
        while True:
            with self._lock:
                # With nothing runnable (no work, or every sequence paused) the worker waits
                # for new input instead of spinning through empty steps.
                self._work.wait_for(
                    lambda: self._stopping or self._new_input or self._runnable
                )
                if self._stopping:
                    break
                requests, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                plan, self._plan = self._plan, None
                self._new_input = False
                self._overtakers = 0
                self._handed_over = len(requests)
            self._runnable, deltas = self._run_step(requests, cancels, plan)
            self._publish(deltas)
        with self._step_lock:
            self._engine.cancel_all()
            deltas = self._engine.drain()
        unstarted = [
            TokenDelta(r.request_id, (), "", FinishReason.CANCELLED, cached_prompt_tokens=0)
            for r in self._inbox
        ]
        self._inbox = []
        self._publish(deltas + unstarted)

    def _run_step(
        self, requests: list[ExecRequest], cancels: list[int], plan: StepPlan | None
    ) -> tuple[bool, list[TokenDelta]]:
        engine = self._engine
        with self._step_lock:
            try:
                if plan is not None:
                    engine.set_plan(plan)
                self._add(requests)
                for request_id in cancels:
                    engine.cancel(request_id)
                run = engine.begin_step()
                if run is None:
                    return False, engine.drain()
                while not run.layers_done:
                    run.advance()
                    if self._overtakers:  # a racy peek: _overtake decides under the lock
                        self._overtake(run)
                    if self._overtaking:
                        self._decode_overtakers(run)
                engine.finish_step(run)
                return True, engine.drain() + self._late_cancels()
            except Exception as exc:  # an engine bug must not hang every caller
                log.exception("cpu executor step failed")
                engine.cancel_all(FinishReason.ERROR, f"engine failure: {exc!r}")
                return False, engine.drain()
            finally:
                self._overtaking.clear()  # the next step carries them

    def _add(self, requests: list[ExecRequest]) -> None:
        for request in requests:
            seed = request.sampling.seed
            self._engine.add(request, secrets.randbits(64) if seed is None else seed)

    def _overtake(self, run: StepRun) -> None:
        """Between two layers of ``run``: the prefill of the overtaking requests that arrived
        meanwhile, as a step of its own, and their first tokens published at once. Cancels
        that came with them (preemptions, usually, to give them slots) land when ``run``
        ends, but the slots they free may be taken now."""
        engine = self._engine
        with self._lock:
            urgent = [r for r in self._inbox if r.overtake]
            self._inbox = [r for r in self._inbox if not r.overtake]
            self._overtakers = 0
            now = self._cancels_outside(run)
            leaving = sum(1 for rid in self._cancels if rid in run.ids)
        if not urgent and not now:
            return
        for request_id in now:
            engine.cancel(request_id)
        self._add(urgent)
        nested = engine.begin_step({r.request_id for r in urgent}, extra_slots=leaving)
        if nested is not None:
            engine.finish_step(nested)
            self._overtaking.update(dict.fromkeys(nested.ids, time.perf_counter()))
        self._publish(engine.drain())

    def _decode_overtakers(self, run: StepRun) -> None:
        """Between two layers of ``run``: the next tokens of the sequences that overtook it,
        as a step of their own, once one's last token is the plan's overtake interval old.
        ``run`` does not carry them and may last several of their TPOT SLOs. The nested step
        never preempts: a sequence in ``run`` must keep its KV blocks."""
        engine = self._engine
        with self._lock:
            now = self._cancels_outside(run)
        for request_id in now:
            engine.cancel(request_id)
        interval = engine.plan.overtake_interval_s
        for request_id in [rid for rid in self._overtaking if not engine.knows(rid)]:
            del self._overtaking[request_id]  # finished, or cancelled just now
        clock = time.perf_counter()
        # All of them together once one is due: one at a time, each would fall due while
        # another's step ran, and the step in flight would get no further.
        due = interval is not None and any(
            clock - last >= interval for last in self._overtaking.values()
        )
        nested = engine.begin_step(set(self._overtaking), preempt=False) if due else None
        if nested is not None:
            engine.finish_step(nested)
            self._overtaking.update(dict.fromkeys(nested.ids, time.perf_counter()))
        if now or nested is not None:
            self._publish(engine.drain())

    def _cancels_outside(self, run: StepRun) -> list[int]:
        """Takes the cancels of sequences outside the step in flight (paused ones, or those
        that overtook it): they can go at once. Under the lock."""
        now = [rid for rid in self._cancels if rid not in run.ids and self._engine.knows(rid)]
        self._cancels = [rid for rid in self._cancels if rid not in now]
        return now

    def _late_cancels(self) -> list[TokenDelta]:
        """Cancels that came during the step, applied at its end: an overtaking step may have
        used their slots already. A cancel of a request still in the inbox waits for the next
        round, which adds the inbox first (applied now it would find nothing: a zombie)."""
        with self._lock:
            if not self._cancels:
                return []
            late, self._cancels = self._cancels, []
            self._cancels = [rid for rid in late if not self._engine.knows(rid)]
        now = [rid for rid in late if self._engine.knows(rid)]
        for request_id in now:
            self._engine.cancel(request_id)
        return self._engine.drain() if now else []

    def _publish(self, deltas: list[TokenDelta]) -> None:
        samples = self._engine.take_step_samples()
        with self._lock:
            self._stats = self._snapshot()
            self._handed_over = 0
            self._samples.extend(samples)
            for delta in deltas:
                rid = delta.request_id
                index = self._open.pop(rid, None)
                if index is None:
                    index = len(self._outbox)
                    self._outbox.append(delta)
                else:
                    self._outbox[index] = self._outbox[index].then(delta)
                if delta.finish is None:
                    self._open[rid] = index
                else:
                    self._live.discard(rid)
            if deltas:
                self._ready.notify_all()

    def _snapshot(self) -> ExecutorStats:
        engine, batcher = self._engine, self._engine.batcher
        kv, c = batcher.blocks, engine.counters
        drafters = engine.speculator.stats()
        return ExecutorStats(
            active=len(batcher.running),
            queued=len(batcher.waiting),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_cached=kv.num_cached_blocks,
            steps=c.steps,
            last_step_latency_s=c.last_step_latency_s,
            last_step_tokens=c.last_step_tokens,
            prompt_tokens=batcher.num_prompt_tokens,
            cached_prompt_tokens=batcher.num_cached_prompt_tokens,
            generated_tokens=c.generated_tokens,
            busy_seconds=c.busy_seconds,
            context_requests=sum(1 for seq in batcher.running if seq.prefilling),
            preemptions=batcher.num_preemptions,
            draft_tokens_proposed=sum(d.proposed for d in drafters),
            draft_tokens_accepted=sum(d.accepted for d in drafters),
            drafters=drafters,
        )

