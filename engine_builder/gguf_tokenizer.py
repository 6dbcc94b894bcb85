"""A Hugging Face ``tokenizer.json`` rebuilt from GGUF tokenizer metadata.

GGUF keeps the vocabulary (``tokenizer.ggml.tokens``) and a type per token; type 3 (control,
e.g. ``<|im_start|>``) becomes a special added token, type 4 (user-defined) a plain added token,
so both are matched whole in text. Two vocabularies are read:

- byte-level BPE (``tokenizer.ggml.model = gpt2``) with its merges; the pre-tokenizer follows
  ``tokenizer.ggml.pre``, which names llama.cpp's pre-tokenizer regex family;
- SentencePiece BPE (``llama``, as Gemma's): spaces become "▁", unknown characters fall back to
  byte tokens (``<0x41>``), and the merges, which the file does not list, are rebuilt from the
  vocabulary: every split of a piece into two pieces is a merge, ranked by the piece's id.
  SentencePiece lists pieces in merge order (their scores fall as the id grows), and the id is
  the safer key: Gemma's pieces of several spaces carry placeholder scores, and are stored as
  real spaces, spelled here with "▁" like the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPACE_PIECE = "\u2581"  # SentencePiece's visible space

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
                             merges: Sequence[str], *, model: str, pre: str | None,
                             add_space_prefix: bool = False) -> dict[str, Any]:
    """tokenizer.json content; raises ValueError for vocabularies it cannot rebuild."""
    if token_types is not None and len(token_types) != len(tokens):
        raise ValueError(f"GGUF has {len(token_types)} token types for {len(tokens)} tokens")
    types = token_types if token_types is not None else [TOKEN_TYPE_NORMAL] * len(tokens)
    if model == "llama":
        if add_space_prefix:
            raise ValueError("GGUF SentencePiece vocabularies with add_space_prefix are not "
                             "supported")
        return _sentencepiece_json(tokens, types)
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', "
                         "byte-level BPE; 'llama', SentencePiece BPE)")
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a repeated string keeps its first id
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"GGUF merge {merge!r} is not 'left right'")
        pairs.append([left, right])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, vocab), "normalizer": None,
        "pre_tokenizer": pre_tokenizer_for(pre), "post_processor": None,
        "decoder": dict(_BYTE_LEVEL),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }


def _added_tokens(tokens: Sequence[str], types: Sequence[int],
                  vocab: dict[str, int]) -> list[dict[str, Any]]:
    """Control tokens as special added tokens, user-defined ones as plain added tokens (those
    the vocabulary spells as the file does); both are matched whole in text."""
    return [
        {"id": token_id, "content": token, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": kind == TOKEN_TYPE_CONTROL}
        for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == TOKEN_TYPE_CONTROL or (kind == TOKEN_TYPE_USER_DEFINED and token in vocab)
    ]


def _sentencepiece_json(tokens: Sequence[str], types: Sequence[int]) -> dict[str, Any]:
    spelled = [SPACE_PIECE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(spelled):
        vocab.setdefault(token, token_id)
    merges: list[tuple[int, int, str, str]] = []  # (rank, -len(left), left, right)
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, -len(left), left, right))
    merges.sort()
    space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, vocab), "normalizer": space,
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_PIECE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": _unknown(tokens),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[left, right] for *_, left, right in merges]},
    }


def _unknown(tokens: Sequence[str]) -> str | None:
    return "<unk>" if "<unk>" in tokens else None
