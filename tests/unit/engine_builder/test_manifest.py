"""Manifest round trip and the errors Manifest.load gives for broken engine directories."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine_builder.manifest import (
    Architecture,
    FieldError,
    Limits,
    Manifest,
    ManifestError,
    Profile,
    Provenance,
    Quantization,
    TokenizerInfo,
)

pytestmark = pytest.mark.unit


def _manifest() -> Manifest:
    return Manifest(
        name="m", backend="cpu",
        architecture=Architecture("llama", 30, 576, 1536, 9, 3, 64, 49152, 1e5, 1e-5, True,
                                  False, 8192),
        quantization=Quantization(weights="int4", group_size=32, kv_cache_dtype="int8"),
        limits=Limits(32, 2048, 512, 16, 4096),
        tokenizer=TokenizerInfo(bos_token_id=1, eos_token_ids=(2, 0),
                                chat_template_file="chat_template.jinja"),
        files={"weights": "weights.safetensors"},
        provenance=Provenance("x.gguf", "ab" * 32, "2026-11-28T00:00:00Z", {"numpy": "2.0"}),
    )


def _write(engine_dir: Path, data: Any) -> Path:
    engine_dir.mkdir(exist_ok=True)
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    return engine_dir


def test_save_load_round_trip_including_profile(tmp_path: Path) -> None:
    profile = Profile((1, 2), (10.0, 18.5), (100.0, 108.1), 9.8, 540_000_000, 18.5,
                      "2026-11-28T00:00:00Z", "host")
    original = _manifest().with_profile(profile)
    original.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == original
    assert loaded.profile is not None and loaded.profile.batch_sizes == (1, 2)
    assert loaded.weights_path(tmp_path) == tmp_path / "weights.safetensors"
    assert loaded.chat_template_path(tmp_path) == tmp_path / "chat_template.jinja"
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert list(raw) == ["schema_version", "name", "backend", "architecture", "quantization",
                         "limits", "tokenizer", "files", "draft", "profile", "speculative",
                         "provenance"]
    assert raw["tokenizer"]["eos_token_ids"] == [2, 0]


def test_with_profile_returns_a_new_manifest() -> None:
    m = _manifest()
    assert m.with_profile(None) == m
    assert replace(m, name="other").name == "other"


def test_missing_directory_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.load(tmp_path / "nope")
    with pytest.raises(ManifestError, match=r"manifest\.json: missing"):
        Manifest.load(tmp_path)


def test_corrupt_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"schema_version": 1,')
    with pytest.raises(ManifestError, match="corrupt JSON"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("version", [4, 0, "1", None])
def test_wrong_schema_version(tmp_path: Path, version: object) -> None:
    data = _manifest().to_json()
    data["schema_version"] = version
    with pytest.raises(ManifestError, match="schema_version"):
        Manifest.load(_write(tmp_path / "e", data))


@pytest.mark.parametrize(("section", "key"), [
    ("limits", "max_batch_size"), ("architecture", "num_kv_heads"), ("tokenizer", "eos_token_ids"),
    ("provenance", "created_at"), (None, "backend"), (None, "files"),
])
def test_missing_field_is_named_by_path(tmp_path: Path, section: str | None, key: str) -> None:
    data = _manifest().to_json()
    del (data[section] if section else data)[key]
    path = f"{section}.{key}" if section else key
    with pytest.raises(ManifestError, match=rf": {path}: missing"):
        Manifest.load(_write(tmp_path / "e", data))


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("limits", "max_batch_size", 0, "must be >= 1"),
    ("limits", "max_batch_size", "32", "must be an integer"),
    ("limits", "max_batch_size", True, "must be an integer"),
    ("architecture", "num_kv_heads", 4, "does not divide"),
    ("architecture", "rope_theta", "x", "must be a number"),
    ("quantization", "weights", "int3", "unknown weight quantization"),
    ("quantization", "group_size", None, "int4 needs"),
    ("quantization", "kv_cache_dtype", "fp8", "not available on the cpu backend"),
    ("tokenizer", "eos_token_ids", [], "at least one"),
    ("tokenizer", "eos_token_ids", [2, "x"], "list of integers"),
])
def test_invalid_field_is_named_by_path(tmp_path: Path, section: str, key: str, value: object,
                                        message: str) -> None:
    data = _manifest().to_json()
    data[section][key] = value
    with pytest.raises(ManifestError, match=rf"{section}\.{key}: .*{message}"):
        Manifest.load(_write(tmp_path / "e", data))


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    data = _manifest().to_json()
    data["limits"]["max_batch"] = 4
    with pytest.raises(ManifestError, match=r"limits\.max_batch: unknown key"):
        Manifest.load(_write(tmp_path / "e", data))


def test_section_must_be_an_object(tmp_path: Path) -> None:
    data = _manifest().to_json()
    data["limits"] = [1, 2]
    with pytest.raises(ManifestError, match="limits: must be an object"):
        Manifest.load(_write(tmp_path / "e", data))


def test_trtllm_manifest_needs_engine_dir_and_has_no_weights_path(tmp_path: Path) -> None:
    m = replace(_manifest(), backend="trtllm", files={"engine_dir": "engine"},
                quantization=Quantization("int4_awq", 128, "fp8", "W4A16_AWQ", "FP8"))
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m
    with pytest.raises(ManifestError, match=r"no files\.weights"):
        m.weights_path(tmp_path)
    with pytest.raises(FieldError, match="engine_dir"):
        replace(m, files={"weights": "w"})


def test_constructing_invalid_sections_raises_value_error() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        Limits(1, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="add_bos"):
        TokenizerInfo(eos_token_ids=(2,), add_bos=True)
    with pytest.raises(ValueError, match="only int4"):
        Quantization(weights="int8", group_size=32)
    with pytest.raises(ValueError, match="decode_tokens_per_s"):
        Profile((1, 2), (1.0,), (1.0, 2.0), 1.0, 1, 1.0, "t", "h")


def test_rope_scaling_round_trips_and_is_optional(tmp_path: Path) -> None:
    from engine_builder.manifest import RopeScaling

    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    original = replace(_manifest(),
                       architecture=replace(_manifest().architecture, rope_scaling=scaling))
    original.save(tmp_path / "a")
    assert Manifest.load(tmp_path / "a").architecture.rope_scaling == scaling
    raw = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert raw["architecture"]["rope_scaling"]["original_max_position_embeddings"] == 8192
    del raw["architecture"]["rope_scaling"]  # engines written before the key existed
    assert Manifest.load(_write(tmp_path / "b", raw)).architecture.rope_scaling is None


@pytest.mark.parametrize(("scaling", "message"), [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_type: unsupported 'yarn'"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor: llama3 needs it"),
    ({"rope_type": "linear", "factor": 0.0}, "factor: must be > 0"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "rope_type: only llama3"),
    ({"factor": 2.0}, "rope_type: missing"),
])
def test_invalid_rope_scaling_is_named_by_path(tmp_path: Path, scaling: dict,
                                               message: str) -> None:
    data = _manifest().to_json()
    data["architecture"]["rope_scaling"] = scaling
    with pytest.raises(ManifestError, match=rf"architecture\.rope_scaling\.{message}"):
        Manifest.load(_write(tmp_path / "e", data))
