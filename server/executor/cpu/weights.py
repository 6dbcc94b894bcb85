"""Engine weights in memory, loaded per manifest: each layer's linears (linears.py for dense and
INT8/INT4 weights, block_weights.py for a GGUF's own blocks) and norms."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from engine_builder.manifest import BLOCK_TYPES_KEY
from server.executor.cpu.activations import requested_activations, resolve_activations
from server.executor.cpu.block_weights import (
    KERNEL_MAX_ROWS,
    BlockLinear,
    StackedLinear,
    WidenedLinear,
    load_kernels,
    reencode_blocks,
    reencoded_type,
    widen_blocks,
)
from server.executor.cpu.linears import DenseLinear, Int4Linear, Int8Linear, Linear

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer. Norm weights are the multipliers they apply (Gemma's 1 + w)."""

    input_norm: np.ndarray  # [hidden], before attention
    qkv: Linear  # fused q/k/v: [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: np.ndarray | None  # [(heads + 2 * kv_heads) * head_dim]
    o_proj: Linear  # [hidden, heads * head_dim]
    mlp_norm: np.ndarray  # [hidden], before the MLP
    gate_up: Linear  # fused gate/up: [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]
    # gemma3 only: RMS norms of each query and key head, and of the attention and MLP outputs
    q_norm: np.ndarray | None = None  # [head_dim]
    k_norm: np.ndarray | None = None  # [head_dim]
    attn_out_norm: np.ndarray | None = None  # [hidden]
    mlp_out_norm: np.ndarray | None = None  # [hidden]

    @property
    def norms(self) -> tuple[np.ndarray, ...]:
        return tuple(n for n in (self.input_norm, self.mlp_norm, self.q_norm, self.k_norm,
                                 self.attn_out_norm, self.mlp_out_norm) if n is not None)


@dataclass(frozen=True, slots=True)
class ModelWeights:
    embed: Linear  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    norm: np.ndarray  # [hidden]
    lm_head: Linear  # the embedding itself when tied

    @property
    def nbytes(self) -> int:
        """Resident weight bytes (the tied head is counted once)."""
        linears = [self.embed]
        for layer in self.layers:
            linears += [layer.qkv, layer.o_proj, layer.gate_up, layer.down]
        if self.lm_head is not self.embed:
            linears.append(self.lm_head)
        norms = sum(n.nbytes for layer in self.layers for n in layer.norms)
        return sum(lin.nbytes for lin in linears) + norms + int(self.norm.nbytes)


class _Reader:
    """Builds Linear layers from one safetensors file according to the manifest's quantization."""

    def __init__(self, handle: Any, quant: str, group_size: int | None,
                 activations: str = "float32") -> None:
        self._f = handle
        self._activations = activations
        self._quant = quant
        self._group_size = group_size or 32
        self._keys = set(handle.keys())
        metadata = handle.metadata() or {}
        self.block_types: dict[str, str] = json.loads(metadata.get(BLOCK_TYPES_KEY, "{}"))

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._keys:
            raise ValueError(f"weights file lacks tensor {name!r}")
        return np.asarray(self._f.get_tensor(name))

    def has(self, name: str) -> bool:
        return name in self._keys

    def linear(self, *names: str) -> Linear:
        """One Linear from the named weights stacked along the output axis (fusion)."""
        if self._quant == "none":
            return DenseLinear(_cat([self.tensor(f"{n}.weight") for n in names]))
        if self._quant == "source":
            return self._source_linear(names)
        q = _cat([self.tensor(f"{n}.qweight") for n in names])
        s = _cat([self.tensor(f"{n}.scales") for n in names])
        if self._quant == "int8":
            return Int8Linear(q, s)
        if self._quant == "int4":
            return Int4Linear(q, s, self._group_size)
        raise ValueError(f"unsupported weight quantization {self._quant!r} on the cpu backend")

    def _source_linear(self, names: tuple[str, ...]) -> Linear:
        """Blocks of types with compiled kernels stay blocks, and so do blocks that a kernel
        type holds exactly (re-encoded once, here, when the kernels are installed); float
        tensors, and blocks of the other types (widened to float32 once, here: decoding them
        at every product cost Gemma 3's Q4_K/Q6_K layers 30x the time of BLAS on the result),
        are dense. Parts of one fused linear that compute alike are concatenated, the rest
        stacked."""
        parts: list[tuple[str, list[np.ndarray]]] = []  # (kind, weights)
        for n in names:
            qtype = self.block_types.get(f"{n}.blocks", "F32")
            reencoded = reencoded_type(qtype) if load_kernels() is not None else None
            if qtype == "F32":
                kind, w = "F32", self.tensor(f"{n}.weight")
            elif BlockLinear.has_kernels(qtype):
                kind, w = qtype, self.tensor(f"{n}.blocks")
            elif reencoded is not None:
                kind, w = reencoded, reencode_blocks(self.tensor(f"{n}.blocks"), qtype)
            else:
                kind, w = "widened", widen_blocks(self.tensor(f"{n}.blocks"), qtype)
            if parts and parts[-1][0] == kind:
                parts[-1][1].append(w)
            else:
                parts.append((kind, [w]))
        linears: list[Linear] = [_source_part(kind, _cat(ws), self._activations)
                                  for kind, ws in parts]
        return linears[0] if len(linears) == 1 else StackedLinear(linears)

    def bias(self, *names: str) -> np.ndarray | None:
        if not all(self.has(f"{n}.bias") for n in names):
            return None
        return _cat([self.tensor(f"{n}.bias").astype(np.float32) for n in names])


