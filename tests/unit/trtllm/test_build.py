"""build --backend trtllm without TensorRT-LLM: the exact commands, the environment checks, the
manifest written. A fake runner stands in for the subprocesses and writes what they would."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine_builder.cli import build_parser
from engine_builder.manifest import Manifest
from engine_builder.trtllm_build import (
    Probe,
    TrtllmBuildOptions,
    build_command,
    convert_command,
    main_build,
)
from tests.unit.trtllm.conftest import byte_tokenizer_json, hf_checkpoint

pytestmark = pytest.mark.unit

PY = sys.executable
EX = Path("/ex")
CONVERT = "/ex/models/core/llama/convert_checkpoint.py"
QUANTIZE = "/ex/quantization/quantize.py"


def opts(**kw: object) -> TrtllmBuildOptions:
    return TrtllmBuildOptions(model=Path("/m"), output=Path("/o"), examples=EX, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("quant", "kv", "tail"), [
    ("none", "auto", []),
    ("int8", "auto", ["--use_weight_only", "--weight_only_precision", "int8"]),
    ("int8", "int8", ["--use_weight_only", "--weight_only_precision", "int8", "--int8_kv_cache"]),
    ("int4", "fp8", ["--use_weight_only", "--weight_only_precision", "int4", "--fp8_kv_cache"]),
])
def test_convert_command(quant: str, kv: str, tail: list[str]) -> None:
    argv = convert_command(opts(quant=quant, kv_cache_dtype=kv), Path("/m"), Path("/c"), PY)
    assert argv == [PY, CONVERT, "--model_dir", "/m", "--output_dir", "/c", "--dtype", "float16",
                    "--tp_size", "1", *tail]


def test_awq_goes_through_modelopt_quantize() -> None:
    argv = convert_command(opts(quant="int4_awq", kv_cache_dtype="int8", tp_size=2,
                                calib_dataset="/data/calib"), Path("/m"), Path("/c"), PY)
    assert argv == [PY, QUANTIZE, "--model_dir", "/m", "--output_dir", "/c", "--dtype", "float16",
                    "--qformat", "int4_awq", "--awq_block_size", "128", "--tp_size", "2",
                    "--kv_cache_dtype", "int8", "--calib_dataset", "/data/calib"]


def test_build_command_is_explicit_and_adds_draft_mode() -> None:
    o = opts(max_batch_size=8, max_seq_len=1024, max_num_tokens=2048)
    base = ["trtllm-build", "--checkpoint_dir", "/c", "--output_dir", "/e",
            "--max_batch_size", "8", "--max_input_len", "1023", "--max_seq_len", "1024",
            "--max_num_tokens", "2048", "--kv_cache_type", "paged",
            "--use_paged_context_fmha", "enable", "--tokens_per_block", "32",
            "--gemm_plugin", "auto"]
    assert build_command(o, Path("/c"), Path("/e")) == base
    assert build_command(o, Path("/c"), Path("/e"), draft_len=5) == [
        *base, "--speculative_decoding_mode", "draft_tokens_external", "--max_draft_len", "5"]


# -- main_build end to end, with a fake runner -------------------------------------------


class FakeRunner:
    """Records argv; writes the config.json the real scripts write (quantization section as
    convert_checkpoint.py's args_to_quant_config / quantize.py produce), and engine files."""

    def __init__(self, fail_step: int | None = None, wrong_algo: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail_step = fail_step
        self.wrong_algo = wrong_algo

    def __call__(self, argv: Sequence[str]) -> int:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_step == len(self.calls):
            return 3
        out = Path(argv[argv.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if argv[0] == "trtllm-build":
            (out / "config.json").write_text(json.dumps({"build_config": {}}))
            (out / "rank0.engine").write_bytes(b"engine")
            return 0
        algo = None
        if "--weight_only_precision" in argv:
            algo = {"int8": "W8A16", "int4": "W4A16"}[argv[argv.index("--weight_only_precision")
                                                          + 1]]
        if "--qformat" in argv:
            algo = "W4A16_AWQ"
        kv = "INT8" if "--int8_kv_cache" in argv else "FP8" if "--fp8_kv_cache" in argv else None
        if "--kv_cache_dtype" in argv:
            kv = argv[argv.index("--kv_cache_dtype") + 1].upper()
        if self.wrong_algo:
            algo = "FP8"
        (out / "config.json").write_text(json.dumps(
            {"architecture": "LlamaForCausalLM",
             "quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv}}))
        return 0


def probe(version: str | None = "1.2.1", gpus: int = 1) -> Probe:
    return Probe(tensorrt_llm_version=lambda: version,
                 gpu_names=lambda: [f"GPU {i}: NVIDIA H100" for i in range(gpus)],
                 which=lambda cmd: f"/usr/bin/{cmd}")


def cli_args(argv: list[str]) -> argparse.Namespace:
    """Parsed by the real engine_builder CLI, as it hands them to main_build."""
    args, extra = build_parser().parse_known_args(argv)
    args.extra_args = extra
    return args


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    for script in ("models/core/llama/convert_checkpoint.py", "quantization/quantize.py"):
        (tmp_path / "examples" / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "examples" / script).write_text("# stand-in")
    return tmp_path / "examples"


def test_builds_target_and_draft_and_writes_the_manifests(tmp_path: Path, examples: Path) -> None:
    model = hf_checkpoint(tmp_path / "model")
    draft = hf_checkpoint(tmp_path / "draft-model", layers=1)
    out = tmp_path / "engine"
    runner = FakeRunner()
    args = cli_args(["build", "--backend", "trtllm", "--model", str(model), "--output", str(out),
                     "--quant", "int8", "--kv-cache-dtype", "int8", "--max-batch-size", "8",
                     "--max-seq-len", "1024", "--draft", str(draft), "--max-draft-len", "5",
                     "--trtllm-examples", str(examples)])
    assert main_build(args, probe=probe(), runner=runner) == 0
    labels = [(c[1] if c[0] != "trtllm-build" else "build") for c in runner.calls]
    assert labels == [str(examples / "models/core/llama/convert_checkpoint.py"), "build",
                      str(examples / "models/core/llama/convert_checkpoint.py"), "build"]
    assert "--speculative_decoding_mode" not in runner.calls[1]  # the draft engine
    assert runner.calls[3][-4:] == ["--speculative_decoding_mode", "draft_tokens_external",
                                    "--max_draft_len", "5"]
    m = Manifest.load(out)
    assert m.backend == "trtllm" and dict(m.files) == {"engine_dir": "engine"}
    q = m.quantization
    assert (q.weights, q.kv_cache_dtype, q.quant_algo, q.kv_cache_quant_algo) == (
        "int8", "int8", "W8A16", "INT8")
    assert m.draft is not None and (m.draft.path, m.draft.max_draft_len) == ("draft", 5)
    assert m.provenance.tools["tensorrt_llm"] == "1.2.1"
    assert (m.limits.max_batch_size, m.limits.max_seq_len, m.limits.tokens_per_block) == (
        8, 1024, 32)
    assert m.tokenizer.eos_token_ids == (256,)
    assert (out / "tokenizer.json").read_text() == byte_tokenizer_json()
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    assert (out / "engine" / "rank0.engine").is_file()
    d = Manifest.load(out / "draft")
    assert d.architecture.num_layers == 1 and d.draft is None
    assert (out / "draft" / "engine" / "rank0.engine").is_file()
    assert not (out / ".work").exists() and not (tmp_path / "engine.partial").exists()


def test_awq_manifest_records_group_size(tmp_path: Path, examples: Path) -> None:
    model = hf_checkpoint(tmp_path / "model")
    out = tmp_path / "engine"
    args = cli_args(["build", "--backend", "trtllm", "--model", str(model), "--output", str(out),
                     "--quant", "int4_awq", "--trtllm-examples", str(examples)])
    assert main_build(args, probe=probe(), runner=FakeRunner()) == 0
    q = Manifest.load(out).quantization
    assert (q.quant_algo, q.group_size, q.kv_cache_dtype, q.kv_cache_quant_algo) == (
        "W4A16_AWQ", 128, "auto", None)


@pytest.mark.parametrize(("version", "gpus", "message"), [
    (None, 1, "tensorrt_llm is not installed"),
    ("1.2.1", 0, "no NVIDIA GPU"),
])
def test_missing_tensorrt_llm_or_gpu_exits_2(tmp_path: Path, examples: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             version: str | None, gpus: int,
                                             message: str) -> None:
    runner = FakeRunner()
    args = cli_args(["build", "--backend", "trtllm", "--model", str(tmp_path / "m"),
                     "--output", str(tmp_path / "o"), "--trtllm-examples", str(examples)])
    assert main_build(args, probe=probe(version, gpus), runner=runner) == 2
    err = capsys.readouterr().err
    assert message in err and "--backend cpu" in err
    assert runner.calls == []


def test_missing_examples_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args(["build", "--backend", "trtllm", "--model", str(tmp_path / "m"),
                     "--output", str(tmp_path / "o"), "--trtllm-examples", str(tmp_path)])
    assert main_build(args, probe=probe(), runner=FakeRunner()) == 2
    assert "TRTLLM_EXAMPLES" in capsys.readouterr().err


def test_a_failed_step_exits_1_and_leaves_no_engine(tmp_path: Path, examples: Path) -> None:
    model = hf_checkpoint(tmp_path / "model")
    out = tmp_path / "engine"
    runner = FakeRunner(fail_step=2)
    args = cli_args(["build", "--backend", "trtllm", "--model", str(model), "--output", str(out),
                     "--trtllm-examples", str(examples)])
    assert main_build(args, probe=probe(), runner=runner) == 1
    assert len(runner.calls) == 2 and not out.exists()


def test_checkpoint_with_other_quantization_fails(tmp_path: Path, examples: Path) -> None:
    model = hf_checkpoint(tmp_path / "model")
    args = cli_args(["build", "--backend", "trtllm", "--model", str(model), "--output",
                     str(tmp_path / "engine"), "--quant", "int8", "--trtllm-examples",
                     str(examples)])
    assert main_build(args, probe=probe(), runner=FakeRunner(wrong_algo=True)) == 1


def test_bad_input_is_caught_before_any_step(tmp_path: Path, examples: Path) -> None:
    model = hf_checkpoint(tmp_path / "model")
    other = hf_checkpoint(tmp_path / "other", vocab=300)
    runner = FakeRunner()
    base = ["build", "--backend", "trtllm", "--model", str(model), "--output",
            str(tmp_path / "engine"), "--trtllm-examples", str(examples)]
    assert main_build(cli_args([*base, "--draft", str(other)]), probe=probe(),
                      runner=runner) == 2  # the draft must share the tokenizer
    assert main_build(cli_args([*base, "--kv-cache-dtype", "float32"]), probe=probe(),
                      runner=runner) == 2
    assert main_build(cli_args([*base, "--tp-size", "2"]), probe=probe(gpus=1),
                      runner=runner) == 2
    assert main_build(cli_args([*base, "--no-such-flag"]), probe=probe(), runner=runner) == 2
    assert main_build(cli_args([*base, "--num-kv-blocks", "100"]), probe=probe(),
                      runner=runner) == 2
    assert runner.calls == []


def test_int4_manifest_records_per_channel_scales(tmp_path: Path, examples: Path) -> None:
    model = hf_checkpoint(tmp_path / "model")
    out = tmp_path / "engine"
    args = cli_args(["build", "--backend", "trtllm", "--model", str(model), "--output", str(out),
                     "--quant", "int4", "--trtllm-examples", str(examples)])
    assert main_build(args, probe=probe(), runner=FakeRunner()) == 0
    q = Manifest.load(out).quantization
    assert (q.quant_algo, q.group_size) == ("W4A16", None)


def test_flags_added_to_the_main_parser_work_too() -> None:
    from engine_builder.trtllm_build import add_trtllm_arguments, options_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--output")
    for name in ("quant", "kv_cache_dtype", "max_batch_size", "max_seq_len", "max_num_tokens",
                 "tokens_per_block"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    add_trtllm_arguments(parser.add_argument_group("trtllm"))
    args = parser.parse_args(["--model", "/m", "--output", "/o", "--draft", "/d",
                              "--max-draft-len", "6", "--tp-size", "2"])
    args.extra_args = []
    o = options_from_args(args, environ={})
    assert (o.draft, o.max_draft_len, o.tp_size) == (Path("/d"), 6, 2)
