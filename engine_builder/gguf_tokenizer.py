"""A Hugging Face ``tokenizer.json`` rebuilt from GGUF tokenizer metadata (byte-level BPE).

GGUF keeps the vocabulary (``tokenizer.ggml.tokens``), the merges and a type per token; type 3
(control, e.g. ``<|im_start|>``) becomes a special added token, type 4 (user-defined) a plain
added token, so both are matched whole in text. The pre-tokenizer follows
``tokenizer.ggml.pre``, which names llama.cpp's pre-tokenizer regex family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}
# llama.cpp pre-tokenizers that split every digit on its own before the GPT-2 regex.
_DIGIT_SPLITTING_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell",
                                  "exaone", "minerva"})
# Pre-tokenizers that are exactly the GPT-2 regex.
_GPT2_PRE = frozenset({"gpt2", "default", "gpt-2"})


def pre_tokenizer_for(pre: str | None) -> dict[str, Any]:
    """The tokenizers pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre``."""
    if pre is None or pre in _GPT2_PRE:
        return dict(_BYTE_LEVEL)
    if pre in _DIGIT_SPLITTING_PRE:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, dict(_BYTE_LEVEL)]}
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                     f"{', '.join(sorted(_GPT2_PRE | _DIGIT_SPLITTING_PRE))})")


def tokenizer_json_from_gguf(tokens: Sequence[str], token_types: Sequence[int] | None,
                             merges: Sequence[str], *, model: str,
                             pre: str | None) -> dict[str, Any]:
    """tokenizer.json content; raises ValueError for vocabularies that are not byte-level BPE."""
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, "
                         "'gpt2')")
    if token_types is not None and len(token_types) != len(tokens):
        raise ValueError(f"GGUF has {len(token_types)} token types for {len(tokens)} tokens")
    types = token_types if token_types is not None else [TOKEN_TYPE_NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a repeated string keeps its first id
    added = [
        {"id": token_id, "content": token, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": kind == TOKEN_TYPE_CONTROL}
        for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"GGUF merge {merge!r} is not 'left right'")
        pairs.append([left, right])
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer_for(pre), "post_processor": None,
        "decoder": dict(_BYTE_LEVEL),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }
