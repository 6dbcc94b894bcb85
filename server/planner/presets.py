"""Accelerator, model and number-format presets for the planner's roofline, with sources.

Figures are the vendors' published ones: dense (no structured sparsity) tensor-core peaks,
HBM bandwidth and capacity in decimal units (1 GB = 1e9 bytes). They are what the silicon
can do; what an engine reaches is the roofline's efficiency factors (roofline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Accelerator:
    name: str
    memory_gb: float  # HBM capacity
    bandwidth_gb_s: float  # HBM bandwidth
    fp16_tflops: float  # dense FP16/BF16 tensor-core peak
    int8_tops: float  # dense INT8 tensor-core peak
    fp8_tflops: float | None  # dense FP8 peak; None: no FP8 tensor cores
    link_gb_s: float  # NVLink bandwidth per GPU, one direction (for tensor-parallel all-reduce)

    def __post_init__(self) -> None:
        for name in ("memory_gb", "bandwidth_gb_s", "fp16_tflops", "int8_tops", "link_gb_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{self.name}: {name} must be > 0")


ACCELERATORS = {
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): 80 GB HBM2e at 2,039 GB/s;
    # FP16/BF16 tensor 312 TFLOPS, INT8 tensor 624 TOPS (dense; twice that with sparsity);
    # no FP8; third-generation NVLink 600 GB/s per GPU (both directions together).
    "A100-80GB": Accelerator("A100-80GB", 80.0, 2039.0, 312.0, 624.0, None, 300.0),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): 80 GB HBM3 at 3.35 TB/s; FP16/BF16
    # tensor 1,979 TFLOPS and INT8/FP8 3,958 with sparsity, so 989 and 1,979 dense;
    # fourth-generation NVLink 900 GB/s per GPU (both directions together).
    "H100-SXM": Accelerator("H100-SXM", 80.0, 3350.0, 989.0, 1979.0, 1979.0, 450.0),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): 141 GB HBM3e at 4.8 TB/s; the same
    # Hopper compute as H100 SXM (FP16/BF16 989, INT8/FP8 1,979 dense); NVLink 900 GB/s.
    "H200": Accelerator("H200", 141.0, 4800.0, 989.0, 1979.0, 1979.0, 450.0),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A Llama-family decoder's shapes (a Hugging Face config.json's fields)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_seq_len: int
    head_dim: int = 128

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matrices (norms are negligible and left out)."""
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * d * self.num_heads * self.head_dim + 2 * d * kv  # q, o; k, v
        return attention + 3 * d * self.intermediate_size  # gate, up, down

    @property
    def body_params(self) -> int:
        return self.num_layers * self.layer_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """All weights: layers, the input embedding and the (untied) LM head."""
        return self.body_params + 2 * self.lm_head_params

    def kv_elements_per_token(self) -> int:
        """K and V values one token leaves in the cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


MODELS = {
    # meta-llama/Meta-Llama-3-8B config.json: hidden 4096, intermediate 14336, 32 layers,
    # 32 query heads and 8 KV heads (grouped-query attention) of 128, vocab 128256, 8K
    # context, untied embeddings. 8.03B parameters.
    "Llama-3-8B": ModelShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256, 8192),
    # meta-llama/Meta-Llama-3-70B config.json: hidden 8192, intermediate 28672, 80 layers,
    # 64 query heads and 8 KV heads of 128, vocab 128256, 8K context. 70.6B parameters.
    "Llama-3-70B": ModelShape("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256, 8192),
}


@dataclass(frozen=True, slots=True)
class WeightFormat:
    """How the decoder layers' matrices are stored and multiplied. Embeddings and the LM
    head stay in FP16 (TensorRT-LLM's weight-only modes leave them unquantized)."""

    name: str
    bytes_per_weight: float
    math: str  # "fp16" | "int8" | "fp8": which tensor-core peak the GEMMs run at


WEIGHT_FORMATS = {
    "fp16": WeightFormat("fp16", 2.0, "fp16"),
    # Weight-only INT8 (TensorRT-LLM W8A16): per-channel scales, dequantized into FP16 GEMMs.
    "int8": WeightFormat("int8", 1.0, "fp16"),
    # Weight-only INT4 with one FP16 scale per 128 weights (W4A16, AWQ/GPTQ group 128).
    "int4": WeightFormat("int4", 0.5 + 2.0 / 128, "fp16"),
    # INT8 weights and activations (SmoothQuant W8A8): INT8 GEMMs at the INT8 peak.
    "w8a8": WeightFormat("w8a8", 1.0, "int8"),
    # FP8 weights and activations (Hopper): FP8 GEMMs at the FP8 peak.
    "fp8": WeightFormat("fp8", 1.0, "fp8"),
}

KV_BYTES = {"fp16": 2.0, "int8": 1.0, "fp8": 1.0}  # bytes per cached K or V value


def accelerator(name: str) -> Accelerator:
    return _lookup(ACCELERATORS, name, "accelerator")


def model_shape(name: str) -> ModelShape:
    return _lookup(MODELS, name, "model")


def weight_format(name: str) -> WeightFormat:
    return _lookup(WEIGHT_FORMATS, name, "weight format")


def kv_bytes(name: str) -> float:
    return _lookup(KV_BYTES, name, "KV-cache format")


def _lookup(table: dict[str, T], name: str, what: str) -> T:
    for key, value in table.items():
        if key.lower() == name.lower():
            return value
    raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(table)}")
