"""The Hugging Face build path on the tiny checkpoint: weights, quantized layouts, checkpoint
variants (bf16, sharded, tied, biased) and the errors for what it cannot build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine_builder.build import BuildOptions, build_engine
from engine_builder.hf_source import SourceError, load_hf_checkpoint
from engine_builder.manifest import FieldError, Manifest
from engine_builder.quantize import dequantize_int4, dequantize_int8
from engine_builder.safetensors_io import write_safetensors
from engine_builder.source import expected_shapes
from engine_builder.tiny import build_tiny_engine, write_tiny_checkpoint

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", seed=7)


def _build(checkpoint: Path, out: Path, **options: object) -> tuple[Manifest, dict]:
    build_engine(load_hf_checkpoint(checkpoint), BuildOptions(**options), out)  # type: ignore[arg-type]
    return Manifest.load(out), load_file(str(out / "weights.safetensors"))


def test_float_build_keeps_every_weight_exactly(checkpoint: Path, tmp_path: Path) -> None:
    manifest, weights = _build(checkpoint, tmp_path / "e")
    source = load_file(str(checkpoint / "model.safetensors"))
    assert weights.keys() == source.keys() == expected_shapes(manifest.architecture).keys()
    for name, w in source.items():
        np.testing.assert_array_equal(weights[name], w)
    assert manifest.tokenizer.eos_token_ids == (2, 0)  # tokenizer_config's eos first
    assert manifest.tokenizer.chat_template_file == "chat_template.jinja"
    assert manifest.provenance.source_sha256 is not None
    assert len(manifest.provenance.source_sha256) == 64
    assert (tmp_path / "e" / "chat_template.jinja").read_text().startswith("{% for message")
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary directory left


def test_int8_build_layout_and_error(checkpoint: Path, tmp_path: Path) -> None:
    manifest, weights = _build(checkpoint, tmp_path / "e", quant="int8")
    source = load_file(str(checkpoint / "model.safetensors"))
    assert manifest.quantization.weights == "int8" and manifest.quantization.group_size is None
    for name in ("model.layers.1.self_attn.k_proj", "model.embed_tokens", "lm_head"):
        q, s = weights[f"{name}.qweight"], weights[f"{name}.scales"]
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (q.shape[0],)
        err = np.abs(dequantize_int8(q, s) - source[f"{name}.weight"])
        assert np.all(err <= s[:, None] / 2 * (1 + 1e-5))
        assert f"{name}.weight" not in weights
    assert weights["model.layers.0.input_layernorm.weight"].dtype == np.float32


def test_int4_build_layout_and_error(checkpoint: Path, tmp_path: Path) -> None:
    manifest, weights = _build(checkpoint, tmp_path / "e", quant="int4", group_size=16)
    source = load_file(str(checkpoint / "model.safetensors"))
    assert manifest.quantization.group_size == 16
    name = "model.layers.0.mlp.down_proj"  # [64, 128]
    q, s = weights[f"{name}.qweight"], weights[f"{name}.scales"]
    assert q.dtype == np.uint8 and q.shape == (64, 64) and s.shape == (64, 8)
    w = source[f"{name}.weight"]
    err = dequantize_int4(q, s, 16) - w
    # Scales are fitted to minimise error (clipping outliers on purpose), so the bound is the
    # naive max|w|/7 scheme's error, group by group.
    groups = w.reshape(64, 8, 16)
    naive_scale = np.abs(groups).max(axis=2, keepdims=True) / 7
    naive = np.clip(np.round(groups / naive_scale), -8, 7) * naive_scale
    naive_err = ((naive - groups) ** 2).sum(axis=2)
    assert np.all((err.reshape(64, 8, 16) ** 2).sum(axis=2) <= naive_err * (1 + 1e-5) + 1e-12)


def test_bf16_checkpoint_is_widened_exactly(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "hf", seed=1, dtype="BF16")
    _, weights = _build(checkpoint, tmp_path / "e")
    f32 = write_tiny_checkpoint(tmp_path / "hf32", seed=1)
    source = load_file(str(f32 / "model.safetensors"))
    for name, w in source.items():
        truncated = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
        np.testing.assert_array_equal(weights[name], truncated)


def test_sharded_checkpoint_builds_the_same_engine(checkpoint: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / f).write_text((checkpoint / f).read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        write_safetensors(sharded / shard, {n: tensors[n] for n in members})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, a = _build(checkpoint, tmp_path / "a")
    _, b = _build(sharded, tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_tied_embeddings_have_no_lm_head(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "e", tie_word_embeddings=True, quant="int8")
    manifest = Manifest.load(engine)
    weights = load_file(str(engine / "weights.safetensors"))
    assert manifest.architecture.tie_word_embeddings
    assert not any(n.startswith("lm_head") for n in weights)


def test_attention_bias_is_kept_in_float32(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "e", attention_bias=True, quant="int4")
    weights = load_file(str(engine / "weights.safetensors"))
    assert Manifest.load(engine).architecture.attention_bias
    assert weights["model.layers.1.self_attn.k_proj.bias"].dtype == np.float32
    assert weights["model.layers.1.self_attn.k_proj.bias"].shape == (32,)


def test_default_and_explicit_limits(checkpoint: Path, tmp_path: Path) -> None:
    manifest, _ = _build(checkpoint, tmp_path / "a")
    assert (manifest.limits.max_batch_size, manifest.limits.max_seq_len,
            manifest.limits.max_num_tokens, manifest.limits.tokens_per_block,
            manifest.limits.num_kv_blocks) == (32, 2048, 512, 16, 32 * 1024 // 16)
    manifest, _ = _build(checkpoint, tmp_path / "b", max_batch_size=4, max_seq_len=256,
                         kv_cache_dtype="int8")
    assert manifest.limits.num_kv_blocks == 4 * 256 // 16
    assert manifest.quantization.kv_cache_dtype == "int8"
    with pytest.raises(FieldError, match="num_kv_blocks"):
        _build(checkpoint, tmp_path / "c", max_seq_len=256, num_kv_blocks=8)
    with pytest.raises(FieldError, match="max_seq_len"):
        _build(checkpoint, tmp_path / "d", max_seq_len=8192)
    with pytest.raises(FieldError, match="group_size"):
        BuildOptions(quant="int8", group_size=32)


def test_existing_output_is_refused_unless_replacing(checkpoint: Path, tmp_path: Path) -> None:
    _build(checkpoint, tmp_path / "e")
    with pytest.raises(FileExistsError):
        _build(checkpoint, tmp_path / "e")
    build_engine(load_hf_checkpoint(checkpoint), BuildOptions(quant="int8"), tmp_path / "e",
                 replace=True)
    assert Manifest.load(tmp_path / "e").quantization.weights == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def _edit_config(checkpoint: Path, tmp_path: Path, **changes: object) -> Path:
    copy = tmp_path / "edited"
    copy.mkdir()
    for f in checkpoint.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "gpt2"}, "not Llama-family"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
     "must exceed low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "does not divide"),
])
def test_unsupported_configs_are_source_errors(checkpoint: Path, tmp_path: Path,
                                               changes: dict, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        load_hf_checkpoint(_edit_config(checkpoint, tmp_path, **changes))


def test_missing_and_misshapen_tensors(checkpoint: Path, tmp_path: Path) -> None:
    edited = _edit_config(checkpoint, tmp_path)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(edited / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj"):
        build_engine(load_hf_checkpoint(edited), BuildOptions(), tmp_path / "e1")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((128, 63), dtype=np.float32)
    write_safetensors(edited / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"up_proj\.weight has shape \[128, 63\]"):
        build_engine(load_hf_checkpoint(edited), BuildOptions(), tmp_path / "e2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # nothing half-built
    (edited / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match=r"tokenizer\.json: missing"):
        load_hf_checkpoint(edited)


@pytest.mark.parametrize(("rope_scaling", "want"), [
    (None, None),
    ({"rope_type": "default"}, None),
    ({"type": "linear", "factor": 2.0}, ("linear", 2.0, None, None, None)),  # older key name
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, ("llama3", 8.0, 1.0, 4.0, 8192)),
])
def test_supported_rope_scaling_reaches_the_architecture(
    checkpoint: Path, tmp_path: Path, rope_scaling: dict | None, want: tuple | None
) -> None:
    from dataclasses import astuple

    arch = load_hf_checkpoint(_edit_config(checkpoint, tmp_path, rope_scaling=rope_scaling))
    got = arch.architecture.rope_scaling
    assert (None if got is None else astuple(got)) == want
