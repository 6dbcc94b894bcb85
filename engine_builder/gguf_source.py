"""Reading a GGUF file (llama or gemma3 architecture) into a ``SourceModel``.

Tensors are dequantized to float32 with ``gguf.quants.dequantize`` and renamed to Hugging Face
names of the family; ``SourceModel.blocks`` yields the quantized ones as their raw blocks
instead. For llama, GGUF stores Q and K projections with each head's rows permuted for
interleaved rotary pairs (llama.cpp's converter applies ``permute``); ``unpermute_rotary`` undoes
that once here, so the executor has a single, half-split RoPE. Gemma 3 files keep the half-split
layout (llama.cpp runs them with NeoX-style RoPE), and their norm weights already hold Gemma's
``1 + weight``, the multiplier every cpu engine stores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from engine_builder.gguf_tokenizer import tokenizer_json_from_gguf
from engine_builder.hf_source import SourceError
from engine_builder.manifest import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    Architecture,
    RopeScaling,
)
from engine_builder.source import SourceBlocks, SourceModel, SourceTokenizer

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3's block: a norm after attention and one around the MLP, and query/key norms. Its
# pre-MLP norm is Hugging Face's pre_feedforward_layernorm (post_attention_layernorm is the
# norm after attention), where Llama's pre-MLP norm is its post_attention_layernorm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# llama.cpp's values for Gemma 3 where the file has no key: every sixth layer attends globally,
# the sliding layers rotate with base 10,000.
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
# GGML types that are plain floats: a "source" engine stores them widened to float32.
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def permute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face half-split rows -> GGUF interleaved rows (llama.cpp's ``permute``)."""
    shape = w.shape
    return w.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2) \
        .reshape(shape)


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """GGUF interleaved rows -> Hugging Face half-split rows; works for weights and biases.

    Within a head of size d, GGUF row 2i + j (pair i, member j) is Hugging Face row
    j * d/2 + i.
    """
    shape = w.shape
    return w.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2) \
        .reshape(shape)


