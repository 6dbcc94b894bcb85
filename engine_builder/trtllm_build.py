"""``python -m engine_builder build --backend trtllm``: TensorRT-LLM engines from an HF checkpoint.

Three steps, each a subprocess whose log streams straight to the terminal (TensorRT-LLM 1.2.1):

1. convert/quantize the Hugging Face checkpoint into a TensorRT-LLM checkpoint:
   ``examples/models/core/llama/convert_checkpoint.py`` for none/int8/int4 weight-only
   (W8A16, W4A16 per channel), ``examples/quantization/quantize.py --qformat int4_awq`` for AWQ
   (the convert script leaves AWQ to ModelOpt); KV-cache quantization is chosen here;
2. ``trtllm-build`` with paged KV cache and paged context FMHA spelled out (their defaults
   moved between versions; KV block reuse needs paged context FMHA);
3. with ``--draft``: the draft engine into ``DIR/draft/`` (a full engine directory), and the
   target built with ``--speculative_decoding_mode draft_tokens_external --max_draft_len K``.

Subprocesses rather than the Python API: the CLI flags are the documented, stable surface of
1.2.x, and the exact commands are printed and unit-tested. The example scripts ship in the
TensorRT-LLM source tree and the release image (``/app/tensorrt_llm/examples``), not in the
wheel: point ``--trtllm-examples`` or ``$TRTLLM_EXAMPLES`` at them.

Exit codes: 0 built; 1 a step failed; 2 bad input, or no ``tensorrt_llm`` / GPU / examples.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_builder.manifest import DraftInfo, Limits, Quantization
from engine_builder.source import SourceModel, check_same_tokenizer
from engine_builder.trtllm_manifest import (
    KV_QUANT_ALGOS,
    WEIGHT_QUANT_ALGOS,
    CheckpointMismatch,
    EngineDirSpec,
    check_checkpoint_quant,
    kv_blocks_estimate,
    quantization,
    read_source,
    write_engine_dir,
)
from engine_builder.usage import backend_flags, check_positive, given

DEFAULT_EXAMPLES = Path("/app/tensorrt_llm/examples")  # where the release image keeps them
CONVERT_SCRIPT = Path("models/core/llama/convert_checkpoint.py")
QUANTIZE_SCRIPT = Path("quantization/quantize.py")
AWQ_GROUP_SIZE = 128  # quantize.py --awq_block_size default

# Runs argv (logs streaming to our stdout/stderr) and returns its exit status.
Runner = Callable[[Sequence[str]], int]


class BuildFailed(RuntimeError):
    """A build step failed; the message names the step."""


@dataclass(frozen=True, slots=True)
class TrtllmBuildOptions:
    """Everything one trtllm build takes. Validated at construction (ValueError)."""

    model: Path
    output: Path
    quant: str = "none"  # none | int8 | int4 | int4_awq
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | int8 | fp8
    draft: Path | None = None  # HF checkpoint of a smaller model sharing the tokenizer
    max_draft_len: int = 4
    tp_size: int = 1
    max_batch_size: int = 64
    max_seq_len: int = 4096
    max_num_tokens: int = 8192
    tokens_per_block: int = 32
    dtype: str = "float16"  # activations and unquantized weights
    examples: Path = DEFAULT_EXAMPLES
    calib_dataset: str | None = None  # AWQ / KV-cache calibration data (path or HF name)
    name: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.quant not in WEIGHT_QUANT_ALGOS:
            raise ValueError(f"--quant: must be one of {sorted(WEIGHT_QUANT_ALGOS)} on trtllm, "
                             f"got {self.quant!r}")
        if self.kv_cache_dtype not in KV_QUANT_ALGOS:
            raise ValueError(f"--kv-cache-dtype: must be one of {sorted(KV_QUANT_ALGOS)} on "
                             f"trtllm, got {self.kv_cache_dtype!r}")
        if self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"--dtype: float16 or bfloat16, got {self.dtype!r}")
        check_positive((("--max-draft-len", self.max_draft_len), ("--tp-size", self.tp_size),
                        ("--max-batch-size", self.max_batch_size),
                        ("--max-seq-len", self.max_seq_len),
                        ("--max-num-tokens", self.max_num_tokens),
                        ("--tokens-per-block", self.tokens_per_block)))
        if self.max_seq_len < 2:
            raise ValueError("--max-seq-len: must leave room for one generated token")

    @property
    def group_size(self) -> int | None:
        """Only AWQ is group-wise; W4A16 from the convert script has one scale per channel."""
        return AWQ_GROUP_SIZE if self.quant == "int4_awq" else None


def add_trtllm_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The trtllm-only build flags (the shared ones come from the main build parser). The CLI
    may add them to its build parser (or an argument group, for --help) or leave them in
    ``args.extra_args``: ``options_from_args`` reads both."""
    parser.add_argument("--draft", type=Path, default=None, metavar="HF_DIR",
                        help="draft model for draft-target speculative decoding")
    parser.add_argument("--max-draft-len", type=int, default=None, metavar="K",
                        help="draft tokens per step (default: 4)")
    parser.add_argument("--tp-size", type=int, default=None, metavar="N",
                        help="tensor-parallel GPUs inside the engine (default: 1)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default=None)
    parser.add_argument("--trtllm-examples", type=Path, default=None, metavar="DIR",
                        help="TensorRT-LLM examples/ (default: $TRTLLM_EXAMPLES or "
                             f"{DEFAULT_EXAMPLES})")
    parser.add_argument("--calib-dataset", default=None,
                        help="calibration data for int4_awq and int8/fp8 KV cache")


def options_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None
                      ) -> TrtllmBuildOptions:
    """Shared build flags (None = not given) + ``args.extra_args`` parsed as trtllm flags."""
    extra = backend_flags(args, add_trtllm_arguments, "trtllm")
    env = os.environ if environ is None else environ
    if getattr(args, "group_size", None) is not None:
        raise ValueError("--group-size: not used on trtllm (int4_awq uses 128; int4 is "
                         "per-channel)")
    if getattr(args, "num_kv_blocks", None) is not None:
        raise ValueError("--num-kv-blocks: not used on trtllm (the KV pool is sized from free "
                         "GPU memory when the engine starts; see BACKFILL_TRTLLM_KV_FRACTION)")
    values = given(args, extra, ("draft", "max_draft_len", "tp_size", "dtype", "calib_dataset"))
    examples = extra.trtllm_examples or (Path(env["TRTLLM_EXAMPLES"])
                                         if env.get("TRTLLM_EXAMPLES") else None)
    if examples is not None:
        values["examples"] = examples
    return TrtllmBuildOptions(model=Path(args.model), output=Path(args.output),
                              name=getattr(args, "name", None),
                              force=bool(getattr(args, "force", False)), **values)


