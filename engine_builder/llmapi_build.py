"""``python -m engine_builder build --backend trtllm-llmapi``: an engine directory for
``tensorrt_llm.LLM`` on the PyTorch backend, which serves a Hugging Face checkpoint as it is.

Nothing is compiled, so this runs anywhere (no GPU, no tensorrt_llm): it reads the checkpoint,
checks it, and writes DIR/manifest.json (``backend: "trtllm-llmapi"``, ``files.checkpoint``: the
checkpoint's absolute path), DIR/tokenizer.json and the chat template.

Weight quantization on this backend is the checkpoint's own: a TensorRT Model Optimizer export
carries ``hf_quant_config.json`` (``quantization.quant_algo``: FP8, W4A16_AWQ, W8A16, W4A16;
``kv_cache_quant_algo``), which the LLM API reads at load. ``--quant`` states what the
checkpoint must be and fails with the Model Optimizer command when it is not; left out, the
manifest records what the checkpoint is. ``--kv-cache-dtype fp8`` sets ``KvCacheConfig.dtype``.

Speculative decoding runs inside TensorRT-LLM: ``--speculative draft_target --draft HF_DIR``,
``--speculative eagle3 --draft EAGLE3_DIR`` or ``--speculative ngram`` (no draft model).

Exit codes: 0 written; 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine_builder.manifest import (
    SPECULATIVE_MODES,
    Limits,
    Manifest,
    Provenance,
    Quantization,
    SpeculativeInfo,
    TokenizerInfo,
)
from engine_builder.source import SourceModel, check_same_tokenizer
from engine_builder.trtllm_manifest import kv_blocks_estimate, read_source
from engine_builder.usage import backend_flags, check_positive, given

# hf_quant_config.json quant_algo (a TensorRT-LLM QuantAlgo name) -> our --quant.
QUANT_ALGOS: dict[str | None, str] = {None: "none", "W8A16": "int8", "W4A16": "int4",
                                      "W4A16_AWQ": "int4_awq", "FP8": "fp8"}
MODELOPT_HINT = ("quantize it with TensorRT Model Optimizer and export a Hugging Face checkpoint "
                 "(Model-Optimizer/examples/llm_ptq: scripts/huggingface_example.sh --model DIR "
                 "--quant fp8|int4_awq --export_fmt hf), or use a published one such as "
                 "nvidia/Llama-3.1-8B-Instruct-FP8")


@dataclass(frozen=True, slots=True)
class LlmApiBuildOptions:
    """Everything one trtllm-llmapi build takes. Validated at construction (ValueError)."""

    model: Path
    output: Path
    quant: str | None = None  # None: whatever the checkpoint is
    kv_cache_dtype: str = "auto"  # auto (the checkpoint's) | fp8
    speculative: str | None = None  # draft_target | ngram | eagle3
    draft: Path | None = None
    max_draft_len: int = 4
    max_matching_ngram_size: int = 2
    max_batch_size: int = 64
    max_seq_len: int = 4096
    max_num_tokens: int = 8192
    tokens_per_block: int = 32
    name: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.quant is not None and self.quant not in QUANT_ALGOS.values():
            raise ValueError(f"--quant: must be one of {sorted(QUANT_ALGOS.values())} on "
                             f"trtllm-llmapi, got {self.quant!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"--kv-cache-dtype: auto or fp8 on trtllm-llmapi, "
                             f"got {self.kv_cache_dtype!r}")
        if self.speculative not in (None, *SPECULATIVE_MODES):
            raise ValueError(f"--speculative: one of {SPECULATIVE_MODES}, "
                             f"got {self.speculative!r}")
        needs_draft = self.speculative in ("draft_target", "eagle3")
        if needs_draft != (self.draft is not None):
            raise ValueError(f"--draft: needed exactly with --speculative draft_target or "
                             f"eagle3 (got --speculative {self.speculative})")
        check_positive((("--max-draft-len", self.max_draft_len),
                        ("--max-matching-ngram-size", self.max_matching_ngram_size),
                        ("--max-batch-size", self.max_batch_size),
                        ("--max-seq-len", self.max_seq_len),
                        ("--max-num-tokens", self.max_num_tokens),
                        ("--tokens-per-block", self.tokens_per_block)))


def add_llmapi_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The trtllm-llmapi-only flags (the shared ones come from the main build parser)."""
    parser.add_argument("--speculative", choices=SPECULATIVE_MODES, default=None,
                        help="TensorRT-LLM's own drafter")
    parser.add_argument("--draft", type=Path, default=None, metavar="HF_DIR",
                        help="draft model (draft_target) or EAGLE-3 head (eagle3)")
    parser.add_argument("--max-draft-len", type=int, default=None, metavar="K",
                        help="draft tokens per step (default: 4)")
    parser.add_argument("--max-matching-ngram-size", type=int, default=None, metavar="N",
                        help="ngram: longest suffix matched against earlier text (default: 2)")


