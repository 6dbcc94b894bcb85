"""Attention over the paged KV cache: causal prefill chunks one sequence at a time, and all
single-token decodes of a step in one vectorized pass (block tables padded to the longest).

With a sliding ``window`` (Gemma 3's local layers) a query at position p attends only to keys
at positions p - window < k <= p: older keys are masked, and blocks that hold only such keys
are not read at all. The cache keeps every position either way (the layer's global neighbours
need them, and the block tables are shared by all layers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.executor.cpu.compiled import compiled_for
from server.executor.kv.paged import PagedKvCache


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
    q: np.ndarray,
    cache: PagedKvCache,
    layer: int,
    seg: PrefillSegment,
    scale: float,
    window: int | None = None,
) -> np.ndarray:
    """q `[n, heads, head_dim]` -> `[n, heads * head_dim]`, causal over the cached context."""
    n, num_heads, head_dim = q.shape
    context = seg.start + n
    skip = 0 if window is None else max(seg.start - window + 1, 0) // cache.tokens_per_block
    offset = skip * cache.tokens_per_block  # the position of the first key read
    k, v = cache.gather(layer, seg.blocks[skip:])
    k, v = k[: context - offset], v[: context - offset]  # [keys, kv_heads, head_dim]
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    # Query head h reads KV head h // group; fold the group into the query axis.
    qh = q.reshape(n, kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [kvh, g, n, d]
    scores = (qh * scale) @ k.transpose(1, 2, 0)[:, None]  # [kvh, g, n, keys]
    query_pos = seg.start + np.arange(n)[:, None]  # [n, 1]
    key_pos = offset + np.arange(context - offset)[None, :]  # [1, keys]
    masked = key_pos > query_pos  # [n, keys]
    if window is not None:
        masked |= key_pos <= query_pos - window
    scores += np.where(masked, -np.inf, 0.0).astype(np.float32)
    out = softmax_(scores) @ v.transpose(1, 0, 2)[:, None]  # [kvh, g, n, d]
    return out.transpose(2, 0, 1, 3).reshape(n, num_heads * head_dim)


def decode_attention(
    q: np.ndarray,
    cache: PagedKvCache,
    layer: int,
    group: DecodeGroup,
    scale: float,
    window: int | None = None,
) -> np.ndarray:
    """q `[B, heads, head_dim]` (one token per sequence) -> `[B, heads * head_dim]`."""
    kernels = None if cache.quantized else compiled_for(q, cache.k)
    if kernels is None:
        return decode_attention_numpy(q, cache, layer, group, scale, window)
    b, num_heads, head_dim = q.shape
    lens = group.context_lens.astype(np.int64)
    first = np.zeros_like(lens) if window is None else np.maximum(lens - window, 0)
    out = np.empty((b, num_heads * head_dim), np.float32)
    kernels.decode_attention(np.ascontiguousarray(q), cache.k[layer], cache.v[layer],
                             group.blocks, lens, first, np.float32(scale), out)
    return out


def decode_attention_numpy(
    q: np.ndarray,
    cache: PagedKvCache,
    layer: int,
    group: DecodeGroup,
    scale: float,
    window: int | None = None,
) -> np.ndarray:
    """decode_attention's reference: the pages gathered, padded to the longest, one pass."""
    b, num_heads, head_dim = q.shape
    blocks, offset = group.blocks, 0
    first = None  # [B] the oldest position each query attends to
    if window is not None:
        first = np.maximum(group.context_lens - window, 0)
        skip = int(first.min()) // cache.tokens_per_block
        blocks, offset = blocks[:, skip:], skip * cache.tokens_per_block
    k, v = cache.gather(layer, blocks)  # [B, keys, kv_heads, head_dim]
    kv_heads = k.shape[2]
    qh = q.reshape(b, kv_heads, num_heads // kv_heads, head_dim)  # [B, kvh, g, d]
    scores = (qh * scale) @ k.transpose(0, 2, 3, 1)  # [B, kvh, g, keys]
    key_pos = offset + np.arange(k.shape[1])[None, :]  # [1, keys]
    masked = key_pos >= group.context_lens[:, None]  # [B, keys]: padding
    if first is not None:
        masked |= key_pos < first[:, None]
    scores += np.where(masked, -np.inf, 0.0).astype(np.float32)[:, None, None, :]
    out = softmax_(scores) @ v.transpose(0, 2, 1, 3)  # [B, kvh, g, d]
    return out.reshape(b, num_heads * head_dim)
