"""EngineTokenizer (special tokens, BOS policy, chat templates) and IncrementalDetokenizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer

pytestmark = pytest.mark.unit

CHATML_PROMPT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                 "<|im_start|>assistant\n")
TEXTS = ["The capital of France is Paris.", "你好, 世界! 😀👍🏽 naïve café", "a\n\n  b\tc  ",
         "ab😀" * 3, "日本語のテキスト"]


@pytest.fixture(scope="module")
def tok(tiny_engine: Path) -> EngineTokenizer:
    return EngineTokenizer.load(tiny_engine, Manifest.load(tiny_engine))


def test_encode_decode_round_trip(tok: EngineTokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_merges_apply(tok: EngineTokenizer) -> None:
    ids = tok.encode(" the Paris of France")
    assert [tok.id_to_token(i) for i in ids] == ["Ġthe", "Ġ", "Paris", "Ġof", "ĠFrance"]


def test_special_tokens_in_text_are_single_control_ids(tok: EngineTokenizer) -> None:
    ids = tok.encode(CHATML_PROMPT)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert tok.decode(ids) == CHATML_PROMPT
    assert tok.decode(ids, skip_special_tokens=True) == (
        "user\nWhat is the capital of France?\nassistant\n")
    assert tok.eos_token_ids == (2, 0) and tok.bos_token_id == 1


def test_add_bos_prepends_bos_once(tiny_engine: Path) -> None:
    manifest = Manifest.load(tiny_engine)
    with_bos = replace(manifest, tokenizer=replace(manifest.tokenizer, add_bos=True))
    tok = EngineTokenizer.load(tiny_engine, with_bos)
    assert tok.encode("hi")[0] == 1
    assert tok.encode("hi")[1:] == EngineTokenizer.load(tiny_engine, manifest).encode("hi")
    # Chat templates write their own BOS, so encode_chat never adds one.
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:2] != [1, 1]


def test_chat_template_renders_chatml(tok: EngineTokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.has_chat_template
    assert tok.render_chat(messages) == CHATML_PROMPT
    assert tok.render_chat(messages, add_generation_prompt=False) == CHATML_PROMPT.removesuffix(
        "<|im_start|>assistant\n")
    assert tok.encode_chat(messages) == tok.encode(CHATML_PROMPT)


def test_without_template_render_chat_is_a_value_error(tiny_engine: Path) -> None:
    manifest = Manifest.load(tiny_engine)
    bare = replace(manifest, tokenizer=replace(manifest.tokenizer, chat_template_file=None))
    tok = EngineTokenizer.load(tiny_engine, bare)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_template_is_sandboxed(tiny_engine: Path) -> None:
    from jinja2.exceptions import SecurityError

    raw = Tokenizer.from_file(str(tiny_engine / "tokenizer.json"))
    evil = EngineTokenizer(raw, eos_token_ids=(2,),
                           chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        evil.render_chat([{"role": "user", "content": "x"}])
    raising = EngineTokenizer(raw, eos_token_ids=(2,),
                              chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(Exception, match="only user turns"):
        raising.render_chat([])


def _stream(det: IncrementalDetokenizer, ids: list[int], chunk: int) -> list[str]:
    pieces = [det.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*pieces, det.flush()]


@pytest.mark.parametrize("byte_level", [True, False])
def test_detokenizer_never_splits_a_character(tok: EngineTokenizer, tiny_engine: Path,
                                              byte_level: bool) -> None:
    if not byte_level:  # the generic windowed path, used for non-byte-level vocabularies
        raw = Tokenizer.from_file(str(tiny_engine / "tokenizer.json"))
        tok = EngineTokenizer(raw, eos_token_ids=(2,))
    for text in TEXTS:
        ids = tok.encode(text)
        for chunk in (1, 2, 3):
            pieces = _stream(IncrementalDetokenizer(tok), ids, chunk)
            assert "".join(pieces) == text
            assert not any("\ufffd" in p for p in pieces)


def test_emoji_split_across_tokens_comes_out_whole(tok: EngineTokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) >= 2  # the tiny vocabulary holds no whole emoji: it must be split
    det = IncrementalDetokenizer(tok)
    assert [det.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.push(ids[-1:]) == "😀"
    cjk = tok.encode("你")
    assert tok.id_to_token(cjk[0]) == "ä½"  # a merge that ends inside the character
    det = IncrementalDetokenizer(tok)
    assert det.push(cjk[:1]) == "" and det.push(cjk[1:]) == "你"


def test_prefix_with_a_dangling_partial_character_is_completed(tok: EngineTokenizer) -> None:
    ids = tok.encode("ok 你好")
    cut = len(tok.encode("ok ")) + 1  # prefix ends after the first token of 你
    det = IncrementalDetokenizer(tok, prefix_ids=ids[:cut])
    assert det.push(ids[cut:]) + det.flush() == "你好"


def test_special_tokens_skipped_unless_asked(tok: EngineTokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert "".join(_stream(IncrementalDetokenizer(tok), ids, 1)) == "hi"
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(_stream(kept, ids, 1)) == "hi<|im_end|>"


def test_random_id_streams_match_batch_decode_when_valid(tok: EngineTokenizer) -> None:
    rng = np.random.default_rng(0)
    specials = set(tok.special_ids)
    for _ in range(50):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, 12) if int(i) not in specials]
        pieces = _stream(IncrementalDetokenizer(tok), ids, int(rng.integers(1, 4)))
        assert all("\ufffd" not in p for p in pieces[:-1] if p) or "\ufffd" in tok.decode(ids)
        assert "".join(pieces) == tok.decode(ids)


def test_loads_from_manifest_paths(tiny_engine: Path) -> None:
    raw = json.loads((tiny_engine / "tokenizer.json").read_text())
    tok = EngineTokenizer.load(tiny_engine, Manifest.load(tiny_engine))
    assert tok.vocab_size == len(raw["model"]["vocab"])
    assert tok.token_bytes is not None and tok.token_bytes[3 + ord("A")] == b"A"
