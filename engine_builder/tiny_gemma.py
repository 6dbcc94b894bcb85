"""A tiny random-weight Gemma 3 for tests, written as a GGUF file the way llama.cpp's converter
writes Gemma 3 (norm weights as the multipliers ``1 + w``, Q/K in the half-split layout, a
SentencePiece vocabulary without merges), then built through the real GGUF build path.

Shapes: 3 layers (sliding, global, sliding), hidden 64, 4 query / 2 KV heads of 16,
intermediate 96, a sliding window of 8 positions. The vocabulary: Gemma's four specials, the 256
byte-fallback tokens, a "\\n" and a two-space user-defined token (Gemma stores those as real
spaces), and pieces made of letters and "▁", each listed after the two pieces it merges from.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from engine_builder.build import BuildOptions, build_engine
from engine_builder.gguf_source import load_gguf

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
_LETTERS = "abcdefghijklmnopqrstuvwxyzPFT0123456789.,?"
# Merged pieces in merge order; both halves of each are pieces already.
_MERGES = ("▁t", "he", "▁the", "in", "▁a", "er", "on", "▁s", "re", "at", "en", "or", "is",
           "▁is", "▁c", "an", "▁o", "▁of", "Pa", "ri", "ris", "Paris", "▁Paris", "▁F", "ra",
           "▁Fra", "nc", "▁Franc", "▁France")
TINY_GEMMA: dict[str, float | int] = dict(
    layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, window=8,
    global_every=2, rope_theta=10000.0, local_rope_theta=100.0, eps=1e-6, context=4096,
)


def tiny_gemma_vocab() -> tuple[list[str], list[int]]:
    """(tokens, GGUF token types) of the tiny SentencePiece vocabulary."""
    tokens, types = list(SPECIALS), [3] * len(SPECIALS)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += ["\n", "  "]
    types += [4, 4]
    pieces = ["▁", *_LETTERS]
    for piece in _MERGES:
        if piece not in pieces:
            pieces.append(piece)
    tokens += pieces
    types += [1] * len(pieces)
    return tokens, types


def _weights(seed: int) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 weight (GGUF lists shapes innermost first; numpy does not)."""
    c, rng = TINY_GEMMA, np.random.default_rng(seed)
    h, d, f = int(c["hidden"]), int(c["head_dim"]), int(c["intermediate"])
    q, kv = int(c["heads"]) * d, int(c["kv_heads"]) * d
    vocab = len(tiny_gemma_vocab()[0])

    def linear(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) * inp ** -0.5).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # the multiplier 1 + w, as the converter writes it
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": (0.1 * rng.standard_normal((vocab, h))).astype(np.float32),
         "output_norm.weight": norm(h)}
    for i in range(int(c["layers"])):
        p = f"blk.{i}."
        w |= {p + "attn_norm.weight": norm(h), p + "attn_q.weight": linear(q, h),
              p + "attn_k.weight": linear(kv, h), p + "attn_v.weight": linear(kv, h),
              p + "attn_q_norm.weight": norm(d), p + "attn_k_norm.weight": norm(d),
              p + "attn_output.weight": linear(h, q), p + "post_attention_norm.weight": norm(h),
              p + "ffn_norm.weight": norm(h), p + "ffn_gate.weight": linear(f, h),
              p + "ffn_up.weight": linear(f, h), p + "ffn_down.weight": linear(h, f),
              p + "post_ffw_norm.weight": norm(h)}
    return w


def write_tiny_gemma_gguf(path: Path, *, seed: int = 0, q8_0: bool = False) -> Path:
    """The tiny Gemma 3 as a GGUF file; ``q8_0``: projection weights as Q8_0 blocks."""
    import gguf

    c = TINY_GEMMA
    tokens, types = tiny_gemma_vocab()
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_block_count(int(c["layers"]))
    w.add_context_length(int(c["context"]))
    w.add_embedding_length(int(c["hidden"]))
    w.add_feed_forward_length(int(c["intermediate"]))
    w.add_head_count(int(c["heads"]))
    w.add_head_count_kv(int(c["kv_heads"]))
    w.add_key_length(int(c["head_dim"]))
    w.add_value_length(int(c["head_dim"]))
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_float32("gemma3.rope.freq_base_swa", float(c["local_rope_theta"]))
    w.add_uint32("gemma3.attention.sliding_window", int(c["window"]))
    w.add_uint32("gemma3.attention.sliding_window_pattern", int(c["global_every"]))
    w.add_layer_norm_rms_eps(float(c["eps"]))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, array in _weights(seed).items():
        if q8_0 and array.ndim == 2 and name != "token_embd.weight":
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_tiny_gemma_engine(out_dir: Path, *, quant: str = "none", seed: int = 0,
                            **limits: int) -> Path:
    """Builds the tiny Gemma 3 engine into out_dir (replacing it) and returns out_dir.

    ``quant`` "source" keeps Q8_0 blocks of the projections; ``limits`` are BuildOptions
    limit fields (max_num_tokens, tokens_per_block, ...).
    """
    options = BuildOptions(quant=quant, **limits)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="tiny-gemma-") as tmp:
        path = write_tiny_gemma_gguf(Path(tmp) / "tiny-gemma.gguf", seed=seed,
                                     q8_0=quant == "source")
        return build_engine(load_gguf(path), options, Path(out_dir), name="tiny-gemma",
                            replace=True)
