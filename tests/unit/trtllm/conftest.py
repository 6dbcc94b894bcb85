"""Fixtures for the TensorRT-LLM path without a GPU: the fakes installed as
``tensorrt_llm.bindings.executor`` and ``tensorrt_llm.llmapi`` on a fresh fake device, and
engine directories the adapters can open."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine_builder.manifest import (
    Architecture,
    DraftInfo,
    Limits,
    Manifest,
    Provenance,
    Quantization,
    SpeculativeInfo,
    TokenizerInfo,
)
from engine_builder.tokenizer import byte_level_alphabet
from tests.unit.trtllm import fake_bindings, fake_llmapi, fake_model

EOS = 256  # "<|endoftext|>"; ids 0..255 are the bytes themselves
VOCAB = 257


def byte_tokenizer_json() -> str:
    """A byte-level BPE with no merges: token id == byte value, so text is predictable."""
    alphabet = byte_level_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str()


def make_manifest(*, draft: DraftInfo | None = None, max_batch_size: int = 4,
                  max_seq_len: int = 128, num_kv_blocks: int = 64) -> Manifest:
    return Manifest(
        name="fake-llama", backend="trtllm",
        architecture=Architecture(
            family="llama", num_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_kv_heads=2, head_dim=16, vocab_size=VOCAB,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            attention_bias=False, max_position_embeddings=max_seq_len),
        quantization=Quantization(weights="int8", kv_cache_dtype="auto", quant_algo="W8A16"),
        limits=Limits(max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                      max_num_tokens=256, tokens_per_block=32, num_kv_blocks=num_kv_blocks),
        tokenizer=TokenizerInfo(file="tokenizer.json", eos_token_ids=(EOS,)),
        files={"engine_dir": "engine"},
        provenance=Provenance(source="fake", source_sha256=None,
                              created_at="2026-11-28T00:00:00Z"),
        draft=draft,
    )


def hf_checkpoint(root: Path, *, vocab: int = 257, layers: int = 2) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "eos_token_id": 256, "tie_word_embeddings": False}))
    (root / "tokenizer.json").write_text(byte_tokenizer_json())
    (root / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "chat_template": "{{ messages[0]['content'] }}"}))
    (root / "model.safetensors").write_bytes(b"not read by the trtllm builder")
    return root


def write_checkpoint(root: Path, *, max_seq_len: int = 128,
                     fake: dict[str, Any] | None = None) -> Path:
    """A Hugging Face checkpoint as the fake LLM API reads it (config.json + a fake section)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": VOCAB, "max_position_embeddings": max_seq_len,
        "eos_token_id": EOS, "fake": fake or {}}))
    return root


def make_llmapi_dir(root: Path, *, fake: dict[str, Any] | None = None,
                    speculative: SpeculativeInfo | None = None, max_batch_size: int = 4,
                    max_seq_len: int = 128, kv_cache_dtype: str = "auto") -> Path:
    """DIR/manifest.json (backend trtllm-llmapi) + tokenizer.json + DIR/ckpt (+ DIR/draft)."""
    write_checkpoint(root / "ckpt", max_seq_len=max_seq_len, fake=fake)
    if speculative is not None and speculative.model is not None:
        write_checkpoint(root / speculative.model, max_seq_len=max_seq_len,
                         fake={"perturb_every": 3})
    base = make_manifest(max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    manifest = dataclasses.replace(
        base, backend="trtllm-llmapi", files={"checkpoint": "ckpt"}, speculative=speculative,
        quantization=Quantization(weights="none", kv_cache_dtype=kv_cache_dtype))
    manifest.save(root)
    (root / "tokenizer.json").write_text(byte_tokenizer_json())
    return root


def make_engine_dir(root: Path, *, fake: dict[str, Any] | None = None,
                    draft_fake: dict[str, Any] | None = None, max_draft_len: int = 4,
                    target_max_draft_len: int | None = None, max_batch_size: int = 4,
                    max_seq_len: int = 128) -> Path:
    """DIR/manifest.json + tokenizer.json + engine/config.json (+ draft/ when draft_fake)."""
    draft = None
    if draft_fake is not None:
        draft = DraftInfo(path="draft", max_draft_len=max_draft_len)
        draft_dir = root / "draft"
        make_engine_dir(draft_dir, fake=draft_fake, max_batch_size=max_batch_size,
                        max_seq_len=max_seq_len)
    manifest = make_manifest(draft=draft, max_batch_size=max_batch_size,
                             max_seq_len=max_seq_len)
    manifest.save(root)
    (root / "tokenizer.json").write_text(byte_tokenizer_json())
    built_draft_len = max_draft_len if draft is not None else 0
    if target_max_draft_len is not None:
        built_draft_len = target_max_draft_len
    fake_bindings.write_engine_config(
        root / "engine", vocab_size=VOCAB, max_batch_size=max_batch_size,
        max_seq_len=max_seq_len, max_draft_len=built_draft_len, fake=fake)
    return root


def install_fakes(monkeypatch: pytest.MonkeyPatch, device: fake_model.FakeDevice) -> None:
    """Both fakes under ``tensorrt_llm`` for the adapters' lazy imports, on ``device``."""
    pkg = types.ModuleType("tensorrt_llm")
    sub = types.ModuleType("tensorrt_llm.bindings")
    sub.executor = fake_bindings  # type: ignore[attr-defined]
    pkg.bindings = sub  # type: ignore[attr-defined]
    pkg.llmapi = fake_llmapi  # type: ignore[attr-defined]
    pkg.LLM = fake_llmapi.LLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", pkg)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.bindings", sub)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.bindings.executor", fake_bindings)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", fake_llmapi)
    monkeypatch.setattr(fake_model, "DEVICE", device)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> fake_model.FakeDevice:
    """A fresh fake GPU with the fakes installed on it (plenty of memory unless a test
    makes its own)."""
    fresh = fake_model.FakeDevice()
    install_fakes(monkeypatch, fresh)
    return fresh


@pytest.fixture
def bindings(device: fake_model.FakeDevice) -> Iterator[Any]:
    """The fake bindings module, as ``tensorrt_llm.bindings.executor``."""
    yield fake_bindings


@pytest.fixture
def llmapi(device: fake_model.FakeDevice) -> Iterator[Any]:
    """The fake LLM API module, as ``tensorrt_llm.llmapi``."""
    yield fake_llmapi
