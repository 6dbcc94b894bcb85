"""The GGUF build path: Q/K un-permutation against a direct RoPE computation, and a synthetic
GGUF of the tiny model that must build to the same engine as its Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine_builder.build import BuildOptions, build_engine
from engine_builder.gguf_source import hf_name, load_gguf, permute_rotary, unpermute_rotary
from engine_builder.gguf_tokenizer import pre_tokenizer_for, tokenizer_json_from_gguf
from engine_builder.hf_source import SourceError, load_hf_checkpoint
from engine_builder.manifest import Manifest
from engine_builder.tiny import SPECIAL_TOKENS, write_tiny_checkpoint
from engine_builder.tokenizer import EngineTokenizer

pytestmark = pytest.mark.unit


def _angles(positions: np.ndarray, head_dim: int, base: float) -> np.ndarray:
    inv_freq = base ** (-np.arange(0, head_dim, 2) / head_dim)  # [head_dim / 2]
    return positions[:, None] * inv_freq[None, :]  # [T, head_dim / 2]


def rope_interleaved(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """GPT-J style: rotates pairs (x[2i], x[2i+1]). x [T, heads, head_dim]."""
    a = _angles(positions, x.shape[-1], base)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(a) - odd * np.sin(a)
    out[..., 1::2] = even * np.sin(a) + odd * np.cos(a)
    return out


def rope_half_split(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Hugging Face style: rotates pairs (x[i], x[i + head_dim/2])."""
    half = x.shape[-1] // 2
    a = _angles(positions, x.shape[-1], base)[:, None, :]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * np.cos(a) - second * np.sin(a),
                           first * np.sin(a) + second * np.cos(a)], axis=-1)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 16), (6, 2, 8)])
def test_unpermuted_weights_give_the_same_attention_scores(heads: int, kv_heads: int,
                                                           head_dim: int) -> None:
    rng = np.random.default_rng(heads * 100 + head_dim)
    hidden, tokens, base = 48, 7, 10000.0
    wq_gguf = rng.standard_normal((heads * head_dim, hidden))
    wk_gguf = rng.standard_normal((kv_heads * head_dim, hidden))
    x = rng.standard_normal((tokens, hidden))
    pos = np.arange(tokens, dtype=np.float64) + 3

    def scores(wq: np.ndarray, wk: np.ndarray, rope: object) -> np.ndarray:
        q = rope((x @ wq.T).reshape(tokens, heads, head_dim), pos, base)  # type: ignore[operator]
        k = rope((x @ wk.T).reshape(tokens, kv_heads, head_dim), pos, base)  # type: ignore[operator]
        k = np.repeat(k, heads // kv_heads, axis=1)  # grouped-query: share each KV head
        return np.einsum("thd,shd->hts", q, k)

    expected = scores(wq_gguf, wk_gguf, rope_interleaved)
    got = scores(unpermute_rotary(wq_gguf, heads), unpermute_rotary(wk_gguf, kv_heads),
                 rope_half_split)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    # And per vector: half-split RoPE of the un-permuted projection is the un-permuted
    # interleaved RoPE of the original one.
    q_g = rope_interleaved((x @ wq_gguf.T).reshape(tokens, heads, head_dim), pos, base)
    q_h = rope_half_split((x @ unpermute_rotary(wq_gguf, heads).T)
                          .reshape(tokens, heads, head_dim), pos, base)
    np.testing.assert_allclose(q_h.reshape(tokens, -1),
                               unpermute_rotary(q_g.reshape(tokens, -1).T, heads).T, atol=1e-9)


def test_permute_and_unpermute_are_inverse_and_not_identity() -> None:
    w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    assert not np.array_equal(unpermute_rotary(w, 6), w)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 6), 6), w)
    bias = np.arange(32.0)
    np.testing.assert_array_equal(permute_rotary(unpermute_rotary(bias, 2), 2), bias)
    # Within a head of 8: GGUF row 2i + j is HF row 4j + i.
    np.testing.assert_array_equal(unpermute_rotary(np.arange(8.0), 1), [0, 2, 4, 6, 1, 3, 5, 7])


def test_gguf_tensor_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_gguf_tokenizer_control_tokens_are_special_and_others_rejected() -> None:
    tokens = ["<|im_start|>", "a", "b", "ab", "<x>"]
    tok = tokenizer_json_from_gguf(tokens, [3, 1, 1, 1, 4], ["a b"], model="gpt2", pre="smollm")
    added = {t["content"]: t["special"] for t in tok["added_tokens"]}
    assert added == {"<|im_start|>": True, "<x>": False}
    assert tok["model"]["merges"] == [["a", "b"]]
    assert tok["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits",
                                                         "individual_digits": True}
    assert pre_tokenizer_for("gpt2")["type"] == "ByteLevel"
    with pytest.raises(ValueError, match="'bert'"):
        tokenizer_json_from_gguf(tokens, None, [], model="bert", pre=None)
    with pytest.raises(ValueError, match="add_space_prefix"):
        tokenizer_json_from_gguf(tokens, None, [], model="llama", pre=None, add_space_prefix=True)
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2'"):
        pre_tokenizer_for("qwen2")


