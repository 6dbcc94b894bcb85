"""Opening a ``trtllm`` engine directory: the plain executor, or draft-target with a draft.

The KV shares of target and draft are checked before either engine starts, and an engine that
opened is shut down and released again if the next step fails, so a failed start leaves the
GPU as it found it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import Executor
from server.executor.trtllm.bindings import (
    check_draft_target_engine,
    executor_config,
    load_bindings,
    open_engine,
    probe_kv_blocks,
)
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.executor import TrtllmExecutor
from server.executor.trtllm.spec import SpeculativeExecutor


def open_trtllm(engine_dir: str | Path, manifest: Manifest,
                config: TrtllmConfig | None = None) -> Executor:
    """DIR's engine behind the Executor protocol; draft-target when the manifest has a draft.
    RuntimeError without tensorrt_llm, ValueError for a configuration that cannot start."""
    cfg = config or TrtllmConfig.from_env()
    path = Path(engine_dir)
    b = load_bindings()
    tokenizer = EngineTokenizer.load(path, manifest)
    if manifest.draft is not None:
        return open_speculative(b, path, manifest, tokenizer, cfg)
    fraction = cfg.kv_fractions(with_draft=False).target
    engine = open_engine(b, path, manifest, engine_config(b, manifest, cfg, fraction))
    try:
        kv_blocks = probe_kv_blocks(b, engine, manifest.tokenizer.eos_token_ids[0])
    except BaseException:
        engine.shutdown()
        del engine
        raise
    return TrtllmExecutor(engine, b, tokenizer, manifest, cfg, kv_blocks=kv_blocks)


def open_speculative(b: Any, engine_dir: Path, manifest: Manifest, tokenizer: EngineTokenizer,
                     config: TrtllmConfig) -> SpeculativeExecutor:
    assert manifest.draft is not None
    fractions = config.kv_fractions(with_draft=True)
    built = check_draft_target_engine(engine_dir, manifest, manifest.draft.max_draft_len)
    draft_dir = engine_dir / manifest.draft.path
    draft_manifest = Manifest.load(draft_dir)
    assert fractions.draft is not None
    target = open_engine(b, engine_dir, manifest,
                         engine_config(b, manifest, config, fractions.target))
    try:
        draft = open_engine(b, draft_dir, draft_manifest,
                            engine_config(b, draft_manifest, config, fractions.draft))
    except BaseException:
        target.shutdown()
        del target
        raise
    try:
        kv_blocks = probe_kv_blocks(b, target, manifest.tokenizer.eos_token_ids[0])
    except BaseException:
        target.shutdown()
        draft.shutdown()
        del target, draft
        raise
    return SpeculativeExecutor(target, draft, b, tokenizer, manifest, config,
                               kv_blocks=kv_blocks, target_max_draft_len=built)


def engine_config(b: Any, manifest: Manifest, config: TrtllmConfig, kv_fraction: float) -> Any:
    return executor_config(
        b, manifest, capacity_policy=config.capacity_policy,
        enable_chunked_context=config.enable_chunked_context, kv_fraction=kv_fraction,
        host_cache_bytes=config.host_cache_bytes, max_queue_size=config.max_queue_size,
        iter_stats_max_iterations=config.iter_stats_max_iterations)
