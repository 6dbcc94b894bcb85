"""Gemma 3's decoder layer, beside Llama's (server/executor/cpu/model.py).

What differs from Llama, as Hugging Face's ``Gemma3DecoderLayer`` computes it:

- queries and keys are RMS-normed per head (``q_norm``, ``k_norm``) before the rotation;
- the attention and MLP outputs are RMS-normed (``attn_out_norm``, ``mlp_out_norm``) before
  they join the residual stream;
- the MLP is GELU(tanh)-gated instead of SiLU-gated;
- the embedding is scaled by sqrt(hidden_size), and scores by ``query_pre_attn_scalar ** -0.5``;
- sliding-window layers attend to the last ``sliding_window`` positions only and rotate with
  a RoPE base of their own (``rope_local_theta``); the global layers use ``rope_theta`` and
  the architecture's ``rope_scaling``.

The LM head is the tied embedding, and no logit soft-capping applies (Gemma 3 has none).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.executor.cpu.model import (
    ForwardBatch,
    LlamaModel,
    apply_rope,
    rms_norm,
    rope_tables,
)
from server.executor.cpu.weights import LayerWeights, ModelWeights
from server.executor.kv.paged import PagedKvCache

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def gelu_tanh_mul(gate_up: np.ndarray) -> np.ndarray:
    """[n, 2 * inter] (gate then up) -> gelu_tanh(gate) * up [n, inter]."""
    inter = gate_up.shape[1] // 2
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    # 0.5 g (1 + tanh(c (g + 0.044715 g^3))), on one temporary
    out = gate * gate
    out *= np.float32(0.044715)
    out += 1.0
    out *= gate
    out *= _GELU_C
    np.tanh(out, out=out)
    out += 1.0
    out *= gate
    out *= np.float32(0.5)
    out *= up
    return out


def head_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [n, heads, head_dim] normed over head_dim -> [n, heads, head_dim]."""
    n, heads, d = x.shape
    return rms_norm(x.reshape(n * heads, d), weight, eps).reshape(n, heads, d)


class Gemma3Model(LlamaModel):
    def __init__(self, weights: ModelWeights, arch: Any, max_positions: int) -> None:
        super().__init__(weights, arch, max_positions)
        self.scale = float(arch.query_pre_attn_scalar) ** -0.5
        self.embed_scale = np.float32(np.sqrt(arch.hidden_size))
        self.local_cos, self.local_sin = rope_tables(
            max_positions, self.head_dim, arch.rope_local_theta
        )
        self.windows: tuple[int | None, ...] = tuple(
            arch.sliding_window if arch.is_sliding(i) else None for i in range(arch.num_layers)
        )

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.weights.embed.rows(token_ids) * self.embed_scale

    def layer(
        self,
        index: int,
        layer: LayerWeights,
        x: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        batch: ForwardBatch,
        cache: PagedKvCache,
    ) -> np.ndarray:
        assert layer.q_norm is not None and layer.k_norm is not None
        assert layer.attn_out_norm is not None and layer.mlp_out_norm is not None
        n, d, eps = x.shape[0], self.head_dim, self.eps
        h, kvh = self.num_heads, self.num_kv_heads
        window = self.windows[index]
        if window is not None:  # cos/sin are the global layers'; this one has its own base
            cos, sin = self.local_cos[batch.positions], self.local_sin[batch.positions]
        qkv = layer.qkv(rms_norm(x, layer.input_norm, eps))  # [n, (H + 2 KVH) * D]
        q = head_rms_norm(qkv[:, : h * d].reshape(n, h, d), layer.q_norm, eps)
        k = head_rms_norm(qkv[:, h * d : (h + kvh) * d].reshape(n, kvh, d), layer.k_norm, eps)
        qk = apply_rope(np.concatenate([q, k], axis=1), cos, sin)  # [n, H + KVH, D]
        v = qkv[:, (h + kvh) * d :].reshape(n, kvh, d)
        cache.write(index, batch.slots, qk[:, h:], v)
        attn = self._attention(index, qk[:, :h], batch, cache, window)  # [n, H * D]
        x = x + rms_norm(layer.o_proj(attn), layer.attn_out_norm, eps)
        gate_up = layer.gate_up(rms_norm(x, layer.mlp_norm, eps))  # [n, 2 * inter]
        x += rms_norm(layer.down(gelu_tanh_mul(gate_up)), layer.mlp_out_norm, eps)
        return x


def load_model(weights: ModelWeights, arch: Any, max_positions: int) -> LlamaModel:
    """The forward pass of the architecture's family over ``weights``."""
    if arch.family == "gemma3":
        return Gemma3Model(weights, arch, max_positions)
    return LlamaModel(weights, arch, max_positions)