# -- commands -------------------------------------------------------------------------------


def convert_command(opts: TrtllmBuildOptions, model_dir: Path, ckpt_dir: Path,
                    python: str = sys.executable) -> list[str]:
    """HF checkpoint -> TensorRT-LLM checkpoint, quantized as asked."""
    if opts.quant == "int4_awq":
        argv = [python, str(opts.examples / QUANTIZE_SCRIPT), "--model_dir", str(model_dir),
                "--output_dir", str(ckpt_dir), "--dtype", opts.dtype, "--qformat", "int4_awq",
                "--awq_block_size", str(AWQ_GROUP_SIZE), "--tp_size", str(opts.tp_size)]
        if opts.kv_cache_dtype != "auto":
            argv += ["--kv_cache_dtype", opts.kv_cache_dtype]
    else:
        argv = [python, str(opts.examples / CONVERT_SCRIPT), "--model_dir", str(model_dir),
                "--output_dir", str(ckpt_dir), "--dtype", opts.dtype,
                "--tp_size", str(opts.tp_size)]
        if opts.quant != "none":
            argv += ["--use_weight_only", "--weight_only_precision", opts.quant]
        if opts.kv_cache_dtype != "auto":
            argv += [f"--{opts.kv_cache_dtype}_kv_cache"]
    if opts.calib_dataset and (opts.quant == "int4_awq" or opts.kv_cache_dtype != "auto"):
        argv += ["--calib_dataset", opts.calib_dataset]
    return argv


