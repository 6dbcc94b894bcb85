"""Opening a built engine with ``tensorrt_llm.bindings.executor`` (TensorRT-LLM 1.2.1).

Every function takes the bindings module as ``b``: ``load_bindings`` is the one place that
imports ``tensorrt_llm``, so nothing else in the project needs it and tests pass a fake with the
same names.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest

INSTALL_HINT = (
    "install TensorRT-LLM 1.2.1 on a machine with an NVIDIA GPU: the simplest way is the release "
    "container nvcr.io/nvidia/tensorrt-llm/release:1.2.1 (docker/Dockerfile builds on it); with "
    "pip, the tensorrt-llm==1.2.1 package on PyPI is a stub that fetches the real wheel from "
    "NVIDIA's index, so run pip install --extra-index-url https://pypi.nvidia.com/ "
    "'backfill[trtllm]'. The cpu backend works without it")
# tensorrt_llm/models/modeling_utils.py SpeculativeDecodingMode (an IntFlag: NONE=1,
# DRAFT_TOKENS_EXTERNAL=2, MEDUSA=4, LOOKAHEAD_DECODING=8, ...) as trtllm-build writes it.
DRAFT_TOKENS_EXTERNAL = 2


def load_bindings() -> Any:
    """``tensorrt_llm.bindings.executor``, or a clear error where it is not installed."""
    try:
        from tensorrt_llm.bindings import executor as bindings  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(f"the trtllm backend needs tensorrt_llm: {INSTALL_HINT}") from exc
    return bindings


def engine_path(engine_dir: Path, manifest: Manifest) -> Path:
    return Path(engine_dir) / manifest.files["engine_dir"]


def executor_config(b: Any, manifest: Manifest, *, capacity_policy: str,
                    enable_chunked_context: bool, kv_fraction: float,
                    host_cache_bytes: int | None, max_queue_size: int | None,
                    iter_stats_max_iterations: int) -> Any:
    """In-flight batching with KV block reuse; every behaviour-changing default set explicitly."""
    policy = getattr(b.CapacitySchedulerPolicy, capacity_policy.upper())
    return b.ExecutorConfig(
        max_beam_width=1,
        scheduler_config=b.SchedulerConfig(
            capacity_scheduler_policy=policy,
            context_chunking_policy=b.ContextChunkingPolicy.FIRST_COME_FIRST_SERVED),
        kv_cache_config=b.KvCacheConfig(
            enable_block_reuse=True,
            free_gpu_memory_fraction=kv_fraction,
            host_cache_size=host_cache_bytes),
        enable_chunked_context=enable_chunked_context,
        iter_stats_max_iterations=iter_stats_max_iterations,
        batching_type=b.BatchingType.INFLIGHT,
        max_batch_size=manifest.limits.max_batch_size,
        max_num_tokens=manifest.limits.max_num_tokens,
        max_queue_size=max_queue_size,
    )


def open_engine(b: Any, engine_dir: Path, manifest: Manifest, config: Any) -> Any:
    """``b.Executor`` over DIR's engine; ``config`` from ``executor_config``."""
    return b.Executor(str(engine_path(engine_dir, manifest)), b.ModelType.DECODER_ONLY, config)


def check_draft_target_engine(engine_dir: Path, manifest: Manifest, max_draft_len: int) -> int:
    """The max_draft_len DIR's engine was built with; ValueError unless it verifies at least
    ``max_draft_len`` external draft tokens (caught at start-up, not on every request)."""
    path = engine_path(engine_dir, manifest) / "config.json"
    try:
        build = json.loads(path.read_text(encoding="utf-8"))["build_config"]
        mode, built = int(build.get("speculative_decoding_mode", 1)), int(build["max_draft_len"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read build_config ({exc})") from exc
    if not mode & DRAFT_TOKENS_EXTERNAL or built < max_draft_len:
        raise ValueError(f"{path}: the target engine was built with speculative_decoding_mode="
                         f"{mode} and max_draft_len={built}; draft-target needs "
                         f"--speculative_decoding_mode draft_tokens_external --max_draft_len "
                         f">= {max_draft_len} (rebuild with engine_builder build --draft)")
    return built


def probe_kv_blocks(b: Any, engine: Any, token_id: int, timeout_s: float = 120.0) -> int | None:
    """The engine's real KV pool size: the pool is sized from free GPU memory at start, so
    the manifest only has an estimate. Runs one 1-token request and reads KvCacheStats.
    Call before any response thread exists (it would take the response)."""
    request_id = engine.enqueue_request(b.Request([token_id], 1, streaming=False,
                                                  end_id=token_id, pad_id=token_id))
    engine.await_responses(request_id, datetime.timedelta(seconds=timeout_s))
    blocks = [it.kv_cache_stats.max_num_blocks for it in engine.get_latest_iteration_stats()
              if getattr(it, "kv_cache_stats", None) is not None]
    return int(blocks[-1]) if blocks else None
