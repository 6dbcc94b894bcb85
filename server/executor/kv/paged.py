"""K/V values of the paged cache: one pool of fixed-size blocks per layer.

The pool holds, per layer, K and V as `[num_blocks, tokens_per_block, num_kv_heads, head_dim]`.
A token at position p of a sequence lives in block `block_table[p // tpb]`, offset `p % tpb`;
its flat slot is `block * tpb + offset`. Which block belongs to whom is the BlockManager's
business (``blocks.py``); this only stores values and hands pages to attention.

INT8 KV stores int8 values plus one float32 scale per (token, head) (symmetric, max-abs / 127).
"""

from __future__ import annotations

import numpy as np

KV_DTYPES = ("float32", "int8")


class PagedKvCache:
    """The block pool's values. Pages are gathered with one fancy index per layer per call,
    never copied token by token."""

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
        if dtype not in KV_DTYPES:
            raise ValueError(f"cpu kv_cache_dtype must be one of {KV_DTYPES}, got {dtype!r}")
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
            # in the middle of a step (scattered first-touch writes cost milliseconds per layer
            # against microseconds once resident). Like a GPU engine's pool, this one is made
            # resident up front.
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