def build_command(opts: TrtllmBuildOptions, ckpt_dir: Path, engine_dir: Path, *,
                  draft_len: int | None = None) -> list[str]:
    """trtllm-build with every behaviour-changing plugin flag explicit."""
    argv = ["trtllm-build", "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(engine_dir),
            "--max_batch_size", str(opts.max_batch_size),
            "--max_input_len", str(opts.max_seq_len - 1),
            "--max_seq_len", str(opts.max_seq_len),
            "--max_num_tokens", str(opts.max_num_tokens),
            "--kv_cache_type", "paged",
            "--use_paged_context_fmha", "enable",
            "--tokens_per_block", str(opts.tokens_per_block),
            "--gemm_plugin", "auto"]
    if draft_len is not None:
        argv += ["--speculative_decoding_mode", "draft_tokens_external",
                 "--max_draft_len", str(draft_len)]
    return argv


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    argv: list[str]


@dataclass(frozen=True, slots=True)
class Plan:
    """The commands of one build, in order, over a staging directory."""

    staging: Path
    steps: list[Step] = field(default_factory=list)


def plan(opts: TrtllmBuildOptions, staging: Path, python: str = sys.executable) -> Plan:
    work = staging / ".work"
    steps = []
    if opts.draft is not None:
        steps += [Step("convert draft", convert_command(opts, opts.draft, work / "draft-ckpt",
                                                        python)),
                  Step("build draft", build_command(opts, work / "draft-ckpt",
                                                    staging / "draft" / "engine"))]
    draft_len = opts.max_draft_len if opts.draft is not None else None
    steps += [Step("convert", convert_command(opts, opts.model, work / "ckpt", python)),
              Step("build", build_command(opts, work / "ckpt", staging / "engine",
                                          draft_len=draft_len))]
    return Plan(staging, steps)


# -- environment ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """What the build needs from the machine; tests pass their own."""

    tensorrt_llm_version: Callable[[], str | None]  # None: not importable
    gpu_names: Callable[[], list[str]]
    which: Callable[[str], str | None]


def system_probe() -> Probe:
    return Probe(tensorrt_llm_version=_tensorrt_llm_version, gpu_names=_gpu_names,
                 which=shutil.which)


def _tensorrt_llm_version() -> str | None:
    from importlib import metadata, util

    if util.find_spec("tensorrt_llm") is None:
        return None
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("GPU ")]


def environment_problem(opts: TrtllmBuildOptions, probe: Probe) -> str | None:
    """Why this machine cannot build TensorRT-LLM engines, or None."""
    hint = " (the cpu backend works without it: --backend cpu)"
    if probe.tensorrt_llm_version() is None:
        return ("tensorrt_llm is not installed: pip install 'backfill[trtllm]' "
                "(tensorrt-llm==1.2.1) or use docker/Dockerfile" + hint)
    gpus = probe.gpu_names()
    if not gpus:
        return "no NVIDIA GPU found (nvidia-smi -L lists none)" + hint
    if len(gpus) < opts.tp_size:
        return f"--tp-size {opts.tp_size} needs {opts.tp_size} GPUs, found {len(gpus)}"
    if probe.which("trtllm-build") is None:
        return "trtllm-build is not on PATH (it comes with the tensorrt_llm package)"
    script = QUANTIZE_SCRIPT if opts.quant == "int4_awq" else CONVERT_SCRIPT
    if not (opts.examples / script).is_file():
        return (f"{opts.examples / script} not found: point --trtllm-examples or "
                "$TRTLLM_EXAMPLES at TensorRT-LLM 1.2.1's examples/ directory")
    return None


