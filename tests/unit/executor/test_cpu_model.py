"""The CPU forward pass against a plain reference: paged vs contiguous, chunked vs one-shot,
quantized linears vs their dequantized weights, quantized engines vs float32 logits."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine_builder.manifest import Manifest
from server.executor.cpu.attention import DecodeGroup, PrefillSegment
from server.executor.cpu.linears import Int4Linear, Int8Linear
from server.executor.cpu.model import ForwardBatch, LlamaModel
from server.executor.cpu.weights import load_weights
from server.executor.kv import PagedKvCache

pytestmark = pytest.mark.unit
TPB = 16


def _reference_logits(
    engine: Path, tokens: list[int], inv_freq: np.ndarray | None = None
) -> np.ndarray:
    """Textbook Llama over the whole sequence, contiguous, from the float32 weights file:
    logits at every position [n, vocab]. ``inv_freq``: rotary frequencies (default: the
    unscaled ones)."""
    m = Manifest.load(engine)
    a = m.architecture
    w = load_file(str(m.weights_path(engine)))
    n, d, h, kvh = len(tokens), a.head_dim, a.num_attention_heads, a.num_kv_heads

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        return x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + a.rms_norm_eps) * g

    inv = 1.0 / a.rope_theta ** (np.arange(0, d, 2) / d) if inv_freq is None else inv_freq
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(x: np.ndarray) -> np.ndarray:  # [n, heads, d], HF rotate_half
        rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = w["model.embed_tokens.weight"][tokens].astype(np.float64)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        hn = norm(x, w[p + "input_layernorm.weight"])
        q = rope((hn @ w[p + "self_attn.q_proj.weight"].T).reshape(n, h, d))
        k = rope((hn @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kvh, d))
        v = (hn @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kvh, d)
        k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", pr, v).reshape(n, h * d)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        hn = norm(x, w[p + "post_attention_layernorm.weight"])
        g, u = hn @ w[p + "mlp.gate_proj.weight"].T, hn @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T


def _open_model(engine: Path, num_blocks: int = 64) -> tuple[LlamaModel, PagedKvCache]:
    m = Manifest.load(engine)
    a = m.architecture
    model = LlamaModel(load_weights(m.weights_path(engine), m), a, 1024)
    cache = PagedKvCache(
        a.num_layers, num_blocks, TPB, a.num_kv_heads, a.head_dim, m.quantization.kv_cache_dtype
    )
    return model, cache


def _paged_logits(
    model: LlamaModel, cache: PagedKvCache, tokens: list[int], chunks: list[int], seed: int = 0
) -> np.ndarray:
    """Runs tokens through the paged model in chunks of the given sizes, over a scattered
    block table; returns logits at every position [n, vocab]."""
    n = len(tokens)
    assert sum(chunks) == n
    table = np.random.default_rng(seed).permutation(cache.k.shape[1])[: -(-n // TPB)]
    out, start = [], 0
    for size in chunks:
        pos = np.arange(start, start + size)
        blocks = table[: -(-(start + size) // TPB)]
        prefill = (PrefillSegment(0, size, start, blocks),) if size > 1 else ()
        single = DecodeGroup(np.array([0]), np.array([start + 1]), blocks[None])
        decode = single if size == 1 else None
        batch = ForwardBatch(
            token_ids=np.asarray(tokens[start : start + size]),
            positions=pos,
            slots=table[pos // TPB] * TPB + pos % TPB,
            prefills=prefill,
            decode=decode,
            sample_rows=np.arange(size),
        )
        out.append(model.forward(batch, cache))
        start += size
    return np.concatenate(out)


TOKENS = [int(t) for t in np.random.default_rng(7).integers(3, 290, size=45)]


@pytest.mark.parametrize("tie", [False, True])
def test_paged_forward_matches_contiguous_reference(
    tiny_engine_factory: Callable[..., Path], tie: bool
) -> None:
    engine = tiny_engine_factory(tie_word_embeddings=tie)
    model, cache = _open_model(engine)
    got = _paged_logits(model, cache, TOKENS, [len(TOKENS)])
    want = _reference_logits(engine, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_attention_bias_engine_matches_reference(tiny_engine_factory: Callable[..., Path]) -> None:
    engine = tiny_engine_factory(attention_bias=True)
    m = Manifest.load(engine)
    w = load_file(str(m.weights_path(engine)))
    assert "model.layers.0.self_attn.q_proj.bias" in w
    model, cache = _open_model(engine)
    got = _paged_logits(model, cache, TOKENS[:10], [10])
    # The reference ignores biases, so they must change the result: proof they are applied.
    assert not np.allclose(got, _reference_logits(engine, TOKENS[:10]), atol=1e-3)


def test_chunked_prefill_and_decode_match_one_shot(tiny_engine: Path) -> None:
    model, cache = _open_model(tiny_engine)
    one_shot = _paged_logits(model, cache, TOKENS, [len(TOKENS)])
    model, cache = _open_model(tiny_engine)
    chunked = _paged_logits(model, cache, TOKENS, [7, 9, 1, 16, 2, 1, 1, 8], seed=3)
    np.testing.assert_allclose(chunked, one_shot, rtol=1e-4, atol=1e-5)


def test_decode_group_handles_ragged_contexts(tiny_engine: Path) -> None:
    """Three sequences of different lengths decode together == each decoded alone."""
    model, cache = _open_model(tiny_engine)
    seqs = [TOKENS[:5], TOKENS[5:25], TOKENS[10:43]]
    alone = [_paged_logits(*_open_model(tiny_engine), s, [len(s) - 1, 1])[-1] for s in seqs]
    tables, starts = [], 0
    for s in seqs:  # prefill all but the last token of each into disjoint blocks
        nb = -(-len(s) // TPB)
        tables.append(np.arange(starts, starts + nb))
        starts += nb
        pos = np.arange(len(s) - 1)
        model.forward(
            ForwardBatch(
                np.asarray(s[:-1]), pos, tables[-1][pos // TPB] * TPB + pos % TPB,
                (PrefillSegment(0, len(s) - 1, 0, tables[-1]),), None, np.array([0]),
            ),
            cache,
        )
    width = max(len(t) for t in tables)
    padded = np.stack([np.pad(t, (0, width - len(t)), constant_values=t[0]) for t in tables])
    pos = np.array([len(s) - 1 for s in seqs])
    slots = np.array([t[p // TPB] * TPB + p % TPB for t, p in zip(tables, pos, strict=True)])
    batch = ForwardBatch(
        np.array([s[-1] for s in seqs]), pos, slots, (),
        DecodeGroup(np.arange(3), pos + 1, padded), np.arange(3),
    )
    together = model.forward(batch, cache)
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-4, atol=1e-5)


def test_int8_linear_equals_dequantized_matmul() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(300, 96), dtype=np.int8)
    s = rng.random(300).astype(np.float32) / 100
    lin = Int8Linear(q, s)
    lin._tile_rows = 64  # several tiles, one ragged
    w = q.astype(np.float64) * s[:, None]
    for n in (1, 5, 70):  # weight-on-the-left below 64 rows, the usual order above
        x = rng.standard_normal((n, 96)).astype(np.float32)
        np.testing.assert_allclose(lin(x), x @ w.T, rtol=1e-4, atol=1e-4)
    ids = np.array([0, 299, 17])
    np.testing.assert_allclose(lin.rows(ids), w[ids], rtol=1e-6)


def test_int4_linear_equals_dequantized_matmul() -> None:
    rng = np.random.default_rng(1)
    out, cols, g = 200, 128, 32
    q = rng.integers(-8, 8, size=(out, cols))  # the signed values
    u = (q + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)  # low nibble = even column
    s = (rng.random((out, cols // g)) / 10).astype(np.float32)
    lin = Int4Linear(packed, s, g)
    lin._tile_rows = 48
    w = q * np.repeat(s, g, axis=1).astype(np.float64)
    for n in (1, 3, 9, 70):  # the grouped decode path and the scaled-tile paths
        x = rng.standard_normal((n, cols)).astype(np.float32)
        np.testing.assert_allclose(lin(x), x @ w.T, rtol=1e-4, atol=1e-4)
    ids = np.array([5, 0, 199])
    np.testing.assert_allclose(lin.rows(ids), w[ids], rtol=1e-6)
    # Rearranged in memory but still 4 bits per weight, and the file layout reads back.
    assert lin.nbytes == packed.nbytes + s.nbytes
    np.testing.assert_array_equal(lin.qweight, packed)
    np.testing.assert_array_equal(lin.scales, s)


@pytest.mark.parametrize(
    ("kwargs", "max_rel_err"),
    [
        ({"quant": "int8"}, 0.03),
        ({"quant": "int4"}, 0.25),
        ({"kv_cache_dtype": "int8"}, 0.03),
        ({"quant": "int8", "kv_cache_dtype": "int8", "tie_word_embeddings": True}, 0.05),
    ],
)
def test_quantized_engines_stay_close_to_float32(
    tiny_engine_factory: Callable[..., Path], kwargs: dict[str, object], max_rel_err: float
) -> None:
    fp32 = tiny_engine_factory(tie_word_embeddings=kwargs.get("tie_word_embeddings", False))
    want = _reference_logits(fp32, TOKENS)
    engine = tiny_engine_factory(**kwargs)
    model, cache = _open_model(engine)
    got = _paged_logits(model, cache, TOKENS, [20, 1, 1, 23])
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < max_rel_err


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 64, 65])
def test_dense_linear_equals_matmul_at_every_row_count(rows: int, threads: int) -> None:
    """Each row-count path of the dense matmul (matrix-vector, row tiles of the weight with
    one BLAS thread, weight on the left, plain) computes x @ W.T, with a ragged last tile."""
    from server.executor.cpu.blas import set_thread_blas_threads, thread_blas_threads
    from server.executor.cpu.linears import DenseLinear

    previous = thread_blas_threads()
    set_thread_blas_threads(threads)

    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((1000, 1536), dtype=np.float32)  # tiles of 64 rows: ragged
    x = rng.standard_normal((rows, 1536), dtype=np.float32)
    try:
        got = DenseLinear(weight)(x)
    finally:
        set_thread_blas_threads(previous or 1)
    assert got.shape == (rows, 1000) and got.flags.c_contiguous
    np.testing.assert_allclose(got, x.astype(np.float64) @ weight.T, rtol=1e-4, atol=1e-4)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_kv_pool_is_resident_up_front() -> None:
    """The pool's pages are touched at construction: writing every block afterwards takes no
    new memory (no page faults inside steps)."""
    cache = PagedKvCache(4, 1024, TPB, 2, 64)  # 2 x 32 MiB
    before = _resident_bytes()
    cache.k.fill(1.0)
    cache.v.fill(1.0)
    assert _resident_bytes() - before < 0.1 * cache.nbytes


def test_rope_scaling_frequencies() -> None:
    """Llama 3.1's scaling: short wavelengths kept, long ones divided by the factor, a monotone
    blend between; linear divides every frequency."""
    from engine_builder.manifest import RopeScaling
    from server.executor.cpu.model import rope_inv_freq

    base = rope_inv_freq(128, 500000.0)
    llama3 = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    got = rope_inv_freq(128, 500000.0, llama3)
    wavelen = 2 * np.pi / base
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.sum() > 0 and long.sum() > 0 and (~short & ~long).sum() > 0
    np.testing.assert_array_equal(got[short], base[short])
    np.testing.assert_allclose(got[long], base[long] / 8.0)
    mid = ~short & ~long
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 8.0)
    assert np.all(np.diff(got) < 0)  # still one frequency per dimension pair, decreasing
    np.testing.assert_allclose(rope_inv_freq(128, 500000.0, RopeScaling("linear", 4.0)),
                               base / 4.0)


def test_rope_scaled_engine_matches_reference(tmp_path: Path) -> None:
    """A checkpoint with rope_scaling builds, keeps it in its manifest, and the paged forward
    uses the scaled frequencies (it matches the reference with them, not without)."""
    import json

    from engine_builder.build import BuildOptions, build_engine
    from engine_builder.hf_source import load_hf_checkpoint
    from engine_builder.manifest import RopeScaling
    from engine_builder.tiny import write_tiny_checkpoint
    from server.executor.cpu.model import rope_inv_freq

    checkpoint = write_tiny_checkpoint(tmp_path / "hf")
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (checkpoint / "config.json").write_text(json.dumps(config))
    engine = build_engine(load_hf_checkpoint(checkpoint), BuildOptions(), tmp_path / "engine")
    arch = Manifest.load(engine).architecture
    assert arch.rope_scaling == RopeScaling("llama3", 4.0, 1.0, 4.0, 32)
    model, cache = _open_model(engine)
    got = _paged_logits(model, cache, TOKENS, [len(TOKENS)])
    scaled = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    np.testing.assert_allclose(got, _reference_logits(engine, TOKENS, scaled),
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, _reference_logits(engine, TOKENS), atol=1e-3)
