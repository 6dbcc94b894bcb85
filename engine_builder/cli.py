"""``python -m engine_builder``: fetch-default, fetch-model, build, inspect, run, profile.

Exit codes: 0 success, 1 a failure while working (download, unreadable checkpoint), 2 bad
command-line input, with a message naming the flag. ``build`` flags are generated from
``BuildOptions`` and default to None, so the defaults live only in that dataclass.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from engine_builder import inspect_cmd, profile, run_cmd
from engine_builder.build import (
    DEFAULT_DRAFT_QUANT,
    DEFAULT_INT4_GROUP_SIZE,
    DEFAULT_KV_TOKENS_PER_SEQUENCE,
    DEFAULT_MAX_DRAFT_LEN,
    BuildOptions,
    DraftBuild,
    build_engine,
    check_source,
)
from engine_builder.fetch import (
    DEFAULT_MODEL,
    MODELS,
    PublishedModel,
    fetch_model,
    is_fetched,
    published_model,
)
from engine_builder.footprint import footprint, human_bytes
from engine_builder.gguf_source import load_gguf
from engine_builder.hf_source import SourceError, load_hf_checkpoint
from engine_builder.manifest import (
    CPU_KV_DTYPES,
    CPU_WEIGHT_QUANTS,
    TRTLLM_KV_DTYPES,
    WEIGHT_QUANTS,
    FieldError,
    Manifest,
    ManifestError,
)
from engine_builder.source import SourceModel, check_same_tokenizer
from engine_builder.usage import UsageError

PROG = "python -m engine_builder"
# GPU backends -> the module whose main_build(args) builds for it, imported only when used.
GPU_BUILDERS = {"trtllm": "engine_builder.trtllm_build",
                "trtllm-llmapi": "engine_builder.llmapi_build"}
GGUF_MAGIC = b"GGUF"
_OPTION_HELP = {
    "quant": "weight quantization ('source': a GGUF file's own quantized blocks, as they are)",
    "group_size": f"int4: input columns per scale group (cpu: {DEFAULT_INT4_GROUP_SIZE})",
    "kv_cache_dtype": "KV-cache element type",
    "max_batch_size": "sequences per step",
    "max_seq_len": "prompt + generated tokens per sequence",
    "max_num_tokens": "prefill + decode tokens per step",
    "tokens_per_block": "tokens per KV-cache block",
    "num_kv_blocks": "KV-cache blocks (cpu: room for max-batch-size sequences of "
                     f"{DEFAULT_KV_TOKENS_PER_SEQUENCE} tokens)",
}
# Both backends' values are accepted by the parser; each backend rejects what it cannot build.
_OPTION_CHOICES: dict[str, list[str]] = {
    "quant": sorted(WEIGHT_QUANTS),
    "kv_cache_dtype": sorted(CPU_KV_DTYPES | TRTLLM_KV_DTYPES),
}


def flag_name(option: str) -> str:
    return "--" + option.replace("_", "-")


def _add_build_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("build", help="build an engine from a GGUF file or HF checkpoint")
    p.add_argument("--backend", choices=["cpu", *GPU_BUILDERS], default="cpu")
    p.add_argument("--model", required=True,
                   help=f"'default', a published model ({', '.join(sorted(MODELS))}), a .gguf "
                   "file, or a Hugging Face checkpoint directory")
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--name", help="engine name in the manifest (default: from the model)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    for f in fields(BuildOptions):
        kind = str if f.name in _OPTION_CHOICES else int
        default = "" if f.default is None or f.default is MISSING else f" (cpu: {f.default})"
        p.add_argument(flag_name(f.name), dest=f.name, type=kind, default=None,
                       choices=_OPTION_CHOICES.get(f.name),
                       help=f"{_OPTION_HELP[f.name]}{default}")
    p.add_argument("--draft", type=Path, default=None, metavar="SOURCE",
                   help="draft model for speculative decoding, sharing the model's tokenizer "
                        "(cpu: 'default', a .gguf file or a Hugging Face checkpoint directory; "
                        "trtllm: a Hugging Face checkpoint directory)")
    p.add_argument("--draft-quant", default=None, choices=sorted(CPU_WEIGHT_QUANTS),
                   help=f"cpu: the draft engine's weight quantization (default "
                        f"{DEFAULT_DRAFT_QUANT})")
    p.add_argument("--max-draft-len", type=int, default=None, metavar="K",
                   help=f"drafted tokens verified per step, at most (default "
                        f"{DEFAULT_MAX_DRAFT_LEN})")
    p.set_defaults(handler=run_build)


def build_options(args: argparse.Namespace) -> BuildOptions:
    given = {f.name: getattr(args, f.name) for f in fields(BuildOptions)
             if getattr(args, f.name) is not None}
    try:
        return BuildOptions(**given)
    except FieldError as exc:
        raise UsageError(flag_name(exc.name), exc.message) from exc


def open_model(model: str, flag: str = "--model") -> SourceModel:
    """'default', a published model, a GGUF file or a Hugging Face directory; UsageError
    naming ``flag`` if not."""
    if model == "default" or model in MODELS:
        published = published_model(model)
        source = load_gguf(_fetch(published), sha256=published.sha256)
        return replace(source, name=published.name)
    path = Path(model)
    try:
        if path.is_dir():
            return load_hf_checkpoint(path)
        if path.is_file():
            with path.open("rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise UsageError(flag, f"{path}: not a GGUF file (and not a directory)")
            return load_gguf(path)
    except SourceError as exc:
        raise UsageError(flag, str(exc)) from exc
    raise UsageError(flag, f"{path}: no such file or directory (expected 'default', a "
                     f"published model ({', '.join(sorted(MODELS))}), a .gguf file or a Hugging "
                     "Face checkpoint directory)")


def draft_build(args: argparse.Namespace) -> DraftBuild | None:
    """The draft engine the flags ask for; UsageError naming the flag at fault."""
    if args.draft is None:
        for flag in ("draft_quant", "max_draft_len"):
            if getattr(args, flag) is not None:
                raise UsageError(flag_name(flag), "needs --draft")
        return None
    given = {name: getattr(args, name) for name in ("max_draft_len",)
             if getattr(args, name) is not None}
    if args.draft_quant is not None:
        given["quant"] = args.draft_quant
    try:
        return DraftBuild(open_model(str(args.draft), "--draft"), **given)
    except FieldError as exc:
        raise UsageError(flag_name(exc.name), exc.message) from exc


def run_build(args: argparse.Namespace) -> int:
    if args.backend in GPU_BUILDERS:
        return run_gpu_build(args)
    options = build_options(args)
    out: Path = args.output
    if out.exists() and not args.force:
        raise UsageError("--output", f"{out} already exists (pass --force to replace it)")
    start = time.perf_counter()  # reading (and dequantizing) the source counts too
    source = open_model(args.model)
    draft = draft_build(args)
    try:
        options.check_model(source.architecture)
        check_source(source, options)
    except FieldError as exc:
        raise UsageError(flag_name(exc.name), exc.message) from exc
    try:
        if draft is not None:
            check_same_tokenizer(source, draft.source)
            draft_options = draft.options(options, source.architecture)
            draft_options.check_model(draft.source.architecture)
            check_source(draft.source, draft_options)
    except FieldError as exc:  # the draft's own options: its flags are --draft-*
        raise UsageError(flag_name(f"draft_{exc.name}"), exc.message) from exc
    except ValueError as exc:  # the draft does not share the tokenizer
        raise UsageError("--draft", str(exc).removeprefix("--draft: ")) from exc
    build_engine(source, options, out, name=args.name, replace=args.force, draft=draft)
    seconds = time.perf_counter() - start
    manifest = Manifest.load(out)
    fp = footprint(manifest, out)
    print(f"built {out} in {seconds:.1f}s: {manifest.name}, weights {manifest.quantization.weights}"
          f" {human_bytes(fp.weight_bytes)}, kv {manifest.quantization.kv_cache_dtype} "
          f"{human_bytes(fp.kv_cache_bytes)}"
          + (f", draft {draft.quant} (K={draft.max_draft_len})" if draft else ""))
    return 0


def run_gpu_build(args: argparse.Namespace) -> int:
    """Hands over to the backend's ``main_build(args)``, imported only now.

    ``args`` carries every build flag (None where not given, so that backend applies its own
    defaults) and ``args.extra_args``: flags this parser does not know, for that backend to parse.
    """
    name = GPU_BUILDERS[args.backend]
    if args.draft_quant is not None:
        raise UsageError("--draft-quant", f"cpu only ({args.backend} drafts are built at the "
                         "model's --quant)")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise UsageError("--backend", f"{args.backend}: its builder ({name}) is not part of "
                         "this install") from None
    return int(module.main_build(args))


def _add_fetch_parsers(subparsers: Any) -> None:
    home_help = "cache directory (default: $BACKFILL_HOME or ~/.cache/backfill)"
    p = subparsers.add_parser("fetch-default", help="download the default model (SmolLM2-135M)")
    p.add_argument("--home", type=Path, default=None, help=home_help)
    p.set_defaults(handler=run_fetch, model="default")
    p = subparsers.add_parser("fetch-model", help="download a published model: "
                              + ", ".join(f"{m.name} ({m.terms.split(' (')[0]})"
                                          for m in MODELS.values()))
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--home", type=Path, default=None, help=home_help)
    p.set_defaults(handler=run_fetch)


def _fetch(model: PublishedModel, home: Path | None = None) -> Path:
    """The model's file, fetched when missing, with its terms said when it is not the default
    (whose Apache-2.0 asks nothing of a user)."""
    if model is not DEFAULT_MODEL:
        print(f"{model.name}: {model.terms}", file=sys.stderr)
    return fetch_model(model, home)


def run_fetch(args: argparse.Namespace) -> int:
    model = published_model(args.model)
    present = is_fetched(args.home, model)
    path = _fetch(model, args.home)
    print(f"{path} ({'already present' if present else 'fetched'}, sha256 {model.sha256})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Fetch, build, inspect, run and "
                                     "profile Backfill engines.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_fetch_parsers(subparsers)
    _add_build_parser(subparsers)
    inspect_cmd.add_parser(subparsers)
    run_cmd.add_parser(subparsers)
    profile.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        is_gpu_build = args.command == "build" and args.backend in GPU_BUILDERS
        if extra and not is_gpu_build:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse already printed the usage and the message
        return int(exc.code or 0)
    args.extra_args = extra
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, SourceError, ManifestError, OSError) as exc:  # FetchError included
        print(f"{PROG} {args.command}: failed: {exc}", file=sys.stderr)
        return 1