def subprocess_runner(argv: Sequence[str]) -> int:
    """Runs argv with our stdout/stderr, so its log streams as it is written."""
    return subprocess.run(list(argv), check=False).returncode


# -- the build ------------------------------------------------------------------------------


def run_plan(build: Plan, runner: Runner) -> None:
    for number, step in enumerate(build.steps, 1):
        print(f"[{number}/{len(build.steps)}] {step.label}: {' '.join(step.argv)}", flush=True)
        status = runner(step.argv)
        if status != 0:
            raise BuildFailed(f"{step.label} failed (exit status {status}): "
                              f"{' '.join(step.argv)}")


@dataclass(frozen=True, slots=True)
class Prepared:
    """What is known before any step runs: bad input fails here, not after an hour."""

    target: SourceModel
    draft: SourceModel | None
    quantization: Quantization
    limits: Limits


def prepare(opts: TrtllmBuildOptions) -> Prepared:
    """Reads the checkpoints' configs and tokenizers; ValueError for anything unbuildable."""
    target = read_source(opts.model)
    draft = read_source(opts.draft) if opts.draft is not None else None
    if draft is not None:
        check_same_tokenizer(target, draft)
    sizes = {"max_batch_size": opts.max_batch_size, "max_seq_len": opts.max_seq_len,
             "tokens_per_block": opts.tokens_per_block}
    limits = Limits(max_num_tokens=opts.max_num_tokens,
                    num_kv_blocks=kv_blocks_estimate(sizes), **sizes)
    return Prepared(target, draft, quantization(opts.quant, opts.group_size,
                                                opts.kv_cache_dtype), limits)


def build(opts: TrtllmBuildOptions, ready: Prepared, version: str, runner: Runner) -> Path:
    """Builds into DIR.partial, writes the manifest(s), then renames into place."""
    if opts.output.exists() and not opts.force:
        raise ValueError(f"--output: {opts.output} already exists (pass --force to replace it)")
    staging = opts.output.with_name(opts.output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    run_plan(plan(opts, staging), runner)
    work = staging / ".work"
    draft_info = None
    if ready.draft is not None:
        check_checkpoint_quant(work / "draft-ckpt", ready.quantization)
        write_engine_dir(EngineDirSpec(ready.draft, staging / "draft", ready.quantization,
                                       ready.limits, version))
        draft_info = DraftInfo(path="draft", max_draft_len=opts.max_draft_len)
    check_checkpoint_quant(work / "ckpt", ready.quantization)
    write_engine_dir(EngineDirSpec(ready.target, staging, ready.quantization, ready.limits,
                                   version, draft=draft_info, name=opts.name))
    shutil.rmtree(work, ignore_errors=True)  # checkpoints: as large as the weights, not needed
    if opts.output.exists():
        shutil.rmtree(opts.output)
    staging.rename(opts.output)
    return opts.output


def main_build(args: argparse.Namespace, *, probe: Probe | None = None,
               runner: Runner | None = None) -> int:
    """Entry point the engine_builder CLI calls for ``build --backend trtllm``."""
    probe = probe or system_probe()
    try:
        opts = options_from_args(args)
        problem = environment_problem(opts, probe)
        if problem is not None:
            print(f"build --backend trtllm: error: {problem}", file=sys.stderr)
            return 2
        ready = prepare(opts)
        out = build(opts, ready, probe.tensorrt_llm_version() or "unknown",
                    runner or subprocess_runner)
    except ValueError as exc:  # bad flags or checkpoints, found before anything ran
        print(f"build --backend trtllm: error: {exc}", file=sys.stderr)
        return 2
    except (BuildFailed, CheckpointMismatch, OSError) as exc:
        print(f"build --backend trtllm: failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {out}: quant {opts.quant}, kv cache {opts.kv_cache_dtype}"
          + (f", draft {opts.draft} (K={opts.max_draft_len})" if opts.draft else ""))
    return 0
