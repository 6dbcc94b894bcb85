"""Llama-family forward pass over one packed batch (prefill chunks and decode tokens together).

Every layer runs one GEMM per (fused) weight over all tokens of the step; only attention is
split: per sequence for prefill chunks, one vectorized pass for all single-token decodes. The
LM head runs only on the rows that sample this step. Other families (server/executor/cpu/
gemma.py) subclass ``LlamaModel`` and change its layer; ``ForwardPass`` drives any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_builder.manifest import RopeScaling
from server.executor.cpu.attention import (
    DecodeGroup,
    PrefillSegment,
    decode_attention,
    prefill_attention,
)
from server.executor.cpu.compiled import compiled_for
from server.executor.cpu.weights import LayerWeights, ModelWeights
from server.executor.kv.paged import PagedKvCache


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """One step's packed tokens. Rows of prefill segments and the decode group partition
    [0, num_tokens); `sample_rows` are the rows whose next-token logits are wanted."""

    token_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slots: np.ndarray  # [num_tokens] flat KV slots (block * tpb + offset)
    prefills: tuple[PrefillSegment, ...]
    decode: DecodeGroup | None
    sample_rows: np.ndarray  # [num_samples]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [n, hidden] -> [n, hidden]."""
    kernels = compiled_for(x, weight)
    if kernels is None:
        return rms_norm_numpy(x, weight, eps)
    out = np.empty(x.shape, np.float32)
    kernels.rms_norm(x, weight, eps, out)
    return out


def rms_norm_numpy(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """rms_norm's reference."""
    var = np.einsum("ij,ij->i", x, x)[:, None] / x.shape[1]  # [n, 1] without an x*x temporary
    return x * (1.0 / np.sqrt(var + eps)).astype(np.float32) * weight


def rope_tables(
    max_positions: int, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin `[max_positions, head_dim // 2]` for the half-split rotary layout."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The rotary frequencies `[head_dim // 2]`, float64, after ``scaling`` (as Hugging Face's
    ``_compute_linear_scaling_rope_parameters`` / ``_compute_llama3_parameters``)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    assert low is not None and high is not None and context is not None  # RopeScaling checks
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, blended, scaled)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [n, heads, head_dim], cos/sin [n, head_dim // 2]: rotates (x[i], x[i + d/2]) pairs."""
    kernels = compiled_for(x, cos, sin)
    if kernels is None:
        return apply_rope_numpy(x, cos, sin)
    out = np.array(x, dtype=np.float32)  # a contiguous copy, rotated in place
    kernels.rope_(out, cos, sin)
    return out


def apply_rope_numpy(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """apply_rope's reference."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """[n, 2 * inter] (gate then up) -> silu(gate) * up [n, inter]."""
    kernels = compiled_for(gate_up)
    if kernels is None:
        return silu_mul_numpy(gate_up)
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    kernels.silu_mul(gate_up, out)
    return out


def silu_mul_numpy(gate_up: np.ndarray) -> np.ndarray:
    """silu_mul's reference."""
    inter = gate_up.shape[1] // 2
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    # silu(g) = g / (1 + exp(-g)), computed in place on one temporary.
    out = np.negative(gate)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out


class LlamaModel:
    """Weights plus the architecture constants the forward pass needs."""

    def __init__(self, weights: ModelWeights, arch: Any, max_positions: int) -> None:
        self.weights = weights
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.eps = arch.rms_norm_eps
        self.vocab_size = arch.vocab_size
        self.scale = 1.0 / float(np.sqrt(self.head_dim))
        self.cos, self.sin = rope_tables(
            max_positions, self.head_dim, arch.rope_theta, arch.rope_scaling
        )

    def forward(self, batch: ForwardBatch, cache: PagedKvCache) -> np.ndarray:
        """Writes this step's K/V into the cache; returns logits `[num_samples, vocab]`."""
        return self.lm_head(self.hidden(batch, cache))

    def hidden(self, batch: ForwardBatch, cache: PagedKvCache) -> np.ndarray:
        """Writes this step's K/V into the cache; returns the final normed hidden states of
        the sample rows `[num_samples, hidden]` (``lm_head`` turns them into logits)."""
        return ForwardPass(self, batch, cache).hidden()

    def lm_head(self, h: np.ndarray) -> np.ndarray:
        """[m, hidden] -> logits [m, vocab]."""
        return self.weights.lm_head(h)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """[n] -> the layers' input [n, hidden]."""
        return self.weights.embed.rows(token_ids)

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
        n, d = x.shape[0], self.head_dim
        qkv = layer.qkv(rms_norm(x, layer.input_norm, self.eps))  # [n, (H + 2 KVH) * D]
        if layer.qkv_bias is not None:
            qkv += layer.qkv_bias
        h, kvh = self.num_heads, self.num_kv_heads
        # One rotary pass over q and k heads together: [n, H + KVH, D].
        qk = apply_rope(qkv[:, : (h + kvh) * d].reshape(n, h + kvh, d), cos, sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d :].reshape(n, kvh, d)
        cache.write(index, batch.slots, k, v)
        attn = self._attention(index, q, batch, cache)  # [n, H * D]
        x = x + layer.o_proj(attn)
        gate_up = layer.gate_up(rms_norm(x, layer.mlp_norm, self.eps))  # [n, 2 * inter]
        x += layer.down(silu_mul(gate_up))
        return x

    def _attention(
        self,
        index: int,
        q: np.ndarray,
        batch: ForwardBatch,
        cache: PagedKvCache,
        window: int | None = None,
    ) -> np.ndarray:
        """q [n, H, D] -> [n, H * D]; ``window``: keys older than that many positions are not
        attended (sliding-window layers)."""
        out = np.empty((q.shape[0], self.num_heads * self.head_dim), np.float32)
        for seg in batch.prefills:
            rows = slice(seg.row, seg.row + seg.num_tokens)
            out[rows] = prefill_attention(q[rows], cache, index, seg, self.scale, window)
        if batch.decode is not None:
            dec = batch.decode.rows
            out[dec] = decode_attention(q[dec], cache, index, batch.decode, self.scale, window)
        return out


class ForwardPass:
    """One step's forward pass, a layer at a time, so that whoever drives it can look for
    work that should overtake the step between two layers (``advance``) and run that first:
    the pass keeps its state here, and other sequences' steps touch only their own K/V slots.
    """

    def __init__(self, model: LlamaModel, batch: ForwardBatch, cache: PagedKvCache) -> None:
        self._model = model
        self._batch = batch
        self._cache = cache
        self._x = model.embed(batch.token_ids)  # [num_tokens, hidden]
        self._cos, self._sin = model.cos[batch.positions], model.sin[batch.positions]
        self._next_layer = 0

    @property
    def done(self) -> bool:
        """Every layer ran; what is left is the final norm (``hidden``)."""
        return self._next_layer == len(self._model.weights.layers)

    def advance(self) -> None:
        """Runs the next layer."""
        i = self._next_layer
        layer = self._model.weights.layers[i]
        self._x = self._model.layer(
            i, layer, self._x, self._cos, self._sin, self._batch, self._cache
        )
        self._next_layer += 1

    def hidden(self) -> np.ndarray:
        """Runs the layers left; the final normed hidden states of the sample rows
        `[num_samples, hidden]`."""
        while not self.done:
            self.advance()
        model = self._model
        return rms_norm(self._x[self._batch.sample_rows], model.weights.norm, model.eps)
