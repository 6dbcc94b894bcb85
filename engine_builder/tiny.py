"""A tiny random-weight Llama for tests: written as a Hugging Face checkpoint, then built
through the real Hugging Face build path, so tests exercise what users run.

Shapes: 2 layers, hidden 64, 4 query / 2 KV heads of 16, intermediate 128. The tokenizer is a
byte-level BPE: three specials (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2), the
256 byte tokens, and a few merges, including some that end in the middle of a UTF-8 character
(the first two bytes of 你 and of 😀), which is what streaming detokenization must survive.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engine_builder.build import BuildOptions, DraftBuild, build_engine
from engine_builder.hf_source import architecture_from_config, load_hf_checkpoint
from engine_builder.manifest import Architecture
from engine_builder.safetensors_io import write_safetensors
from engine_builder.source import expected_shapes
from engine_builder.tokenizer import byte_level_alphabet

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Merges as byte strings, in priority order; each side is already a token when it is merged.
_MERGES: tuple[tuple[bytes, bytes], ...] = (
    (b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"i", b"n"), (b" ", b"a"), (b"e", b"r"),
    (b"o", b"n"), (b" ", b"s"), (b"r", b"e"), (b"a", b"t"), (b"e", b"n"), (b" ", b"w"),
    (b"o", b"r"), (b"i", b"s"), (b" ", b"i"), (b" i", b"s"), (b" ", b"c"), (b"a", b"n"),
    (b" ", b"o"), (b" o", b"f"), (b"P", b"a"), (b"Pa", b"r"), (b"Par", b"is"), (b" ", b"F"),
    (b"r", b"an"), (b" F", b"ran"), (b"c", b"e"), (b" Fran", b"ce"), (b"u", b"s"),
    (b"us", b"er"), (b"\n", b"\n"), ("你".encode()[:1], "你".encode()[1:2]),
    ("😀".encode()[:1], "😀".encode()[1:2]),
)
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
    "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None,
}


def tiny_tokenizer_json() -> dict[str, Any]:
    alphabet = byte_level_alphabet()

    def chars(data: bytes) -> str:
        return "".join(alphabet[b] for b in data)

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[alphabet[b]] = len(vocab)
    merges = []
    for left, right in _MERGES:
        merges.append([chars(left), chars(right)])
        vocab[chars(left + right)] = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tiny_weights(arch: Architecture, seed: int) -> dict[str, np.ndarray]:
    """Random weights scaled by 1/sqrt(fan_in), so activations and logits stay O(1)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(arch).items():
        if name.endswith("norm.weight"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith(".bias"):
            tensors[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            scale = 1.0 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5
            tensors[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return tensors


def write_tiny_checkpoint(model_dir: Path, *, seed: int = 0, tie_word_embeddings: bool = False,
                          attention_bias: bool = False, dtype: str = "F32") -> Path:
    """Writes config.json, model.safetensors (F32 or BF16), tokenizer files into model_dir."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer_json()
    config = {**TINY_CONFIG, "vocab_size": len(tok["model"]["vocab"]),
              "tie_word_embeddings": tie_word_embeddings, "attention_bias": attention_bias}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML_TEMPLATE, "add_bos_token": False,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    arch = architecture_from_config(config, model_dir / "config.json")
    write_safetensors(model_dir / "model.safetensors", tiny_weights(arch, seed), dtype=dtype)
    return model_dir


def build_tiny_engine(out_dir: Path, *, quant: str = "none", group_size: int = 32,
                      kv_cache_dtype: str = "float32", seed: int = 0,
                      tie_word_embeddings: bool = False, attention_bias: bool = False,
                      draft_seed: int | None = None, draft_quant: str = "none",
                      **limits: int) -> Path:
    """Builds the tiny engine into out_dir (replacing it) and returns out_dir.

    ``draft_seed``: also a draft engine, the tiny model with that seed's weights (the target's
    own seed: the same model, whose every greedy draft the target accepts). ``limits`` are
    BuildOptions limit fields (max_batch_size, max_seq_len, ...).
    """
    options = BuildOptions(quant=quant, group_size=group_size if quant == "int4" else None,
                           kv_cache_dtype=kv_cache_dtype, **limits)  # type: ignore[arg-type]
    def checkpoint_of(seed: int, directory: Path) -> Path:
        return write_tiny_checkpoint(directory, seed=seed, attention_bias=attention_bias,
                                     tie_word_embeddings=tie_word_embeddings)

    with tempfile.TemporaryDirectory(prefix="tiny-hf-") as tmp:
        checkpoint = checkpoint_of(seed, Path(tmp) / "tiny-llama")
        draft = None
        if draft_seed is not None:
            draft_checkpoint = checkpoint_of(draft_seed, Path(tmp) / "tiny-draft")
            draft = DraftBuild(load_hf_checkpoint(draft_checkpoint), quant=draft_quant)
        return build_engine(load_hf_checkpoint(checkpoint), options, Path(out_dir),
                            name="tiny-llama", replace=True, draft=draft)