def hf_name(gguf_name: str, family: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors the engine does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    layer_names = _GEMMA3_LAYER_NAMES if family == "gemma3" else _LAYER_NAMES
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{int(parts[1])}.{layer_names[parts[2]]}"
    return None


class GgufMetadata:
    """Typed access to GGUF key/values, independent of the gguf package's version."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        from gguf import GGUFValueType

        field = self._fields.get(key)
        if field is None:
            return default
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return np.concatenate([field.parts[i] for i in field.data]).tolist()
        if kind == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]].tolist()[0]

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise SourceError(f"{self._path}: GGUF metadata {key} is missing")
        return value


def _shortest_float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.9999997e-06)."""
    return float(f"{np.float32(value):.7g}")


def gguf_architecture(meta: GgufMetadata, path: Path, has_output: bool) -> Architecture:
    arch = meta.require("general.architecture")
    if arch not in ("llama", "gemma3"):
        raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                          "llama, gemma3)")
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.require(f"{arch}.attention.head_count"))
    tokens = meta.require("tokenizer.ggml.tokens")
    shapes: dict[str, Any] = dict(
        family=arch,
        num_layers=int(meta.require(f"{arch}.block_count")),
        hidden_size=hidden,
        intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(tokens))),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_shortest_float32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=not has_output,
        attention_bias=False,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        rope_scaling=_rope_scaling(meta, arch, path),
    )
    if arch == "llama":
        shapes["head_dim"] = int(meta.get("llama.rope.dimension_count", hidden // heads))
    else:
        shapes.update(_gemma3_fields(meta, shapes["num_layers"]))
    try:
        return Architecture(**shapes)
    except ValueError as exc:
        raise SourceError(f"{path}: {exc}") from exc


def _rope_scaling(meta: GgufMetadata, arch: str, path: Path) -> RopeScaling | None:
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("none", None):
        return None
    if scaling_type != "linear":
        raise SourceError(f"{path}: RoPE scaling {scaling_type!r} is not supported "
                          "(supported: linear)")
    try:
        return RopeScaling("linear", float(meta.require(f"{arch}.rope.scaling.factor")))
    except ValueError as exc:
        raise SourceError(f"{path}: {arch}.rope.scaling: {exc}") from exc


def _gemma3_fields(meta: GgufMetadata, num_layers: int) -> dict[str, Any]:
    """Gemma 3's head size, attention scale and local/global layer plan."""
    head_dim = int(meta.require("gemma3.attention.key_length"))
    pattern = meta.get("gemma3.attention.sliding_window_pattern", _GEMMA3_GLOBAL_EVERY)
    if isinstance(pattern, list):  # one flag per layer: true where the layer slides
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(num_layers)]
    return dict(
        head_dim=head_dim,
        sliding_window=int(meta.require("gemma3.attention.sliding_window")),
        layer_types=tuple(SLIDING_ATTENTION if s else FULL_ATTENTION for s in sliding),
        rope_local_theta=float(meta.get("gemma3.rope.freq_base_swa",
                                        _GEMMA3_LOCAL_ROPE_THETA)),
        # Scores scale by head_dim ** -0.5 in the 270M..12B models (llama.cpp's rule).
        query_pre_attn_scalar=float(head_dim),
    )


def gguf_tokenizer(meta: GgufMetadata, path: Path) -> SourceTokenizer:
    model = meta.require("tokenizer.ggml.model")
    try:
        tok_json = tokenizer_json_from_gguf(
            meta.require("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type"),
            meta.get("tokenizer.ggml.merges", []), model=model,
            pre=meta.get("tokenizer.ggml.pre"),
            # llama.cpp's default for SentencePiece vocabularies that do not say
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", model == "llama")))
    except ValueError as exc:
        raise SourceError(f"{path}: {exc}") from exc
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [int(meta.require("tokenizer.ggml.eos_token_id"))]
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    return SourceTokenizer(
        tokenizer_json=json.dumps(tok_json, ensure_ascii=False),
        bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None,
        chat_template=meta.get("tokenizer.chat_template"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def model_name(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``."""
    return path.name.split(".")[0].lower()


def load_gguf(path: Path, *, sha256: str | None = None) -> SourceModel:
    """Opens path (memory-mapped); tensors are dequantized lazily, one at a time."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise SourceError(f"{path}: not a readable GGUF file: {exc}") from exc
    meta = GgufMetadata(reader, path)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:  # how llama.cpp stores Llama 3.1's RoPE scaling
        raise SourceError(f"{path}: per-dimension RoPE frequency factors (rope_freqs) are not "
                          "supported; build from the Hugging Face checkpoint instead")
    arch = gguf_architecture(meta, path, has_output="output.weight" in names)

    def unpermuted(name: str, w: np.ndarray) -> np.ndarray:
        if arch.family != "llama":
            return w
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return unpermute_rotary(w, arch.num_attention_heads)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return unpermute_rotary(w, arch.num_kv_heads)
        return w

    def named() -> Iterator[tuple[str, Any]]:
        for t in reader.tensors:
            name = hf_name(t.name, arch.family)
            if name is None:
                raise SourceError(f"{path}: unsupported GGUF tensor {t.name}")
            yield name, t

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name, t in named():
            yield name, unpermuted(name, np.asarray(dequantize(t.data, t.tensor_type),
                                                    dtype=np.float32))

    def blocks() -> Iterator[tuple[str, np.ndarray | SourceBlocks]]:
        for name, t in named():
            if t.tensor_type.name in _FLOAT_TYPES or len(t.shape) != 2:
                yield name, unpermuted(name, np.asarray(dequantize(t.data, t.tensor_type),
                                                        dtype=np.float32))
                continue
            shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists dimensions innermost first
            raw = np.asarray(t.data, dtype=np.uint8).reshape(shape[0], -1)
            yield name, SourceBlocks(t.tensor_type.name, unpermuted(name, raw), shape)

    return SourceModel(name=model_name(path), architecture=arch, tensors=tensors,
                       tokenizer=gguf_tokenizer(meta, path), source=path.name,
                       source_sha256=sha256 or file_sha256(path),
                       tools=(("gguf", metadata.version("gguf")),), blocks=blocks)
