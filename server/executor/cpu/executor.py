"""CpuExecutor: the Executor protocol over a Runner driven by one worker thread.

Why a thread and not a process: every step is a few dozen large BLAS calls and NumPy releases
the GIL inside them, so the gRPC threads stay responsive while a step runs; a thread also shares
the weights and KV pool with no copies and no IPC per token. The Python parts of a step
(scheduling, sampling, stops) take a few milliseconds and hold the GIL only briefly.

The worker owns the Runner. Callers talk to it through an inbox (new requests, cancels) and an
outbox of deltas, both under one lock; deltas for the same request coalesce in the outbox when
polls are slower than steps, so a slow reader gets fewer, larger deltas instead of falling behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import replace
from pathlib import Path

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import (
    Capacity,
    ExecRequest,
    ExecutorStats,
    FinishReason,
    TokenDelta,
)
from server.executor.cpu.attention import PagedKvCache
from server.executor.cpu.blas import default_threads, set_thread_compute_threads
from server.executor.cpu.model import LlamaModel
from server.executor.cpu.runner import Runner, RunnerCounters, RunnerLimits
from server.executor.cpu.weights import load_weights
from server.executor.kv_cache import BlockManager

log = logging.getLogger(__name__)


class CpuExecutor:
    """The NumPy reference executor. Thread-safe; see server/executor/base.py for semantics."""

    def __init__(
        self, runner: Runner, capacity: Capacity, *, blas_threads: int | None = None
    ) -> None:
        self._runner = runner
        self._capacity = capacity
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the worker waits for requests
        self._ready = threading.Condition(self._lock)  # pollers wait for deltas
        self._inbox: list[ExecRequest] = []
        self._cancels: list[int] = []
        self._outbox: list[TokenDelta] = []
        # request id -> index in _outbox of its unfinished delta, which later deltas extend.
        # A finished delta is never extended: the id may be reused by a new request at once.
        self._open: dict[int, int] = {}
        self._live: set[int] = set()  # enqueued ids without a final delta yet
        # Requests taken from the inbox that the last stats snapshot does not show yet.
        self._handed_over = 0
        self._stopping = False
        self._step_lock = threading.Lock()  # held by the worker while it touches the runner
        self._blas_threads = default_threads() if blas_threads is None else blas_threads
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="cpu-executor", daemon=True)
        self._thread.start()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def open(cls, engine_dir: str | Path) -> CpuExecutor:
        path = Path(engine_dir)
        return cls.from_manifest(path, Manifest.load(path))

    @classmethod
    def from_manifest(cls, engine_dir: Path, manifest: Manifest) -> CpuExecutor:
        return cls(*build_runner(engine_dir, manifest))

    # -- the protocol ---------------------------------------------------------------------

    @property
    def capacity(self) -> Capacity:
        return self._capacity

    @property
    def tokenizer(self) -> EngineTokenizer:
        return self._runner.tokenizer

    @property
    def weight_bytes(self) -> int:
        return self._runner.model.weights.nbytes

    def enqueue(self, request: ExecRequest) -> None:
        self._validate(request)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the executor is shut down")
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id} is already live")
            self._live.add(request.request_id)
            self._inbox.append(request)
            self._work.notify()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._live:
                self._cancels.append(request_id)
                self._work.notify()

    def poll(self, timeout: float) -> list[TokenDelta]:
        with self._lock:
            if not self._outbox and timeout > 0:
                self._ready.wait_for(lambda: bool(self._outbox), timeout)
            deltas, self._outbox = self._outbox, []
            self._open.clear()
        return deltas

    def stats(self) -> ExecutorStats:
        with self._lock:
            stats = self._stats
            queued = stats.queued + len(self._inbox) + self._handed_over
            return replace(stats, queued=queued)

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def counters(self) -> RunnerCounters:
        """A copy of the runner's cumulative counters (preemptions, computed tokens...)."""
        with self._step_lock:
            return replace(self._runner.counters)

    def check_integrity(self) -> None:
        """Runner and KV-pool invariants (AssertionError); for tests, between steps."""
        with self._step_lock:
            self._runner.check_integrity()

    # -- the worker -----------------------------------------------------------------------

    def _validate(self, request: ExecRequest) -> None:
        cap = self._capacity
        if not request.prompt_token_ids:
            raise ValueError("empty prompt")
        context = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if context + 1 > cap.max_seq_len:
            raise ValueError(
                f"prompt of {context} tokens leaves no room to generate "
                f"(max_seq_len {cap.max_seq_len})"
            )
        if cap.blocks_for(context + 1) > cap.num_kv_blocks:
            raise ValueError(f"prompt of {context} tokens exceeds the KV-cache pool")
        for token in (*request.prompt_token_ids, *request.resume_token_ids):
            if not 0 <= token < cap.vocab_size:
                raise ValueError(f"token id {token} outside the vocabulary [0, {cap.vocab_size})")

    def _loop(self) -> None:
        set_thread_compute_threads(self._blas_threads)
        while True:
            with self._lock:
                self._work.wait_for(
                    lambda: self._stopping
                    or bool(self._inbox or self._cancels)
                    or self._runner.has_work
                )
                if self._stopping:
                    break
                requests, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                self._handed_over = len(requests)
            self._publish(self._run_step(requests, cancels))
        with self._step_lock:
            self._runner.cancel_all()
            deltas = self._runner.drain()
        unstarted = [
            TokenDelta(r.request_id, (), "", FinishReason.CANCELLED, cached_prompt_tokens=0)
            for r in self._inbox
        ]
        self._inbox = []
        self._publish(deltas + unstarted)

    def _run_step(self, requests: list[ExecRequest], cancels: list[int]) -> list[TokenDelta]:
        with self._step_lock:
            try:
                self._add(requests)
                for request_id in cancels:
                    self._runner.cancel(request_id)
                deltas = self._runner.step(self._between_layers)
                return deltas + self._apply_late_cancels()
            except Exception as exc:  # an engine bug must not hang every caller
                log.exception("cpu executor step failed")
                self._runner.cancel_all(FinishReason.ERROR, f"engine failure: {exc!r}")
                return self._runner.drain()

    def _apply_late_cancels(self) -> list[TokenDelta]:
        """Cancels that came during the step (preemptions whose slots an urgent prefill may
        already use) take effect at its end, so no step boundary sees extra slots used. A
        cancel of a request still in the inbox waits for the next round, which adds the
        inbox first: applied now it would find nothing and be lost, leaving a zombie."""
        runner = self._runner
        with self._lock:
            if not self._cancels:  # the usual case: nothing to look up
                return []
            late, self._cancels = self._cancels, []
            known = {s.request_id for s in runner.running} | {s.request_id for s in runner.waiting}
            self._cancels = [rid for rid in late if rid not in known]
        now = [rid for rid in late if rid in known]
        for request_id in now:
            runner.cancel(request_id)
        return runner.drain() if now else []

    def _add(self, requests: list[ExecRequest]) -> None:
        for request in requests:
            seed = request.sampling.seed
            self._runner.add(request, secrets.randbits(64) if seed is None else seed)

    def _between_layers(self) -> None:
        """Called by the worker between the layers of a step: requests that arrived since the
        step began, with higher priority than its lowest-priority work, get their prefill now,
        and their first tokens are published at once (cancels wait for the step to end)."""
        floor = self._runner.step_priority
        if floor is None or not self._inbox:  # a racy peek; the lock below decides
            return
        with self._lock:
            urgent = [r for r in self._inbox if r.priority > floor]
            if not urgent:
                return
            self._inbox = [r for r in self._inbox if r.priority <= floor]
            cancelled = set(self._cancels)
        self._add(urgent)
        leaving = sum(1 for seq in self._runner.running if seq.request_id in cancelled)
        self._publish(self._runner.urgent_prefill_step(leaving))

    def _publish(self, deltas: list[TokenDelta]) -> None:
        with self._lock:
            self._stats = self._snapshot()
            self._handed_over = 0
            for delta in deltas:
                rid = delta.request_id
                index = self._open.pop(rid, None)
                if index is None:
                    index = len(self._outbox)
                    self._outbox.append(delta)
                else:
                    self._outbox[index] = _merge(self._outbox[index], delta)
                if delta.finish is None:
                    self._open[rid] = index
                else:
                    self._live.discard(rid)
            if deltas:
                self._ready.notify_all()

    def _snapshot(self) -> ExecutorStats:
        r, kv = self._runner, self._runner.blocks
        c = r.counters
        return ExecutorStats(
            active=len(r.running),
            queued=len(r.waiting),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_cached=kv.num_cached_blocks,
            steps=c.steps,
            last_step_latency_s=c.last_step_latency_s,
            last_step_tokens=c.last_step_tokens,
            prompt_tokens=c.prompt_tokens,
            cached_prompt_tokens=c.cached_prompt_tokens,
            generated_tokens=c.generated_tokens,
            busy_seconds=c.busy_seconds,
            context_requests=sum(1 for seq in r.running if seq.prefilling),
            preemptions=c.preemptions,
        )


