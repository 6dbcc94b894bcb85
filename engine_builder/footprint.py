"""How much memory an engine needs: resident weights by dtype plus the KV-cache pool, plus
those of its draft engine when it has one.

Weights are counted from the safetensors header (the bytes that stay resident, quantized
weights included as they are), the KV cache from the manifest's limits: ``num_kv_blocks *
tokens_per_block`` tokens, each holding K and V for every layer and KV head (plus, for the cpu
int8 KV cache, a float32 scale per token and KV head).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine_builder.manifest import Manifest
from engine_builder.safetensors_io import read_header

# "auto" is TensorRT-LLM's: the activation dtype, float16 or bfloat16 on the GPU.
KV_DTYPE_BYTES = {"float32": 4, "int8": 1, "fp8": 1, "auto": 2}
_SAFETENSORS_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                            "I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64"}


@dataclass(frozen=True, slots=True)
class Footprint:
    weight_bytes_by_dtype: dict[str, int]  # e.g. {"float32": ..., "int8": ...}
    kv_cache_bytes: int  # the whole pool, at num_kv_blocks
    kv_bytes_per_token: int
    draft_bytes: int = 0  # the draft engine's weights and KV pool (speculative decoding)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weight_bytes_by_dtype.values())

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.draft_bytes

    def to_json(self) -> dict[str, object]:
        return {"weight_bytes_by_dtype": dict(self.weight_bytes_by_dtype),
                "weight_bytes": self.weight_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "draft_bytes": self.draft_bytes,
                "total_bytes": self.total_bytes}


def weight_bytes_by_dtype(manifest: Manifest, engine_dir: Path) -> dict[str, int]:
    if manifest.backend == "trtllm":
        # TensorRT-LLM engine files hold the weights; their size is the closest measure.
        files = (Path(engine_dir) / manifest.files["engine_dir"]).glob("*.engine")
        return {"engine": sum(f.stat().st_size for f in files)}
    if manifest.backend == "trtllm-llmapi":  # the checkpoint is served as it is
        files = manifest.checkpoint_path(engine_dir).glob("*.safetensors")
        return {"checkpoint": sum(f.stat().st_size for f in files)}
    counts: Counter[str] = Counter()
    for info in read_header(manifest.weights_path(engine_dir)).values():
        start, end = info["data_offsets"]
        counts[_SAFETENSORS_DTYPE_NAMES.get(info["dtype"], info["dtype"])] += end - start
    return dict(sorted(counts.items()))


def kv_bytes_per_token(manifest: Manifest) -> int:
    arch = manifest.architecture
    kv_dtype = manifest.quantization.kv_cache_dtype
    per_layer = arch.kv_size * KV_DTYPE_BYTES[kv_dtype]
    if manifest.backend == "cpu" and kv_dtype == "int8":
        per_layer += arch.num_kv_heads * 4  # one float32 scale per token and KV head
    return 2 * arch.num_layers * per_layer  # K and V


def footprint(manifest: Manifest, engine_dir: Path) -> Footprint:
    per_token = kv_bytes_per_token(manifest)
    limits = manifest.limits
    draft = 0
    if manifest.backend == "cpu" and manifest.draft is not None:
        draft_dir = Path(engine_dir) / manifest.draft.path
        draft = footprint(Manifest.load(draft_dir), draft_dir).total_bytes
    return Footprint(weight_bytes_by_dtype=weight_bytes_by_dtype(manifest, engine_dir),
                     kv_cache_bytes=limits.num_kv_blocks * limits.tokens_per_block * per_token,
                     kv_bytes_per_token=per_token, draft_bytes=draft)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