def _source_part(kind: str, w: np.ndarray, activations: str) -> Linear:
    if kind == "F32":
        return DenseLinear(w)
    if kind == "widened":
        return WidenedLinear(w)
    return BlockLinear(kind, w, activations=activations)


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def load_weights(path: Path, manifest: Any, activations: str | None = None) -> ModelWeights:
    """Reads DIR/weights.safetensors per the manifest; fuses q/k/v and gate/up once at load.
    ``activations`` (activations.py) applies to source blocks; None: as
    ``BACKFILL_CPU_ACTIVATIONS`` says."""
    arch, quant = manifest.architecture, manifest.quantization
    mode = "float32"
    if quant.weights == "source":
        mode = resolve_activations(activations or requested_activations())
    with safe_open(str(path), framework="numpy") as handle:
        r = _Reader(handle, quant.weights, quant.group_size, mode)
        if quant.weights == "source":
            _announce_kernels(set(r.block_types.values()), mode)
        layers = tuple(_load_layer(r, i, arch) for i in range(arch.num_layers))
        embed = r.linear("model.embed_tokens")
        lm_head = embed if arch.tie_word_embeddings else r.linear("lm_head")
        norm = r.tensor("model.norm.weight").astype(np.float32)
    if embed.out_features != arch.vocab_size or embed.in_features != arch.hidden_size:
        raise ValueError(
            f"embedding is [{embed.out_features}, {embed.in_features}], manifest says "
            f"[{arch.vocab_size}, {arch.hidden_size}]"
        )
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def _announce_kernels(block_types: set[str], activations: str) -> None:
    """Says at start-up which path source blocks take: the compiled kernels (as they are, or
    re-encoded at load; float or integer), NumPy, or float32 (the other types, widened at
    load)."""
    kernels = load_kernels()
    if kernels is not None:
        log.info("source blocks: %s activations in products of up to %d rows", activations,
                 KERNEL_MAX_ROWS)
    reencoded = sorted(t for t in block_types if kernels is not None and reencoded_type(t))
    if reencoded:
        log.info("%s blocks are re-encoded at load as the kernels' %s (the same values)",
                 ", ".join(reencoded), ", ".join(str(reencoded_type(t)) for t in reencoded))
    widened = sorted(t for t in block_types
                     if not BlockLinear.has_kernels(t) and t not in reencoded)
    if widened:
        log.warning("no compiled kernels for %s blocks: those are widened to float32 at load "
                    "(4 bytes per weight)", ", ".join(widened))
    compiled = sorted(t for t in block_types if BlockLinear.has_kernels(t))
    if kernels is None and compiled:
        log.warning("numba is not installed: %s weights run on the NumPy reference path, "
                    "several times slower (pip install 'backfill[cpu]')", ", ".join(compiled))
    elif kernels is not None and not kernels.TBB:
        log.warning("numba's TBB threading layer is unavailable (pip install tbb): kernels run "
                    "on OpenMP threads, which stall when other processes keep the cores busy; "
                    "set BACKFILL_CPU_THREADS=1 on such a host")


def _load_layer(r: _Reader, i: int, arch: Any) -> LayerWeights:
    p = f"model.layers.{i}"
    attn = [f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v")]
    bias = r.bias(*attn) if arch.attention_bias else None
    if arch.attention_bias and bias is None:
        raise ValueError(f"manifest says attention_bias but layer {i} lacks q/k/v biases")

    def norm(name: str) -> np.ndarray:
        return r.tensor(f"{p}.{name}.weight").astype(np.float32)

    common: dict[str, Any] = dict(
        input_norm=norm("input_layernorm"),
        qkv=r.linear(*attn),
        qkv_bias=bias,
        o_proj=r.linear(f"{p}.self_attn.o_proj"),
        gate_up=r.linear(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
        down=r.linear(f"{p}.mlp.down_proj"),
    )
    if arch.family != "gemma3":
        return LayerWeights(mlp_norm=norm("post_attention_layernorm"), **common)
    return LayerWeights(
        mlp_norm=norm("pre_feedforward_layernorm"),
        q_norm=norm("self_attn.q_norm"),
        k_norm=norm("self_attn.k_norm"),
        attn_out_norm=norm("post_attention_layernorm"),
        mlp_out_norm=norm("post_feedforward_layernorm"),
        **common,
    )
