"""Gemma 3 on the cpu engine against a textbook forward written here from the GGUF file (not
through the builder or the engine): sliding-window layers with their own RoPE base, QK-norm,
pre- and post-norms, GeGLU, scaled embeddings, tied head. The engine runs the prompt in chunks
over a paged cache of 4-token blocks, so the window crosses chunk and block boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine_builder.build import BuildOptions, build_engine
from engine_builder.gguf_source import load_gguf
from engine_builder.manifest import Manifest
from engine_builder.tiny_gemma import TINY_GEMMA, write_tiny_gemma_gguf
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, SamplingParams
from server.executor.cpu import CpuExecutor
from server.executor.cpu.activations import ACTIVATIONS_ENV, integer_kernels
from server.executor.cpu.drive import collect

pytestmark = pytest.mark.unit
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-gemma")
    path = write_tiny_gemma_gguf(root / "tiny-gemma.gguf")
    options = BuildOptions(max_num_tokens=8, tokens_per_block=4, max_batch_size=4)
    return path, build_engine(load_gguf(path), options, root / "engine", name="tiny-gemma")


def _reference_logprobs(path: Path, tokens: list[int]) -> np.ndarray:
    """log-softmax of the logits at every position [n, vocab], float64."""
    reader = gguf.GGUFReader(str(path))
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
         for t in reader.tensors}
    c = TINY_GEMMA
    heads, kv_heads, d = int(c["heads"]), int(c["kv_heads"]), int(c["head_dim"])
    eps, window = float(c["eps"]), int(c["window"])
    n = len(tokens)
    pos = np.arange(n)

    def rope(t: np.ndarray, theta: float) -> np.ndarray:  # [n, h, d], (t[i], t[i + d/2])
        ang = pos[:, None] / theta ** (np.arange(0, d, 2) / d)[None, :]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = t[..., : d // 2], t[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def norm(t: np.ndarray, g: np.ndarray) -> np.ndarray:  # g: the multiplier 1 + w
        return t / np.sqrt((t**2).mean(-1, keepdims=True) + eps) * g

    def gelu(t: np.ndarray) -> np.ndarray:
        return 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3)))

    x = w["token_embd.weight"][tokens] * np.sqrt(int(c["hidden"]))
    for i in range(int(c["layers"])):
        p = f"blk.{i}."
        local = (i + 1) % int(c["global_every"]) != 0
        theta = float(c["local_rope_theta"] if local else c["rope_theta"])
        allowed = pos[None, :] <= pos[:, None]  # [query, key]
        if local:
            allowed &= pos[None, :] > pos[:, None] - window
        h = norm(x, w[p + "attn_norm.weight"])
        q = norm((h @ w[p + "attn_q.weight"].T).reshape(n, heads, d), w[p + "attn_q_norm.weight"])
        k = norm((h @ w[p + "attn_k.weight"].T).reshape(n, kv_heads, d),
                 w[p + "attn_k_norm.weight"])
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, kv_heads, d)
        q, k = rope(q, theta), rope(k, theta)
        k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.where(allowed, 0.0, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", pr, v).reshape(n, heads * d)
        x = x + norm(attn @ w[p + "attn_output.weight"].T, w[p + "post_attention_norm.weight"])
        h = norm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + norm((gelu(g) * u) @ w[p + "ffn_down.weight"].T, w[p + "post_ffw_norm.weight"])
    logits = norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_manifest_records_the_gemma3_architecture(tiny_gemma: tuple[Path, Path]) -> None:
    _, engine = tiny_gemma
    m = Manifest.load(engine)
    a = m.architecture
    assert (m.schema_version, a.family, a.sliding_window) == (3, "gemma3", 8)
    assert a.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (a.rope_theta, a.rope_local_theta, a.query_pre_attn_scalar) == (10000.0, 100.0, 16.0)
    assert a.tie_word_embeddings and m.tokenizer.add_bos and m.tokenizer.bos_token_id == 2
    data = json.loads((engine / "manifest.json").read_text())
    data["schema_version"] = 2  # an older schema cannot claim the gemma3 family
    (engine.parent / "old").mkdir(exist_ok=True)
    (engine.parent / "old" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema version >= 3"):
        Manifest.load(engine.parent / "old")


def test_sentencepiece_tokenizer_from_gguf(tiny_gemma: tuple[Path, Path]) -> None:
    _, engine = tiny_gemma
    tok = EngineTokenizer.load(engine, Manifest.load(engine))
    ids = tok.encode("the capital of France is Paris")
    assert ids[0] == 2  # BOS, as the file asks
    # No space before the first word (no "▁the"); "an" ranks before "ra", so "▁France" is
    # never reached, as a SentencePiece BPE model merges.
    assert [tok.id_to_token(i) for i in ids[1:]] == [
        "t", "he", "▁c", "a", "p", "i", "t", "a", "l", "▁of", "▁F", "r", "an", "c", "e", "▁is",
        "▁Paris"]
    two_spaces = tok.encode("a  b")
    assert [tok.id_to_token(i) for i in two_spaces[1:]] == ["a", "▁▁", "b"]
    accented = tok.encode("é\n")  # no piece: UTF-8 bytes; "\n" is a user-defined token
    assert [tok.id_to_token(i) for i in accented[1:]] == ["<0xC3>", "<0xA9>", "\n"]
    for text in ("the capital of France is Paris", "a  b", "é\n", "x? 1.5, 2"):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize(("quant", "activations", "tolerance"), [
    ("none", "float32", 1e-4),
    ("source", "float32", 1e-4),
    # activations quantized to 15 bits per block: within 3e-5 of each block's largest
    ("source", "int16", 1e-3),
])
def test_logprobs_match_a_textbook_gemma3_across_the_window(
        tiny_gemma: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        quant: str, activations: str, tolerance: float) -> None:
    path, engine = tiny_gemma
    if activations != "float32" and integer_kernels() is None:
        pytest.skip("integer kernels need numba and AVX-512 VNNI")
    monkeypatch.setenv(ACTIVATIONS_ENV, activations)
    if quant == "source":  # Q8_0 projections on the compiled kernels (or NumPy without numba)
        path = write_tiny_gemma_gguf(tmp_path / "q8.gguf", q8_0=True)
        options = BuildOptions(quant="source", max_num_tokens=8, tokens_per_block=4)
        engine = build_engine(load_gguf(path), options, tmp_path / "engine", name="q8")
    ex = CpuExecutor.open(engine)
    try:
        prompt = tuple(ex.tokenizer.encode("the capital of France is Paris, the capital"))
        assert len(prompt) > 2 * int(TINY_GEMMA["window"])
        request = ExecRequest(1, prompt, SamplingParams(max_tokens=12, ignore_eos=True,
                                                        logprobs=3, prompt_logprobs=3))
        out = collect(ex, [request])[1]
    finally:
        ex.shutdown()
    ref = _reference_logprobs(path, [*prompt, *out.token_ids])
    assert out.logprobs is not None and out.prompt_logprobs is not None
    scored = [*out.prompt_logprobs, *out.logprobs]  # position p predicts token p + 1
    assert len(scored) == len(prompt) - 1 + 12
    for p, lp in enumerate(scored):
        assert lp.logprob == pytest.approx(ref[p, lp.token_id], abs=tolerance)
        assert lp.token_id == [*prompt, *out.token_ids][p + 1]
    for p, lp in enumerate(out.logprobs):  # greedy: the reference's best token each time
        assert lp.token_id == int(np.argmax(ref[len(prompt) - 1 + p]))


def test_a_wrong_window_would_be_seen(tiny_gemma: tuple[Path, Path]) -> None:
    """The reference is sensitive to the window: without it the logprobs differ, so the test
    above checks the masking rather than passing whatever the engine does."""
    path, _ = tiny_gemma
    tokens = list(range(4, 4 + 3 * int(TINY_GEMMA["window"])))
    windowed = _reference_logprobs(path, tokens)
    saved = TINY_GEMMA["window"]
    TINY_GEMMA["window"] = 10**6
    try:
        unbounded = _reference_logprobs(path, tokens)
    finally:
        TINY_GEMMA["window"] = saved
    assert np.abs(windowed[-1] - unbounded[-1]).max() > 1e-3
