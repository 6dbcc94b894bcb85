"""Opening a cpu engine directory: weights, tokenizer, KV pool and drafter, assembled into the
synchronous ``CpuEngine`` that ``CpuExecutor`` drives from its thread (benchmarks and tests
drive it directly)."""

from __future__ import annotations

from pathlib import Path

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import Capacity
from server.executor.cpu.batcher import Batcher, BatchLimits
from server.executor.cpu.engine import CpuEngine
from server.executor.cpu.gemma import load_model
from server.executor.cpu.model_runner import ModelRunner
from server.executor.cpu.speculation import SpeculationConfig, Speculator, open_drafter
from server.executor.cpu.weights import load_weights
from server.executor.kv import BlockManager, PagedKvCache


def build_engine(
    engine_dir: Path, manifest: Manifest, speculation: SpeculationConfig | None = None,
    *, activations: str | None = None,
) -> tuple[CpuEngine, Capacity]:
    """Loads weights, tokenizer, KV pool and drafter for a cpu engine: the synchronous core
    that CpuExecutor drives from its thread (benchmarks drive it directly). ``activations``:
    see activations.py (None: ``BACKFILL_CPU_ACTIVATIONS``)."""
    arch, limits, quant = manifest.architecture, manifest.limits, manifest.quantization
    max_seq_len = min(limits.max_seq_len, arch.max_position_embeddings)
    weights = load_weights(manifest.weights_path(engine_dir), manifest, activations)
    model = load_model(weights, arch, max_seq_len)
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
    batcher = Batcher(
        blocks, BatchLimits(limits.max_batch_size, limits.max_num_tokens, max_seq_len)
    )
    drafter, max_draft_len = open_drafter(
        speculation or SpeculationConfig(), engine_dir, manifest, max_seq_len
    )
    speculator = Speculator(drafter, max_draft_len)
    capacity = Capacity(
        max_slots=limits.max_batch_size,
        num_kv_blocks=limits.num_kv_blocks,
        tokens_per_block=limits.tokens_per_block,
        max_tokens_per_step=limits.max_num_tokens,
        max_seq_len=max_seq_len,
        vocab_size=arch.vocab_size,
        max_draft_len=speculator.max_draft_len,
        drafter=speculator.name,
    )
    engine = CpuEngine(ModelRunner(model, cache, blocks), batcher, tokenizer, speculator)
    return engine, capacity
