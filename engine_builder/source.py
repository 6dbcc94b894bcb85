"""A model read from a checkpoint, in the engine's vocabulary, before it is written out.

Both readers (GGUF and Hugging Face) produce a ``SourceModel``: the architecture, the weights
under the family's Hugging Face names in float32 with Q/K in the half-split rotary layout (norm
weights as the multipliers they apply), and the tokenizer. The builder then only quantizes and
writes. A GGUF reader also offers the file's own quantized blocks (``SourceModel.blocks``), for
engines that keep them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from engine_builder.manifest import Architecture

# Yields (name, float32 array) once each; a callable so that big models stream through.
TensorStream = Callable[[], Iterator[tuple[str, np.ndarray]]]


@dataclass(frozen=True, slots=True)
class SourceBlocks:
    """One weight as the source's quantized blocks (GGML block type ``qtype``); rows are
    independent runs of blocks along the input axis, so Q/K un-permutation moves whole rows."""

    qtype: str  # GGML type name: "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", ...
    data: np.ndarray  # uint8 [out, row bytes]
    shape: tuple[int, int]  # the float weight's [out, in]


# Yields (name, float32 array or SourceBlocks) once each: quantized tensors as they are stored.
BlockStream = Callable[[], Iterator[tuple[str, "np.ndarray | SourceBlocks"]]]


@dataclass(frozen=True, slots=True)
class SourceTokenizer:
    tokenizer_json: str  # Hugging Face tokenizers JSON
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None


@dataclass(frozen=True, slots=True)
class SourceModel:
    name: str  # default engine name
    architecture: Architecture
    tensors: TensorStream
    tokenizer: SourceTokenizer
    source: str  # file or directory name, for provenance
    source_sha256: str | None
    tools: tuple[tuple[str, str], ...] = ()  # reader-specific versions for provenance
    blocks: BlockStream | None = None  # GGUF sources: the file's own blocks (quant "source")

    def with_tools(self, tools: Mapping[str, str]) -> SourceModel:
        return replace(self, tools=(*self.tools, *tools.items()))


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every tensor a cpu engine holds, by Hugging Face name, with its float shape."""
    h, q, kv = arch.hidden_size, arch.q_size, arch.kv_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if arch.family == "gemma3":
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_norm.weight"] = (arch.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (arch.head_dim,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "mlp.gate_proj.weight"] = (arch.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (arch.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, arch.intermediate_size)
        if arch.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
    return shapes


def is_quantizable(name: str) -> bool:
    """Linear projection weights and the embedding; norms and biases stay float32."""
    return name.endswith(".weight") and ("_proj." in name or name in (
        "model.embed_tokens.weight", "lm_head.weight"))


def check_same_tokenizer(target: SourceModel, draft: SourceModel) -> None:
    """ValueError (naming --draft) unless the draft proposes in the target's token ids."""
    if draft.architecture.vocab_size != target.architecture.vocab_size:
        raise ValueError(f"--draft: vocabulary of {draft.architecture.vocab_size} tokens, the "
                         f"model has {target.architecture.vocab_size}: drafts must share the "
                         "tokenizer")
    if draft.tokenizer.tokenizer_json != target.tokenizer.tokenizer_json:
        raise ValueError("--draft: its tokenizer.json differs from the model's; drafts must "
                         "share the tokenizer")