def options_from_args(args: argparse.Namespace) -> LlmApiBuildOptions:
    """Shared build flags (None = not given) + ``args.extra_args`` parsed as llmapi flags."""
    extra = backend_flags(args, add_llmapi_arguments, "trtllm-llmapi")
    for flag, name in (("--group-size", "group_size"), ("--num-kv-blocks", "num_kv_blocks")):
        if getattr(args, name, None) is not None:
            raise ValueError(f"{flag}: not used on trtllm-llmapi (quantization and the KV pool "
                             "come from the checkpoint and from free GPU memory)")
    values = given(args, extra, ("speculative", "draft", "max_draft_len",
                                 "max_matching_ngram_size"))
    return LlmApiBuildOptions(model=Path(args.model), output=Path(args.output),
                              name=getattr(args, "name", None),
                              force=bool(getattr(args, "force", False)), **values)


def checkpoint_quantization(model_dir: Path, opts: LlmApiBuildOptions) -> Quantization:
    """What the checkpoint is (hf_quant_config.json), checked against --quant."""
    path = model_dir / "hf_quant_config.json"
    section: dict[str, Any] = {}
    if path.is_file():
        try:
            section = json.loads(path.read_text(encoding="utf-8")).get("quantization") or {}
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable ({exc})") from exc
    algo, kv_algo = section.get("quant_algo"), section.get("kv_cache_quant_algo")
    if algo not in QUANT_ALGOS:
        raise ValueError(f"{path}: quant_algo {algo!r} is not one this builder records "
                         f"(supported: {sorted(a for a in QUANT_ALGOS if a)})")
    weights = QUANT_ALGOS[algo]
    if opts.quant is not None and opts.quant != weights:
        raise ValueError(f"--quant {opts.quant}: {model_dir} holds {weights} weights; "
                         f"{MODELOPT_HINT}")
    if kv_algo not in (None, "FP8"):
        raise ValueError(f"{path}: kv_cache_quant_algo {kv_algo!r} is not supported on the "
                         "PyTorch backend here (FP8 or none)")
    kv = "fp8" if opts.kv_cache_dtype == "fp8" or kv_algo == "FP8" else "auto"
    group = (section.get("group_size") or 128) if weights == "int4_awq" else None
    return Quantization(weights=weights, group_size=group, kv_cache_dtype=kv,
                        quant_algo=algo, kv_cache_quant_algo="FP8" if kv == "fp8" else None)


def speculative_info(opts: LlmApiBuildOptions, target: SourceModel) -> SpeculativeInfo | None:
    if opts.speculative is None:
        return None
    if opts.speculative == "ngram":
        return SpeculativeInfo("ngram", opts.max_draft_len,
                               max_matching_ngram_size=opts.max_matching_ngram_size)
    assert opts.draft is not None
    if not (opts.draft / "config.json").is_file():
        raise ValueError(f"--draft: {opts.draft} has no config.json")
    if opts.speculative == "draft_target":
        check_same_tokenizer(target, read_source(opts.draft))
    return SpeculativeInfo(opts.speculative, opts.max_draft_len,
                           model=str(opts.draft.resolve()))


def make_manifest(opts: LlmApiBuildOptions, source: SourceModel) -> Manifest:
    tok = source.tokenizer
    sizes = {"max_batch_size": opts.max_batch_size, "max_seq_len": opts.max_seq_len,
             "tokens_per_block": opts.tokens_per_block}
    return Manifest(
        name=opts.name or source.name,
        backend="trtllm-llmapi",
        architecture=source.architecture,
        quantization=checkpoint_quantization(opts.model, opts),
        limits=Limits(max_num_tokens=opts.max_num_tokens,
                      num_kv_blocks=kv_blocks_estimate(sizes), **sizes),
        tokenizer=TokenizerInfo(file="tokenizer.json", bos_token_id=tok.bos_token_id,
                                eos_token_ids=tok.eos_token_ids, add_bos=tok.add_bos,
                                chat_template_file="chat_template.jinja"
                                if tok.chat_template is not None else None),
        files={"checkpoint": str(opts.model.resolve())},
        provenance=Provenance(
            source=source.source, source_sha256=source.source_sha256,
            created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
        speculative=speculative_info(opts, source),
    )


def write(opts: LlmApiBuildOptions) -> Manifest:
    """DIR with manifest, tokenizer and chat template; ValueError before anything is written."""
    if opts.output.exists() and not opts.force:
        raise ValueError(f"--output: {opts.output} already exists (pass --force to replace it)")
    source = read_source(opts.model)
    manifest = make_manifest(opts, source)
    if opts.output.exists():
        shutil.rmtree(opts.output)
    opts.output.mkdir(parents=True)
    (opts.output / "tokenizer.json").write_text(source.tokenizer.tokenizer_json, encoding="utf-8")
    if source.tokenizer.chat_template is not None:
        (opts.output / "chat_template.jinja").write_text(source.tokenizer.chat_template,
                                                         encoding="utf-8")
    manifest.save(opts.output)
    return manifest


def main_build(args: argparse.Namespace) -> int:
    """Entry point the engine_builder CLI calls for ``build --backend trtllm-llmapi``."""
    try:
        opts = options_from_args(args)
        manifest = write(opts)
    except ValueError as exc:  # bad flags or checkpoints (SourceError and FieldError included)
        print(f"build --backend trtllm-llmapi: error: {exc}", file=sys.stderr)
        return 2
    spec = manifest.speculative
    print(f"wrote {opts.output}: serves {manifest.files['checkpoint']} "
          f"({manifest.quantization.weights}, kv {manifest.quantization.kv_cache_dtype})"
          + (f", {spec.mode} K={spec.max_draft_len}" if spec else ""))
    return 0