def write_tiny_gguf(checkpoint: Path, path: Path, *, q8_tensor: str | None = None,
                    rope_scaling: tuple[str, float] | None = None,
                    rope_freqs: bool = False, block_types: dict[str, str] | None = None) -> Path:
    """The tiny HF checkpoint re-encoded the way llama.cpp's converter does it; tensors named
    in ``block_types`` (HF name -> GGML type) are quantized to that type."""
    import gguf

    config = json.loads((checkpoint / "config.json").read_text())
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    weights = load_file(str(checkpoint / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if rope_scaling is not None:
        w.add_string("llama.rope.scaling.type", rope_scaling[0])
        w.add_float32("llama.rope.scaling.factor", rope_scaling[1])
    w.add_vocab_size(config["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(json.loads((checkpoint / "tokenizer_config.json").read_text())
                        ["chat_template"])
    reverse = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
               "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, array in weights.items():
        if name in reverse:
            gname = reverse[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        if "q_proj" in name:
            array = permute_rotary(array, config["num_attention_heads"])
        elif "k_proj" in name:
            array = permute_rotary(array, config["num_key_value_heads"])
        types = dict(block_types or {}, **({q8_tensor: "Q8_0"} if q8_tensor else {}))
        if name in types:
            qtype = gguf.GGMLQuantizationType[types[name]]
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(array))
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(config["head_dim"] // 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_gguf_builds_the_same_engine_as_the_hf_checkpoint(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "hf", seed=3)
    q8 = "model.layers.1.mlp.up_proj.weight"
    gguf_path = write_tiny_gguf(checkpoint, tmp_path / "Tiny-Model.Q8_0.gguf", q8_tensor=q8)
    source = load_gguf(gguf_path)
    assert source.name == "tiny-model"
    hf_dir = build_engine(load_hf_checkpoint(checkpoint), BuildOptions(), tmp_path / "from-hf")
    gg_dir = build_engine(source, BuildOptions(), tmp_path / "from-gguf")
    hf_m, gg_m = Manifest.load(hf_dir), Manifest.load(gg_dir)
    assert gg_m.architecture == hf_m.architecture  # untied: output.weight was present
    assert gg_m.tokenizer.eos_token_ids == (2,) and gg_m.tokenizer.bos_token_id == 1
    hf_w, gg_w = load_file(str(hf_dir / "weights.safetensors")), load_file(
        str(gg_dir / "weights.safetensors"))
    assert hf_w.keys() == gg_w.keys()
    for name in hf_w:
        if name == q8:
            np.testing.assert_allclose(gg_w[name], hf_w[name],
                                       atol=np.abs(hf_w[name]).max() / 100)
        else:
            np.testing.assert_array_equal(gg_w[name], hf_w[name], err_msg=name)
    hf_tok, gg_tok = EngineTokenizer.load(hf_dir, hf_m), EngineTokenizer.load(gg_dir, gg_m)
    text = "<|im_start|>user\nWhat is the capital of France? 你好 😀<|im_end|>\n"
    assert gg_tok.encode(text) == hf_tok.encode(text)
    assert gg_tok.render_chat([{"role": "user", "content": "hi"}]) == hf_tok.render_chat(
        [{"role": "user", "content": "hi"}])


def test_non_gguf_file_is_a_source_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SourceError, match=r"bad\.gguf"):
        load_gguf(bad)


def test_gguf_linear_rope_scaling_is_kept_and_others_refused(tmp_path: Path) -> None:
    from engine_builder.manifest import RopeScaling

    checkpoint = write_tiny_checkpoint(tmp_path / "hf", seed=3)
    linear = load_gguf(write_tiny_gguf(checkpoint, tmp_path / "a.gguf",
                                       rope_scaling=("linear", 4.0)))
    assert linear.architecture.rope_scaling == RopeScaling("linear", 4.0)
    with pytest.raises(SourceError, match="RoPE scaling 'yarn' is not supported"):
        load_gguf(write_tiny_gguf(checkpoint, tmp_path / "b.gguf", rope_scaling=("yarn", 4.0)))
    with pytest.raises(SourceError, match=r"rope_freqs\) are not supported"):
        load_gguf(write_tiny_gguf(checkpoint, tmp_path / "c.gguf", rope_freqs=True))
