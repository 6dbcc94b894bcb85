"""Logprobs of the default engine against an independent reference: a textbook NumPy forward
written here, straight from the GGUF file (dequantized by the ``gguf`` package, rotary on
interleaved pairs as GGUF stores Q and K), not through the engine builder or the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_builder import fetch
from server.executor.base import ExecRequest, SamplingParams
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import collect

pytestmark = pytest.mark.model
gguf = pytest.importorskip("gguf", reason="the reference reads the GGUF file with gguf")
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _reference_logprobs(path: Path, tokens: list[int]) -> np.ndarray:
    """log-softmax of the logits at every position [n, vocab], float64."""
    reader = gguf.GGUFReader(str(path))
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
         for t in reader.tensors}
    field = reader.fields
    def value(key: str) -> float:
        f = field[key]
        return float(f.parts[f.data[0]][0])
    layers = int(value("llama.block_count"))
    heads, kv_heads = int(value("llama.attention.head_count")), int(
        value("llama.attention.head_count_kv"))
    eps, theta = value("llama.attention.layer_norm_rms_epsilon"), value("llama.rope.freq_base")
    x = w["token_embd.weight"][tokens]
    n, hidden = x.shape
    d = hidden // heads
    ang = np.arange(n)[:, None] / theta ** (np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(t: np.ndarray) -> np.ndarray:  # [n, h, d], pairs (t[2i], t[2i+1])
        a, b = t[..., 0::2], t[..., 1::2]
        out = np.empty_like(t)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def norm(t: np.ndarray, g: np.ndarray) -> np.ndarray:
        return t / np.sqrt((t**2).mean(-1, keepdims=True) + eps) * g

    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(layers):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(n, heads, d))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(n, kv_heads, d))
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, kv_heads, d)
        k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", pr, v).reshape(n, hidden) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    logits = norm(x, w["output_norm.weight"]) @ head.T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_logprobs_match_a_gguf_reference_to_1e3(default_engine: Path) -> None:
    ex = CpuExecutor.open(default_engine)
    try:
        prompt = tuple(ex.tokenizer.encode(PROMPT))
        request = ExecRequest(1, prompt, SamplingParams(max_tokens=6, logprobs=5,
                                                        prompt_logprobs=5))
        out = collect(ex, [request])[1]
    finally:
        ex.shutdown()
    ref = _reference_logprobs(fetch.fetch_default(), [*prompt, *out.token_ids])
    assert out.logprobs is not None and out.prompt_logprobs is not None
    scored = [*out.prompt_logprobs, *out.logprobs]  # position p predicts token p + 1
    assert len(scored) == len(prompt) - 1 + len(out.token_ids)
    for p, lp in enumerate(scored):
        assert lp.logprob == pytest.approx(ref[p, lp.token_id], abs=1e-3)
        top_ids = [t for t, _ in lp.top]
        np.testing.assert_allclose([v for _, v in lp.top], ref[p, top_ids], atol=1e-3)
        assert sorted(ref[p, top_ids]) == pytest.approx(sorted(ref[p])[-5:], abs=1e-3)
