"""Run-time knobs of the TensorRT-LLM backends, in one frozen config read from the environment.

Both GPU backends take it: ``trtllm`` (the bindings executor over a built engine) and
``trtllm-llmapi`` (``tensorrt_llm.LLM`` on the PyTorch backend). A knob one backend has no use
for is ignored there; the table in docs/gpu.md says which is which.

GPU memory for KV caches: TensorRT-LLM gives each engine ``free_gpu_memory_fraction`` of the
memory that is free when that engine starts (after its weights). Two engines on one GPU (target
and draft) must split it, so the target's share depends on whether a draft engine follows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)

CAPACITY_POLICIES = ("guaranteed_no_evict", "max_utilization")
KV_FRACTION_ALONE = 0.90  # TensorRT-LLM's own default for one engine
KV_FRACTION_WITH_DRAFT = 0.50  # NVIDIA's draft-target example gives each engine half
DRAFT_KV_FRACTION = 0.50
# What two KV pools may take of the memory free before the target starts; the rest is left for
# the draft engine's weights and both engines' activations.
MAX_KV_SHARE = 0.90


@dataclass(frozen=True, slots=True)
class KvFractions:
    """``free_gpu_memory_fraction`` for the target engine and, when there is one, the draft."""

    target: float
    draft: float | None


@dataclass(frozen=True, slots=True)
class TrtllmConfig:
    """Validated at construction (ValueError naming the environment variable)."""

    # GUARANTEED_NO_EVICT reserves a request's whole KV need at admission: no engine-side
    # eviction fights our scheduler. MAX_UTILIZATION packs more but may pause requests.
    capacity_policy: str = "guaranteed_no_evict"
    # Chunked context lets long prompts share iterations with decodes (stable online TPOT).
    enable_chunked_context: bool = True
    kv_fraction: float | None = None  # the target's share; None: 0.90 alone, 0.50 with a draft
    draft_kv_fraction: float = DRAFT_KV_FRACTION  # the draft engine's share (trtllm only)
    host_cache_bytes: int | None = None  # KV offload to host memory; None = off
    max_queue_size: int | None = None  # None = unbounded (our scheduler bounds its queues)
    iter_stats_max_iterations: int = 1000
    await_timeout_s: float = 0.02  # response/stats thread wait; bounds shutdown latency

    def __post_init__(self) -> None:
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"BACKFILL_TRTLLM_CAPACITY_POLICY must be one of "
                             f"{CAPACITY_POLICIES}, got {self.capacity_policy!r}")
        if self.kv_fraction is not None and not 0.0 < self.kv_fraction < 1.0:
            raise ValueError(f"BACKFILL_TRTLLM_KV_FRACTION must be in (0, 1), "
                             f"got {self.kv_fraction}")
        if not 0.0 < self.draft_kv_fraction < 1.0:
            raise ValueError(f"BACKFILL_TRTLLM_DRAFT_KV_FRACTION must be in (0, 1), "
                             f"got {self.draft_kv_fraction}")
        if self.host_cache_bytes is not None and self.host_cache_bytes < 0:
            raise ValueError("BACKFILL_TRTLLM_HOST_CACHE_BYTES must be >= 0")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise ValueError("BACKFILL_TRTLLM_MAX_QUEUE_SIZE must be >= 1 or unset")
        if self.iter_stats_max_iterations < 1:
            raise ValueError("iter_stats_max_iterations must be >= 1")
        if self.await_timeout_s <= 0:
            raise ValueError("await_timeout_s must be > 0")

    def kv_fractions(self, *, with_draft: bool) -> KvFractions:
        """The shares to open the engines with; ValueError when target and draft cannot both
        fit (checked before any engine starts, so the message comes before a CUDA OOM)."""
        if not with_draft:
            return KvFractions(self.kv_fraction or KV_FRACTION_ALONE, None)
        target = self.kv_fraction or KV_FRACTION_WITH_DRAFT
        # The draft's fraction applies to what the target left free.
        share = target + self.draft_kv_fraction * (1.0 - target)
        if share > MAX_KV_SHARE:
            raise ValueError(
                f"BACKFILL_TRTLLM_KV_FRACTION={target} and BACKFILL_TRTLLM_DRAFT_KV_FRACTION="
                f"{self.draft_kv_fraction} give the two KV caches {share:.0%} of free GPU memory, "
                f"leaving too little for the draft engine's weights; with a draft engine keep "
                f"kv + draft * (1 - kv) <= {MAX_KV_SHARE} (defaults: {KV_FRACTION_WITH_DRAFT} "
                f"and {DRAFT_KV_FRACTION})")
        return KvFractions(target, self.draft_kv_fraction)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrtllmConfig:
        """``BACKFILL_TRTLLM_*``; the factory passes no config, so this is the serving path."""
        e = os.environ if env is None else env
        default = cls()
        return cls(
            capacity_policy=e.get("BACKFILL_TRTLLM_CAPACITY_POLICY", default.capacity_policy),
            enable_chunked_context=e.get("BACKFILL_TRTLLM_CHUNKED_CONTEXT", "1") != "0",
            kv_fraction=_number(e, "BACKFILL_TRTLLM_KV_FRACTION", float),
            draft_kv_fraction=_number(e, "BACKFILL_TRTLLM_DRAFT_KV_FRACTION", float)
            or default.draft_kv_fraction,
            host_cache_bytes=_number(e, "BACKFILL_TRTLLM_HOST_CACHE_BYTES", int),
            max_queue_size=_number(e, "BACKFILL_TRTLLM_MAX_QUEUE_SIZE", int),
        )


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], N]) -> N | None:
    text = env.get(name)
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: not a number: {text!r}") from None