def build_runner(engine_dir: Path, manifest: Manifest) -> tuple[Runner, Capacity]:
    """Loads weights, tokenizer and KV pool for a cpu engine: the synchronous core that
    CpuExecutor drives from its thread (benchmarks drive it directly)."""
    arch, limits, quant = manifest.architecture, manifest.limits, manifest.quantization
    max_seq_len = min(limits.max_seq_len, arch.max_position_embeddings)
    weights = load_weights(manifest.weights_path(engine_dir), manifest)
    model = LlamaModel(weights, arch, max_seq_len)
    cache = PagedKvCache(
        arch.num_layers,
        limits.num_kv_blocks,
        limits.tokens_per_block,
        arch.num_kv_heads,
        arch.head_dim,
        quant.kv_cache_dtype,
    )
    blocks = BlockManager(limits.num_kv_blocks, limits.tokens_per_block)
    tokenizer = EngineTokenizer.load(engine_dir, manifest)
    runner_limits = RunnerLimits(limits.max_batch_size, limits.max_num_tokens, max_seq_len,
                                 background_prefill_tokens())
    capacity = Capacity(
        max_slots=limits.max_batch_size,
        num_kv_blocks=limits.num_kv_blocks,
        tokens_per_block=limits.tokens_per_block,
        max_tokens_per_step=limits.max_num_tokens,
        max_seq_len=max_seq_len,
        vocab_size=arch.vocab_size,
    )
    return Runner(model, cache, blocks, tokenizer, runner_limits), capacity


def background_prefill_tokens() -> int:
    """``BACKFILL_CPU_BACKGROUND_PREFILL_TOKENS`` (default 64): the lower-priority prefill
    tokens a step may carry while a higher-priority sequence decodes in it."""
    value = os.environ.get("BACKFILL_CPU_BACKGROUND_PREFILL_TOKENS", "64")
    try:
        tokens = int(value)
    except ValueError:
        tokens = -1
    if tokens < 1:
        raise ValueError(
            f"BACKFILL_CPU_BACKGROUND_PREFILL_TOKENS must be an integer >= 1, got {value!r}"
        )
    return tokens


def _merge(a: TokenDelta, b: TokenDelta) -> TokenDelta:
    """Two consecutive deltas of one request as one."""
    return TokenDelta(
        request_id=a.request_id,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        finish=b.finish,
        error=b.error,
        cached_prompt_tokens=a.cached_prompt_tokens
        if b.cached_prompt_tokens is None
        else b.cached_prompt_tokens,
        draft_tokens_proposed=a.draft_tokens_proposed + b.draft_tokens_proposed,
        draft_tokens_accepted=a.draft_tokens_accepted + b.draft_tokens_accepted,
    )


