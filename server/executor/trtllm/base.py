"""What the GPU executors share: the lock, the outbox ``poll`` reads, stats, capacity, shutdown,
and step samples for the step-cost model (from the engine's iteration stats).

Subclasses (``TrtllmExecutor``, ``SpeculativeExecutor``, ``LlmApiExecutor``) own their engines
and request maps and fill in three hooks: ``_read_stats`` (drain the engine's iteration stats),
``_end_all`` (the final deltas of every live sequence, maps cleared) and ``_release_engines``
(stop threads, shut engines down, drop every reference so their GPU memory is freed now and not
at some later garbage collection). Calls into an engine after its ``shutdown`` raise in
TensorRT-LLM, so nothing here touches an engine once ``_closed`` is set.
"""

from __future__ import annotations

import threading

from engine_builder.manifest import Manifest
from engine_builder.step_cost import StepSample
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import Capacity, ExecutorStats, TokenDelta
from server.executor.trtllm.pump import Outbox
from server.executor.trtllm.request import TokenPolicy, token_policy
from server.executor.trtllm.stats import IterationSample, StatsAccumulator


class GpuExecutorBase:
    """The protocol's ``capacity`` / ``poll`` / ``stats`` / ``shutdown``. Thread-safe."""

    def __init__(self, manifest: Manifest, tokenizer: EngineTokenizer, *,
                 kv_blocks: int | None = None) -> None:
        self._manifest = manifest
        self._tokenizer = tokenizer
        self._policy: TokenPolicy = token_policy(manifest)
        self._stats = StatsAccumulator(kv_blocks or manifest.limits.num_kv_blocks)
        self._lock = threading.Lock()
        self._outbox = Outbox()
        self._closed = False

    @property
    def capacity(self) -> Capacity:
        limits = self._manifest.limits
        kv = self._stats.kv
        return Capacity(max_slots=limits.max_batch_size, num_kv_blocks=kv.total,
                        tokens_per_block=kv.tokens_per_block or limits.tokens_per_block,
                        max_tokens_per_step=limits.max_num_tokens,
                        max_seq_len=limits.max_seq_len,
                        vocab_size=self._manifest.architecture.vocab_size)

    def poll(self, timeout: float) -> list[TokenDelta]:
        return self._outbox.take(timeout)

    def stats(self) -> ExecutorStats:
        self._absorb_stats()
        return self._stats.snapshot()

    def take_step_samples(self) -> list[StepSample]:
        """The engine's iterations since the last call, as step samples (StepReporter)."""
        self._absorb_stats()
        return self._stats.take_step_samples()

    def shutdown(self) -> None:
        """Live sequences end with CANCELLED; engines stop and are released. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            finals = self._end_all()
        self._outbox.put(*finals)
        self._release_engines()

    # -- for subclasses -------------------------------------------------------------------

    def _check_new(self, request_id: int, live: object) -> None:
        """Call with the lock held: ValueError after shutdown or for a live duplicate id."""
        if self._closed:
            raise ValueError("the executor is shut down")
        if request_id in live:  # type: ignore[operator]
            raise ValueError(f"duplicate request id {request_id}")

    def _absorb_stats(self) -> None:
        with self._lock:
            if self._closed:
                return
            samples = self._read_stats()
        self._stats.absorb(samples)

    def _read_stats(self) -> list[IterationSample]:
        """The engine's iterations since the last call (called with the lock held)."""
        raise NotImplementedError

    def _end_all(self) -> list[TokenDelta]:
        raise NotImplementedError

    def _release_engines(self) -> None:
        raise NotImplementedError
