"""Reading a Hugging Face Llama-family checkpoint directory into a ``SourceModel``.

Expected files: ``config.json``, ``*.safetensors`` (sharded or not; float32/16 or bfloat16),
``tokenizer.json``, and optionally ``tokenizer_config.json`` (chat template, BOS policy),
``chat_template.jinja`` and ``generation_config.json`` (EOS ids). Hugging Face already uses the
half-split rotary layout and the engine's tensor names, so weights pass through unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine_builder.manifest import ROPE_SCALING_TYPES, Architecture, RopeScaling
from engine_builder.safetensors_io import iter_float32
from engine_builder.source import SourceModel, SourceTokenizer, expected_shapes

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


class SourceError(ValueError):
    """A checkpoint this builder cannot read; the message says which file and why."""


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise SourceError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: corrupt JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def rope_scaling_from_config(value: object, where: Path) -> RopeScaling | None:
    """Hugging Face's ``rope_scaling`` (``rope_type``, or ``type`` in older configs); the
    ``default`` type is no scaling. Dynamic NTK, YaRN and LongRoPE are refused."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SourceError(f"{where}: rope_scaling must be an object, got {value!r}")
    rope_type = value.get("rope_type", value.get("type"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALING_TYPES:
        raise SourceError(f"{where}: rope_scaling type {rope_type!r} is not supported "
                          f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
    llama3 = rope_type == "llama3"
    try:
        return RopeScaling(
            rope_type=rope_type,
            factor=float(value["factor"]),
            low_freq_factor=float(value["low_freq_factor"]) if llama3 else None,
            high_freq_factor=float(value["high_freq_factor"]) if llama3 else None,
            original_max_position_embeddings=int(value["original_max_position_embeddings"])
            if llama3 else None,
        )
    except KeyError as exc:
        raise SourceError(f"{where}: rope_scaling lacks {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{where}: rope_scaling: {exc}") from exc


def architecture_from_config(config: dict[str, Any], where: Path) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SourceError(f"{where}: model_type {model_type!r} is not Llama-family "
                          f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
    rope_scaling = rope_scaling_from_config(config.get("rope_scaling"), where)
    # Qwen2 configs name a window but switch it off with use_sliding_window.
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        raise SourceError(f"{where}: sliding_window={config['sliding_window']!r} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise SourceError(f"{where}: hidden_act {config['hidden_act']!r} is not supported")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    try:
        return Architecture(
            family="llama",
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and does not say so in its config.
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rope_scaling=rope_scaling,
        )
    except KeyError as exc:
        raise SourceError(f"{where}: missing key {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise SourceError(f"{where}: {exc}") from exc


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map", {})
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{model_dir}: no *.safetensors weights")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{missing[0]}: missing (listed in the shard index)")
    return files


def _token_id(tok_json: dict[str, Any], token: object) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    for added in tok_json.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = tok_json.get("model", {}).get("vocab", {})
    value = vocab.get(token) if isinstance(vocab, dict) else None
    return None if value is None else int(value)


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value]
    return []


def _chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _adds_bos(tok_json: dict[str, Any], tok_config: dict[str, Any], bos: int | None) -> bool:
    if "add_bos_token" in tok_config:
        return bool(tok_config["add_bos_token"]) and bos is not None
    post = tok_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            special = first.get("SpecialToken", {}).get("id")
            return bos is not None and _token_id(tok_json, special) == bos
    return False


def read_tokenizer(model_dir: Path, config: dict[str, Any]) -> SourceTokenizer:
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise SourceError(f"{tok_path}: missing (only fast tokenizers are supported)")
    tok_text = tok_path.read_text(encoding="utf-8")
    tok_json = json.loads(tok_text)
    tok_config = _read_json(model_dir / "tokenizer_config.json", required=False)
    gen_config = _read_json(model_dir / "generation_config.json", required=False)
    bos = config.get("bos_token_id")
    if not isinstance(bos, int):
        bos = _token_id(tok_json, tok_config.get("bos_token"))
    # The template's `eos_token` (tokenizer_config) first, then the ids generation stops at.
    eos: list[int] = []
    candidates = [_token_id(tok_json, tok_config.get("eos_token")),
                  *_as_ids(gen_config.get("eos_token_id")), *_as_ids(config.get("eos_token_id"))]
    for token_id in candidates:
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    if not eos:
        raise SourceError(f"{model_dir}: no EOS token id in config.json, generation_config.json "
                          "or tokenizer_config.json")
    return SourceTokenizer(tokenizer_json=tok_text, bos_token_id=bos, eos_token_ids=tuple(eos),
                           add_bos=_adds_bos(tok_json, tok_config, bos),
                           chat_template=_chat_template(model_dir, tok_config))


def directory_sha256(files: list[Path], root: Path) -> str:
    """One digest over the named files (relative name + content), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def load_hf_checkpoint(model_dir: Path) -> SourceModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SourceError(f"{model_dir}: not a directory")
    config = _read_json(model_dir / "config.json", required=True)
    arch = architecture_from_config(config, model_dir / "config.json")
    tokenizer = read_tokenizer(model_dir, config)
    files = _weight_files(model_dir)
    wanted = expected_shapes(arch)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for path in files:
            for name, array in iter_float32(path):
                if name in wanted:  # drops rotary caches and a tied checkpoint's lm_head
                    yield name, array

    hashed = [*files, model_dir / "config.json", model_dir / "tokenizer.json"]
    return SourceModel(name=model_dir.resolve().name.lower(), architecture=arch, tensors=tensors,
                       tokenizer=tokenizer, source=model_dir.resolve().name,
                       source_sha256=directory_sha256(hashed, model_dir))
