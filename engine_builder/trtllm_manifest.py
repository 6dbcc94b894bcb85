"""The manifest side of ``build --backend trtllm``: what the source checkpoint is, what the
TensorRT-LLM checkpoint says it became, and the engine directory's manifest + tokenizer files.

Same schema as the cpu backend (docs/engine-format.md): ``backend: "trtllm"``,
``files.engine_dir``, TensorRT-LLM ``QuantAlgo`` names, and ``draft`` when there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from engine_builder.hf_source import load_hf_checkpoint
from engine_builder.manifest import (
    DraftInfo,
    Limits,
    Manifest,
    Provenance,
    Quantization,
    TokenizerInfo,
)
from engine_builder.source import SourceModel

# Our --quant / --kv-cache-dtype -> TensorRT-LLM QuantAlgo names (tensorrt_llm/quantization/mode.py;
# convert_checkpoint.py's precision_to_config and args_to_quant_config).
WEIGHT_QUANT_ALGOS: dict[str, str | None] = {
    "none": None, "int8": "W8A16", "int4": "W4A16", "int4_awq": "W4A16_AWQ"}
KV_QUANT_ALGOS: dict[str, str | None] = {"auto": None, "int8": "INT8", "fp8": "FP8"}
ENGINE_SUBDIR = "engine"


class CheckpointMismatch(RuntimeError):
    """The converted checkpoint is not what was asked for (or is missing)."""


def read_source(model_dir: Path) -> SourceModel:
    """Architecture, tokenizer and checksum of an HF checkpoint; SourceError (a ValueError)
    before any build step runs when the builder cannot describe it."""
    return load_hf_checkpoint(model_dir)


def quantization(quant: str, group_size: int | None, kv_cache_dtype: str) -> Quantization:
    """The manifest section; FieldError (ValueError) when the schema does not allow it."""
    return Quantization(weights=quant, group_size=group_size, kv_cache_dtype=kv_cache_dtype,
                        quant_algo=WEIGHT_QUANT_ALGOS[quant],
                        kv_cache_quant_algo=KV_QUANT_ALGOS[kv_cache_dtype])


def check_checkpoint_quant(ckpt_dir: Path, expected: Quantization) -> None:
    """The converted checkpoint's config.json must name the QuantAlgos we record."""
    path = ckpt_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointMismatch(f"{path}: the convert step left no readable config "
                                 f"({exc})") from exc
    quant = config.get("quantization") or {}
    got = (quant.get("quant_algo"), quant.get("kv_cache_quant_algo"))
    want = (expected.quant_algo, expected.kv_cache_quant_algo)
    if got != want:
        raise CheckpointMismatch(f"{path}: quant_algo/kv_cache_quant_algo are {got}, "
                                 f"expected {want}")


def kv_blocks_estimate(limits_without_blocks: dict[str, int]) -> int:
    """Blocks for max_batch_size full-length sequences. The real pool is sized from free GPU
    memory when the executor starts; the adapter reports KvCacheStats.max_num_blocks then."""
    per_seq = -(-limits_without_blocks["max_seq_len"] // limits_without_blocks["tokens_per_block"])
    return limits_without_blocks["max_batch_size"] * per_seq


@dataclass(frozen=True, slots=True)
class EngineDirSpec:
    source: SourceModel
    engine_dir: Path  # DIR; the engine itself is DIR/engine
    quantization: Quantization
    limits: Limits
    tensorrt_llm_version: str
    draft: DraftInfo | None = None
    name: str | None = None


def write_engine_dir(spec: EngineDirSpec) -> Manifest:
    """DIR/tokenizer.json, DIR/chat_template.jinja (if any) and DIR/manifest.json."""
    directory = spec.engine_dir
    tok = spec.source.tokenizer
    (directory / "tokenizer.json").write_text(tok.tokenizer_json, encoding="utf-8")
    template_file = None
    if tok.chat_template is not None:
        template_file = "chat_template.jinja"
        (directory / template_file).write_text(tok.chat_template, encoding="utf-8")
    manifest = Manifest(
        name=spec.name or spec.source.name,
        backend="trtllm",
        architecture=spec.source.architecture,
        quantization=spec.quantization,
        limits=spec.limits,
        tokenizer=TokenizerInfo(file="tokenizer.json", bos_token_id=tok.bos_token_id,
                                eos_token_ids=tok.eos_token_ids, add_bos=tok.add_bos,
                                chat_template_file=template_file),
        files={"engine_dir": ENGINE_SUBDIR},
        provenance=Provenance(
            source=spec.source.source, source_sha256=spec.source.source_sha256,
            created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            tools={"backfill": _version("backfill"),
                   "tensorrt_llm": spec.tensorrt_llm_version}),
        draft=spec.draft,
    )
    manifest.save(directory)
    return manifest


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
