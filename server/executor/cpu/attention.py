"""Paged KV cache and attention over its pages.

The pool holds, per layer, K and V as `[num_blocks, tokens_per_block, num_kv_heads, head_dim]`.
A token at position p of a sequence lives in block `block_table[p // tpb]`, offset `p % tpb`;
its flat slot is `block * tpb + offset`. Pages are gathered with one fancy index per layer per
sequence (prefill) or per decode group, never copied token by token.

INT8 KV stores int8 values plus one float32 scale per (token, head) (symmetric, max-abs / 127).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PagedKvCache:
    """The block pool. Allocation lives in the BlockManager; this only stores values."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        tokens_per_block: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str = "float32",
        *,
        prefault: bool = True,
    ) -> None:
        if dtype not in ("float32", "int8"):
            raise ValueError(f"cpu kv_cache_dtype must be 'float32' or 'int8', got {dtype!r}")
        self.tokens_per_block = tokens_per_block
        self.quantized = dtype == "int8"
        shape = (num_layers, num_blocks, tokens_per_block, num_kv_heads, head_dim)
        store = np.int8 if self.quantized else np.float32
        self.k = np.zeros(shape, store)
        self.v = np.zeros(shape, store)
        if self.quantized:
            self.k_scale = np.zeros(shape[:-1], np.float32)  # [layers, blocks, tpb, kv_heads]
            self.v_scale = np.zeros(shape[:-1], np.float32)
        if prefault:
            # np.zeros maps pages lazily, so each block's first write would take page faults
            # in the middle of a step: scattered first-touch writes cost 1-2 ms per layer per
            # step on the development VM (0.015 ms once resident), a fifth of a step's time
            # until the whole pool had been used once. Like a GPU engine's pool, this one is
            # made resident up front.
            for array in self._arrays():
                array.fill(0)

    def _arrays(self) -> list[np.ndarray]:
        arrays = [self.k, self.v]
        if self.quantized:
            arrays += [self.k_scale, self.v_scale]
        return arrays

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self._arrays())

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Stores k, v `[num_tokens, kv_heads, head_dim]` at flat slots `[num_tokens]`."""
        kl, vl = _flat(self.k[layer]), _flat(self.v[layer])
        if not self.quantized:
            kl[slots] = k
            vl[slots] = v
            return
        kq, ks = _quantize(k)
        vq, vs = _quantize(v)
        kl[slots], vl[slots] = kq, vq
        _flat(self.k_scale[layer])[slots] = ks
        _flat(self.v_scale[layer])[slots] = vs

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write after a fork: dst gets src's K/V in every layer."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        if self.quantized:
            self.k_scale[:, dst] = self.k_scale[:, src]
            self.v_scale[:, dst] = self.v_scale[:, src]

    def gather(self, layer: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V for block ids of any shape `[*b]` -> float32 `[*b * tpb, kv_heads, head_dim]`,
        merging each row's blocks into one token axis."""
        k, v = self.k[layer][blocks], self.v[layer][blocks]  # [*b, tpb, kv_heads, head_dim]
        if self.quantized:
            k = k * self.k_scale[layer][blocks][..., None]
            v = v * self.v_scale[layer][blocks][..., None]
        lead = blocks.shape[:-1]
        return (
            k.reshape(*lead, -1, *k.shape[-2:]),
            v.reshape(*lead, -1, *v.shape[-2:]),
        )


def _flat(a: np.ndarray) -> np.ndarray:
    """[blocks, tpb, ...] -> [blocks * tpb, ...] as a view."""
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, heads, dim] float32 -> int8 values and [n, heads] scales."""
    scale = np.abs(x).max(axis=-1) / 127.0  # [n, heads]
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


@dataclass(frozen=True, slots=True)
class PrefillSegment:
    """Rows [row, row + num_tokens) of the packed batch: one sequence's chunk at positions
    [start, start + num_tokens); it attends causally over its first start + num_tokens tokens."""

    row: int
    num_tokens: int
    start: int
    blocks: np.ndarray  # [ceil((start + num_tokens) / tpb)] block ids


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Single-token sequences attended together; block tables padded to the longest."""

    rows: np.ndarray  # [B] rows of the packed batch
    context_lens: np.ndarray  # [B] tokens each query sees (its own included)
    blocks: np.ndarray  # [B, max_blocks] block ids, padding points at a valid block


def softmax_(scores: np.ndarray) -> np.ndarray:
    """In-place softmax over the last axis; -inf entries become 0."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def prefill_attention(
    q: np.ndarray, cache: PagedKvCache, layer: int, seg: PrefillSegment, scale: float
) -> np.ndarray:
    """q `[n, heads, head_dim]` -> `[n, heads * head_dim]`, causal over the cached context."""
    n, num_heads, head_dim = q.shape
    context = seg.start + n
    k, v = cache.gather(layer, seg.blocks)
    k, v = k[:context], v[:context]  # [context, kv_heads, head_dim]
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    # Query head h reads KV head h // group; fold the group into the query axis.
    qh = q.reshape(n, kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [kvh, g, n, d]
    scores = (qh * scale) @ k.transpose(1, 2, 0)[:, None]  # [kvh, g, n, context]
    query_pos = seg.start + np.arange(n)
    future = np.arange(context)[None, :] > query_pos[:, None]  # [n, context]
    scores += np.where(future, -np.inf, 0.0).astype(np.float32)
    out = softmax_(scores) @ v.transpose(1, 0, 2)[:, None]  # [kvh, g, n, d]
    return out.transpose(2, 0, 1, 3).reshape(n, num_heads * head_dim)


def decode_attention(
    q: np.ndarray, cache: PagedKvCache, layer: int, group: DecodeGroup, scale: float
) -> np.ndarray:
    """q `[B, heads, head_dim]` (one token per sequence) -> `[B, heads * head_dim]`."""
    b, num_heads, head_dim = q.shape
    k, v = cache.gather(layer, group.blocks)  # [B, max_len, kv_heads, head_dim]
    kv_heads = k.shape[2]
    qh = q.reshape(b, kv_heads, num_heads // kv_heads, head_dim)  # [B, kvh, g, d]
    scores = (qh * scale) @ k.transpose(0, 2, 3, 1)  # [B, kvh, g, max_len]
    pad = np.arange(k.shape[1])[None, :] >= group.context_lens[:, None]  # [B, max_len]
    scores += np.where(pad, -np.inf, 0.0).astype(np.float32)[:, None, None, :]
    out = softmax_(scores) @ v.transpose(0, 2, 1, 3)  # [B, kvh, g, d]
    return out.reshape(b, num_heads * head_dim)
