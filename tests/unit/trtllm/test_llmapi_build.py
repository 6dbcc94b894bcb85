"""build --backend trtllm-llmapi: the manifest written for an HF checkpoint (no GPU needed),
its quantization read from the checkpoint, the speculative section, and serving it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine_builder.cli import main
from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, FinishReason, SamplingParams
from server.executor.factory import load_executor
from tests.unit.trtllm.conftest import hf_checkpoint
from tests.unit.trtllm.helpers import collect

pytestmark = pytest.mark.unit


def build(model: Path, out: Path, *flags: str) -> int:
    return main(["build", "--backend", "trtllm-llmapi", "--model", str(model), "--output",
                 str(out), "--max-batch-size", "4", "--max-seq-len", "256", *flags])


def quantized(root: Path, algo: str | None, kv: str | None = None) -> Path:
    (root / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"},
         "quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": 128}}))
    return root


def test_writes_a_manifest_pointing_at_the_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = hf_checkpoint(tmp_path / "hf")
    assert build(model, tmp_path / "e", "--kv-cache-dtype", "fp8") == 0
    m = Manifest.load(tmp_path / "e")
    assert m.backend == "trtllm-llmapi" and m.checkpoint_path(tmp_path / "e") == model.resolve()
    assert (m.quantization.weights, m.quantization.kv_cache_dtype) == ("none", "fp8")
    assert (m.limits.max_batch_size, m.limits.max_seq_len) == (4, 256)
    assert (tmp_path / "e" / "tokenizer.json").is_file()
    assert (tmp_path / "e" / "chat_template.jinja").is_file()
    assert build(model, tmp_path / "e") == 2  # exists: --force to replace
    assert build(model, tmp_path / "e", "--force") == 0
    assert main(["inspect", str(tmp_path / "e")]) == 0
    report = capsys.readouterr().out
    assert "trtllm-llmapi" in report and "weights checkpoint" in report


@pytest.mark.parametrize(("algo", "kv", "weights", "kv_dtype"), [
    ("FP8", "FP8", "fp8", "fp8"), ("W4A16_AWQ", None, "int4_awq", "auto"),
    ("W8A16", None, "int8", "auto"), ("W4A16", None, "int4", "auto")])
def test_quantization_comes_from_the_checkpoint(tmp_path: Path, algo: str, kv: str | None,
                                                weights: str, kv_dtype: str) -> None:
    model = quantized(hf_checkpoint(tmp_path / "hf"), algo, kv)
    assert build(model, tmp_path / "e") == 0
    q = Manifest.load(tmp_path / "e").quantization
    assert (q.weights, q.kv_cache_dtype, q.quant_algo) == (weights, kv_dtype, algo)
    assert build(model, tmp_path / "f", "--quant", weights) == 0


def test_asking_for_another_quantization_says_how_to_get_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = hf_checkpoint(tmp_path / "hf")
    assert build(model, tmp_path / "e", "--quant", "fp8") == 2
    err = capsys.readouterr().err
    assert "holds none weights" in err and "Model Optimizer" in err
    assert not (tmp_path / "e").exists()
    assert build(quantized(model, "NVFP4"), tmp_path / "e") == 2
    assert "NVFP4" in capsys.readouterr().err


def test_speculative_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = hf_checkpoint(tmp_path / "hf")
    draft = hf_checkpoint(tmp_path / "draft", layers=1)
    assert build(model, tmp_path / "dt", "--speculative", "draft_target", "--draft", str(draft),
                 "--max-draft-len", "3") == 0
    spec = Manifest.load(tmp_path / "dt").speculative
    assert spec is not None and (spec.mode, spec.max_draft_len, spec.model) == (
        "draft_target", 3, str(draft.resolve()))
    assert build(model, tmp_path / "ng", "--speculative", "ngram") == 0
    ngram = Manifest.load(tmp_path / "ng").speculative
    assert ngram is not None and (ngram.mode, ngram.max_matching_ngram_size) == ("ngram", 2)
    assert build(model, tmp_path / "x", "--speculative", "eagle3") == 2  # needs --draft
    assert build(model, tmp_path / "x", "--draft", str(draft)) == 2  # needs --speculative
    other = hf_checkpoint(tmp_path / "other", vocab=300)
    assert build(model, tmp_path / "x", "--speculative", "draft_target", "--draft",
                 str(other)) == 2
    assert "share the tokenizer" in capsys.readouterr().err


def test_a_built_directory_serves(llmapi: Any, tmp_path: Path) -> None:
    model = hf_checkpoint(tmp_path / "hf")
    assert build(model, tmp_path / "e", "--speculative", "ngram") == 0
    ex = load_executor(tmp_path / "e")
    try:
        ex.enqueue(ExecRequest(1, (104, 105), SamplingParams(temperature=0.0, max_tokens=8)))
        deltas = collect(ex, [1])[1]
        assert deltas[-1].finish is FinishReason.LENGTH
        assert sum(len(d.token_ids) for d in deltas) == 8
    finally:
        ex.shutdown()
