"""Engines that keep a GGUF file's own quantized blocks (``--quant source``): the bytes are the
file's, the manifest says so (schema 2), and the engine computes what the float engine built
from the same file computes, on the compiled kernels and on the NumPy reference alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors import safe_open

from engine_builder.build import BuildOptions, build_engine
from engine_builder.cli import main
from engine_builder.gguf_source import load_gguf, unpermute_rotary
from engine_builder.manifest import BLOCK_TYPES_KEY, Manifest, ManifestError
from engine_builder.tiny import write_tiny_checkpoint
from server.executor.base import ExecRequest, SamplingParams
from server.executor.cpu import block_weights
from server.executor.cpu.activations import integer_kernels
from server.executor.cpu.attention import PagedKvCache, PrefillSegment
from server.executor.cpu.drive import collect
from server.executor.cpu.executor import CpuExecutor
from server.executor.cpu.model import ForwardBatch, LlamaModel
from server.executor.cpu.weights import load_weights
from tests.unit.engine_builder.test_gguf import write_tiny_gguf

pytestmark = pytest.mark.unit

# Every layer mixes types, so q/k/v fuse into a stacked linear and gate/up into one of Q4_1.
BLOCK_TYPES = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q4_1"}
for _i in range(2):
    _p = f"model.layers.{_i}."
    BLOCK_TYPES.update({_p + "self_attn.q_proj.weight": "Q4_0",
                        _p + "self_attn.k_proj.weight": "Q4_1",
                        _p + "self_attn.v_proj.weight": "Q8_0",
                        _p + "self_attn.o_proj.weight": "Q4_1",
                        _p + "mlp.gate_proj.weight": "Q4_1", _p + "mlp.up_proj.weight": "Q4_1",
                        _p + "mlp.down_proj.weight": "Q8_0"})


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(GGUF file, source engine, float32 engine built from the same file)."""
    root = tmp_path_factory.mktemp("source")
    checkpoint = write_tiny_checkpoint(root / "hf", seed=5)
    gguf_path = write_tiny_gguf(checkpoint, root / "Tiny.gguf", block_types=BLOCK_TYPES)
    source = load_gguf(gguf_path)
    fp32 = build_engine(source, BuildOptions(), root / "fp32")
    return gguf_path, build_engine(source, BuildOptions(quant="source"), root / "source"), fp32


def test_source_engine_stores_the_files_own_blocks(engines: tuple[Path, Path, Path]) -> None:
    gguf_path, source, _ = engines
    manifest = Manifest.load(source)
    assert manifest.quantization.weights == "source" and manifest.schema_version == 3
    reader = GGUFReader(gguf_path)
    file_blocks = {t.name: np.asarray(t.data) for t in reader.tensors}
    with safe_open(str(source / "weights.safetensors"), framework="numpy") as f:
        types = json.loads(f.metadata()[BLOCK_TYPES_KEY])
        assert types == {k.removesuffix(".weight") + ".blocks": v for k, v in BLOCK_TYPES.items()}
        np.testing.assert_array_equal(f.get_tensor("model.layers.1.self_attn.v_proj.blocks"),
                                      file_blocks["blk.1.attn_v.weight"])
        # Q rows move whole (un-permuted for the half-split RoPE); their bytes are unchanged.
        np.testing.assert_array_equal(f.get_tensor("model.layers.0.self_attn.q_proj.blocks"),
                                      unpermute_rotary(file_blocks["blk.0.attn_q.weight"], 4))
        assert f.get_tensor("model.norm.weight").dtype == np.float32


def _logits(engine: Path, tokens: np.ndarray, activations: str = "float32") -> np.ndarray:
    manifest = Manifest.load(engine)
    model = LlamaModel(load_weights(manifest.weights_path(engine), manifest, activations),
                       manifest.architecture, 64)
    n = len(tokens)
    cache = PagedKvCache(2, 4, 16, 2, 16)
    positions = np.arange(n)
    batch = ForwardBatch(tokens, positions, positions, (PrefillSegment(0, n, 0, np.arange(4)),),
                         None, np.arange(n))
    return model.forward(batch, cache)


@pytest.mark.parametrize(("kernels", "activations", "tolerance"), [
    (True, "float32", 1e-4),
    # inputs quantized to 15 bits per block of 32, integer products
    (True, "int16", 5e-4),
    (False, "float32", 1e-4),
])
def test_source_engine_computes_what_the_float_engine_does(
        engines: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, kernels: bool,
        activations: str, tolerance: float) -> None:
    _, source, fp32 = engines
    if not kernels:
        monkeypatch.setattr(block_weights, "load_kernels", lambda: None)
    elif block_weights.load_kernels() is None:
        pytest.skip("numba is not installed")
    if activations != "float32" and integer_kernels() is None:
        pytest.skip("integer kernels need numba and AVX-512 VNNI")
    tokens = np.random.default_rng(0).integers(3, 280, 20)
    expected = _logits(fp32, tokens)
    np.testing.assert_allclose(_logits(source, tokens, activations), expected,
                               atol=tolerance * np.abs(expected).max())


def test_source_engine_greedy_output_equals_the_float_engine(
        engines: tuple[Path, Path, Path]) -> None:
    _, source, fp32 = engines
    outputs = []
    for engine in (source, fp32):
        executor = CpuExecutor.open(engine)
        try:
            greedy = SamplingParams(max_tokens=12, ignore_eos=True)
            requests = [ExecRequest(i, tuple(range(3 + i, 40 + 7 * i)), greedy) for i in range(4)]
            outputs.append({i: c.token_ids for i, c in collect(executor, requests).items()})
        finally:
            executor.shutdown()
    assert outputs[0] == outputs[1]


def test_source_needs_a_gguf_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "hf")
    assert main(["build", "--model", str(checkpoint), "--quant", "source",
                 "--output", str(tmp_path / "e")]) == 2
    assert "--quant: source keeps a GGUF file's own quantized blocks" in capsys.readouterr().err


def test_version_1_manifests_still_load_and_cannot_claim_source_weights(
        engines: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, source, fp32 = engines
    data = json.loads((fp32 / "manifest.json").read_text())
    data["schema_version"] = 1
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(tmp_path / "v1").schema_version == 1
    data = json.loads((source / "manifest.json").read_text())
    data["schema_version"] = 1
    (tmp_path / "v1s").mkdir()
    (tmp_path / "v1s" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="source weights need schema version >= 2"):
        Manifest.load(tmp_path / "v1s")
