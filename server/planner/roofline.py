"""The step cost of a GPU deployment nobody has profiled yet: a roofline.

A step streams the decoder's weights once (and the LM head when anything samples), reads the
KV cache its tokens attend to and writes their new K/V; it multiplies every token through
every weight and attends. On a tensor-parallel replica each GPU does 1/tp of that, plus two
all-reduces per layer. The step takes the longer of its memory time and its compute time
(bytes over achieved bandwidth, FLOPs over achieved peak), plus the all-reduces and a fixed
per-step overhead::

    step = max(bytes / (BW * bandwidth_eff), flops / (peak * compute_eff))
           + 2 * layers * (allreduce_latency + activations / link) + step_overhead

The efficiency factors say what an engine reaches of the silicon; their defaults are chosen
so the model reproduces NVIDIA's published TensorRT-LLM throughput (docs/planner.md has the
comparison) and every one can be overridden. The KV pool is what memory is left after weights
and an activation reserve, which is what bounds the batch at long contexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine_builder.step_cost import StepShape
from server.executor.base import Capacity
from server.planner.presets import Accelerator, ModelShape, WeightFormat, kv_bytes
from server.planner.simulate import Engine

# Queries per attention tile in prefill: each tile of a prompt reads the K/V before it once.
PREFILL_QUERY_TILE = 128
ACTIVATION_BYTES = 2  # FP16 activations cross the tensor-parallel all-reduces


@dataclass(frozen=True, slots=True)
class Efficiency:
    """What an engine reaches of the roofline (each overridable on the command line)."""

    bandwidth: float = 0.75  # achieved / peak HBM bandwidth when memory-bound (MBU)
    compute: float = 0.55  # achieved / peak tensor-core FLOP/s when compute-bound (MFU)
    step_overhead_ms: float = 1.5  # per step: launches, scheduling, sampling
    allreduce_us: float = 8.0  # latency of one tensor-parallel all-reduce (two per layer)

    def __post_init__(self) -> None:
        for name in ("bandwidth", "compute"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} efficiency must be in (0, 1], got {value}")
        for name in ("step_overhead_ms", "allreduce_us"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True, slots=True)
class Deployment:
    """One replica: a model in a number format on ``tp`` accelerators, and its engine limits
    (TensorRT-LLM's defaults where it has them)."""

    accelerator: Accelerator
    model: ModelShape
    weights: WeightFormat
    kv_cache: str = "fp16"
    tp: int = 1
    efficiency: Efficiency = field(default_factory=Efficiency)
    max_batch_size: int = 256
    max_num_tokens: int = 8192  # tokens per step (prefill chunks + decodes)
    tokens_per_block: int = 32
    kv_memory_fraction: float = 0.90  # of what is left after weights and activations
    activation_gb: float = 2.0  # per GPU: activations and workspace
    reference_context: int = 1024  # the context at which 100% utilization is defined

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        kv_bytes(self.kv_cache)  # ValueError for an unknown format
        if self.weights.math == "fp8" and self.accelerator.fp8_tflops is None:
            raise ValueError(f"{self.accelerator.name} has no FP8 tensor cores")
        if self.kv_pool_bytes <= 0:
            raise ValueError(
                f"{self.model.name} in {self.weights.name} ({self.weight_bytes / 1e9:.0f} GB) "
                f"leaves no room for a KV cache on {self.tp} x {self.accelerator.name} "
                f"({self.tp * self.accelerator.memory_gb:.0f} GB); use a larger --tp"
            )
        if self.capacity().num_kv_blocks < -(-self.model.max_seq_len // self.tokens_per_block):
            raise ValueError(f"the KV pool cannot hold one {self.model.max_seq_len}-token "
                             "sequence; use a larger --tp")

    @property
    def weight_bytes(self) -> float:
        m = self.model
        return m.body_params * self.weights.bytes_per_weight + 2 * m.lm_head_params * 2.0

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_elements_per_token() * kv_bytes(self.kv_cache)

    @property
    def kv_pool_bytes(self) -> float:
        free = self.tp * (self.accelerator.memory_gb - self.activation_gb) * 1e9
        return self.kv_memory_fraction * (free - self.weight_bytes)

    @property
    def label(self) -> str:
        return (f"{self.model.name} {self.weights.name}, KV {self.kv_cache}, on "
                f"{self.tp} x {self.accelerator.name}")

    def capacity(self) -> Capacity:
        tokens = int(self.kv_pool_bytes // self.kv_bytes_per_token)
        return Capacity(
            max_slots=self.max_batch_size,
            num_kv_blocks=tokens // self.tokens_per_block,
            tokens_per_block=self.tokens_per_block,
            max_tokens_per_step=self.max_num_tokens,
            max_seq_len=self.model.max_seq_len,
            vocab_size=self.model.vocab_size,
        )

    def step_cost(self) -> RooflineStepCost:
        return RooflineStepCost(self)

    def max_batch_at(self, context: int) -> int:
        """Sequences of ``context`` tokens the KV pool holds at once (within the slots)."""
        cap = self.capacity()
        return max(0, min(cap.max_slots, cap.num_kv_blocks // cap.blocks_for(context)))

    def decode_tokens_per_s(self, batch: int, context: int) -> float:
        return batch / self.step_cost().predict(_decodes(batch, context))

    def decode_utilization(self, batch: int, context: int) -> tuple[float, float]:
        """(MBU, MFU) of a decode step: bytes/s over peak bandwidth, FLOP/s over peak."""
        cost = self.step_cost()
        shape = _decodes(batch, context)
        seconds = cost.predict(shape)
        moved, flops = cost.traffic(shape)
        peak = {"fp16": self.accelerator.fp16_tflops, "int8": self.accelerator.int8_tops,
                "fp8": self.accelerator.fp8_tflops}[self.weights.math] or 0.0
        return (moved / seconds / (self.accelerator.bandwidth_gb_s * 1e9),
                flops / seconds / (peak * 1e12))

    def peak_tokens_per_s(self, context: int | None = None) -> float:
        """The highest decode rate at ``context`` tokens (default: the reference context):
        at the largest batch the slots and the KV pool allow."""
        context = context or self.reference_context
        batch = max(1, self.max_batch_at(context))
        return max(self.decode_tokens_per_s(b, context) for b in {1, max(1, batch // 2), batch})

    def engine(self, *, follows_plans: bool = False) -> Engine:
        return Engine(label=self.label, capacity=self.capacity(), model=self.step_cost(),
                      peak_tokens_per_s=self.peak_tokens_per_s(), gpus=self.tp,
                      follows_plans=follows_plans)


class RooflineStepCost:
    """``predict`` is a handful of multiply-adds: cheap enough for the scheduler to call per
    candidate while it plans a step."""

    __slots__ = ("_attn_flops", "_comm_fixed", "_comm_token", "_head_bytes", "_head_flops",
                 "_inv_bw", "_inv_flops", "_kv_token", "_overhead", "_token_flops",
                 "_weight_bytes")

    def __init__(self, d: Deployment) -> None:
        m, tp, eff = d.model, d.tp, d.efficiency
        peak = {"fp16": d.accelerator.fp16_tflops, "int8": d.accelerator.int8_tops,
                "fp8": d.accelerator.fp8_tflops}[d.weights.math]
        assert peak is not None  # checked by Deployment
        self._weight_bytes = m.body_params * d.weights.bytes_per_weight / tp
        self._head_bytes = m.lm_head_params * 2.0 / tp
        self._kv_token = d.kv_bytes_per_token / tp
        self._token_flops = 2.0 * m.body_params / tp
        self._head_flops = 2.0 * m.lm_head_params / tp
        self._attn_flops = 4.0 * m.num_layers * m.num_heads * m.head_dim / tp  # per (q, k) pair
        self._inv_bw = 1.0 / (d.accelerator.bandwidth_gb_s * 1e9 * eff.bandwidth)
        self._inv_flops = 1.0 / (peak * 1e12 * eff.compute)
        allreduces = 2 * m.num_layers if tp > 1 else 0
        self._comm_fixed = allreduces * eff.allreduce_us * 1e-6
        ring = 2.0 * (tp - 1) / tp  # a ring all-reduce moves this share of the data per GPU
        self._comm_token = (allreduces * ring * m.hidden_size * ACTIVATION_BYTES
                            / (d.accelerator.link_gb_s * 1e9))
        self._overhead = eff.step_overhead_ms * 1e-3

    def traffic(self, shape: StepShape) -> tuple[float, float]:
        """(bytes moved, FLOPs) per GPU for one step."""
        tokens = shape.decode_rows + shape.prefill_tokens
        moved = (self._weight_bytes + (self._head_bytes if shape.samples else 0.0)
                 + self._kv_token * (shape.decode_context + tokens
                                     + shape.prefill_context / PREFILL_QUERY_TILE))
        flops = (self._token_flops * tokens + self._head_flops * shape.samples
                 + self._attn_flops * (shape.decode_context + shape.prefill_context))
        return moved, flops

    def predict(self, shape: StepShape) -> float:
        tokens = shape.decode_rows + shape.prefill_tokens
        if tokens == 0:
            return 0.0
        attended = shape.decode_context + shape.prefill_context
        moved = (self._weight_bytes + (self._head_bytes if shape.samples else 0.0)
                 + self._kv_token * (shape.decode_context + tokens
                                     + shape.prefill_context / PREFILL_QUERY_TILE))
        flops = (self._token_flops * tokens + self._head_flops * shape.samples
                 + self._attn_flops * attended)
        return (max(moved * self._inv_bw, flops * self._inv_flops) + self._comm_fixed
                + self._comm_token * tokens + self._overhead)


def _decodes(batch: int, context: int) -> StepShape:
    shape = StepShape()
    shape.add_decodes(context, batch)
    return shape
