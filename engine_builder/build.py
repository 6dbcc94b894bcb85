"""Writing a cpu engine directory from a ``SourceModel``: quantize, save, describe.

The directory is assembled in a temporary sibling and renamed into place, so a reader (or a
second builder racing this one) sees either no engine or a complete one, never half of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from backfill.progress import progress
from engine_builder.manifest import (
    BLOCK_TYPES_KEY,
    CPU_KV_DTYPES,
    CPU_WEIGHT_QUANTS,
    Architecture,
    DraftInfo,
    FieldError,
    Limits,
    Manifest,
    Provenance,
    Quantization,
    TokenizerInfo,
    atomic_write_text,
)
from engine_builder.quantize import check_int4_shape, quantize_int4, quantize_int8
from engine_builder.source import (
    SourceBlocks,
    SourceModel,
    check_same_tokenizer,
    expected_shapes,
    is_quantizable,
)

WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_INT4_GROUP_SIZE = 32
# The default KV pool holds max_batch_size sequences of this many tokens.
DEFAULT_KV_TOKENS_PER_SEQUENCE = 1024
DRAFT_DIR = "draft"
DEFAULT_MAX_DRAFT_LEN = 4
DEFAULT_DRAFT_QUANT = "int8"
# A draft engine's KV pool is this fraction of the target's: it holds only the sequences
# that speculate (online ones, by default), and a sequence it has no room for decodes plainly.
DRAFT_KV_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """Everything ``build --backend cpu`` takes besides the model; the CLI flags come from here.

    ``group_size`` and ``num_kv_blocks`` left as None get derived defaults (see ``resolve``).
    """

    quant: str = "none"  # "none" | "int8" | "int4" | "source" (a GGUF file's own blocks)
    group_size: int | None = None  # int4 only; None means DEFAULT_INT4_GROUP_SIZE
    kv_cache_dtype: str = "float32"  # "float32" | "int8"
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_num_tokens: int = 512
    tokens_per_block: int = 16
    num_kv_blocks: int | None = None  # None: enough for max_batch_size ~1024-token sequences

    def __post_init__(self) -> None:
        if self.quant not in CPU_WEIGHT_QUANTS:
            raise FieldError("quant", f"must be one of {sorted(CPU_WEIGHT_QUANTS)}, "
                             f"got {self.quant!r}")
        if self.kv_cache_dtype not in CPU_KV_DTYPES:
            raise FieldError("kv_cache_dtype", f"must be one of {sorted(CPU_KV_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.group_size is not None:
            if self.quant != "int4":
                raise FieldError("group_size", f"only applies to --quant int4, not {self.quant}")
            if self.group_size < 2 or self.group_size % 2:
                raise FieldError("group_size", f"must be even and >= 2, got {self.group_size}")
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "tokens_per_block",
                     "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FieldError(name, f"must be >= 1, got {value}")

    @property
    def int4_group_size(self) -> int:
        return self.group_size if self.group_size is not None else DEFAULT_INT4_GROUP_SIZE

    def quantization(self) -> Quantization:
        group = self.int4_group_size if self.quant == "int4" else None
        return Quantization(weights=self.quant, group_size=group,
                            kv_cache_dtype=self.kv_cache_dtype)

    def limits(self, arch: Architecture) -> Limits:
        """The engine's limits; FieldError (named like the flag) when the model rules them out."""
        if self.max_seq_len > arch.max_position_embeddings:
            raise FieldError("max_seq_len", f"{self.max_seq_len} exceeds the model's "
                             f"max_position_embeddings {arch.max_position_embeddings}")
        blocks_per_seq = -(-self.max_seq_len // self.tokens_per_block)
        if self.num_kv_blocks is None:
            tokens = min(DEFAULT_KV_TOKENS_PER_SEQUENCE, self.max_seq_len)
            num_blocks = max(self.max_batch_size * -(-tokens // self.tokens_per_block),
                             blocks_per_seq)
        elif self.num_kv_blocks < blocks_per_seq:
            raise FieldError("num_kv_blocks", f"{self.num_kv_blocks} blocks cannot hold one "
                             f"{self.max_seq_len}-token sequence (needs {blocks_per_seq})")
        else:
            num_blocks = self.num_kv_blocks
        return Limits(max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len,
                      max_num_tokens=self.max_num_tokens, tokens_per_block=self.tokens_per_block,
                      num_kv_blocks=num_blocks)

    def check_model(self, arch: Architecture) -> None:
        """FieldError when the options cannot apply to this architecture."""
        self.limits(arch)
        if self.quant == "int4":
            for name, shape in expected_shapes(arch).items():
                if is_quantizable(name):
                    try:
                        check_int4_shape(shape, self.int4_group_size)
                    except ValueError as exc:
                        raise FieldError("group_size", f"{exc} ({name})") from exc


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(BuildOptions))


def _quantized(name: str, w: np.ndarray | SourceBlocks, options: BuildOptions,
               block_types: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """The engine tensors for one source tensor; ``block_types`` collects, for "source"
    engines, the GGML type of every ``<name>.blocks`` tensor (the weights file's metadata)."""
    stem = name.removesuffix(".weight")
    if isinstance(w, SourceBlocks):
        if is_quantizable(name):
            block_types[f"{stem}.blocks"] = w.qtype
            yield f"{stem}.blocks", np.ascontiguousarray(w.data, dtype=np.uint8)
            return
        w = _dequantized(w)  # a norm stored quantized: the engine keeps norms in float32
    if options.quant in ("none", "source") or not is_quantizable(name):
        yield name, np.ascontiguousarray(w, dtype=np.float32)
        return
    if options.quant == "int8":
        qweight, scales = quantize_int8(w)
    else:
        qweight, scales = quantize_int4(w, options.int4_group_size)
    yield f"{stem}.qweight", qweight
    yield f"{stem}.scales", scales


def _dequantized(blocks: SourceBlocks) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = dequantize(blocks.data, GGMLQuantizationType[blocks.qtype])
    return np.asarray(w, dtype=np.float32).reshape(blocks.shape)


def check_source(source: SourceModel, options: BuildOptions) -> None:
    """FieldError (on quant) when the options ask for blocks the source does not have."""
    if options.quant == "source" and source.blocks is None:
        raise FieldError("quant", f"source keeps a GGUF file's own quantized blocks; "
                         f"{source.source} is not a GGUF file")


def _source_tensors(source: SourceModel, options: BuildOptions) -> Iterator[
        tuple[str, np.ndarray | SourceBlocks]]:
    check_source(source, options)
    if options.quant == "source" and source.blocks is not None:
        return source.blocks()
    return iter(source.tensors())


def engine_tensors(source: SourceModel, options: BuildOptions) -> tuple[dict[str, np.ndarray],
                                                                        dict[str, str]]:
    """All tensors of the engine, checked against the architecture's expected names/shapes,
    and the GGML block type of each ``.blocks`` tensor (empty unless quant is "source")."""
    wanted = expected_shapes(source.architecture)
    out: dict[str, np.ndarray] = {}
    block_types: dict[str, str] = {}
    seen: set[str] = set()
    actions = {"none": "converting", "source": "keeping the source blocks of"}
    action = actions.get(options.quant, f"quantizing to {options.quant}")
    with progress(total=len(wanted), desc=f"{action} {source.name}", unit="tensor") as bar:
        for name, w in _source_tensors(source, options):
            _check_tensor(source, wanted, seen, name, w)
            out.update(_quantized(name, w, options, block_types))
            bar.update()
    missing = sorted(set(wanted) - seen)
    if missing:
        raise ValueError(f"{source.source}: missing tensor {missing[0]} "
                         f"({len(missing)} missing in all)")
    return out, block_types


def _check_tensor(source: SourceModel, wanted: dict[str, tuple[int, ...]], seen: set[str],
                  name: str, w: np.ndarray | SourceBlocks) -> None:
    if name not in wanted:
        raise ValueError(f"{source.source}: unexpected tensor {name}")
    if tuple(w.shape) != wanted[name]:
        raise ValueError(f"{source.source}: tensor {name} has shape {list(w.shape)}, "
                         f"expected {list(wanted[name])}")
    if name in seen:
        raise ValueError(f"{source.source}: tensor {name} appears twice")
    seen.add(name)


def _tool_versions(extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    tools: dict[str, str] = {}
    for dist, key in (("backfill", "backfill"), ("numpy", "numpy"), ("tokenizers", "tokenizers"),
                      ("safetensors", "safetensors")):
        try:
            tools[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            tools[key] = "unknown"
    tools.update(extra)
    return tools


def make_manifest(source: SourceModel, options: BuildOptions, name: str | None) -> Manifest:
    tok = source.tokenizer
    return Manifest(
        name=name or source.name,
        backend="cpu",
        architecture=source.architecture,
        quantization=options.quantization(),
        limits=options.limits(source.architecture),
        tokenizer=TokenizerInfo(
            file=TOKENIZER_FILE, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
            add_bos=tok.add_bos,
            chat_template_file=CHAT_TEMPLATE_FILE if tok.chat_template is not None else None),
        files={"weights": WEIGHTS_FILE},
        provenance=Provenance(
            source=source.source, source_sha256=source.source_sha256,
            created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            tools=_tool_versions(source.tools)),
    )


@dataclass(frozen=True, slots=True)
class DraftBuild:
    """A draft engine to build into the target's directory (``DIR/draft``)."""

    source: SourceModel
    quant: str = DEFAULT_DRAFT_QUANT
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN

    def __post_init__(self) -> None:
        if self.quant not in CPU_WEIGHT_QUANTS:
            raise FieldError("draft_quant", f"must be one of {sorted(CPU_WEIGHT_QUANTS)}, "
                             f"got {self.quant!r}")
        if self.max_draft_len < 1:
            raise FieldError("max_draft_len", f"must be >= 1, got {self.max_draft_len}")

    def options(self, target: BuildOptions, arch: Architecture) -> BuildOptions:
        """The target's limits and KV type with the draft's quantization and a smaller pool."""
        blocks = target.limits(arch).num_kv_blocks
        per_seq = -(-target.max_seq_len // target.tokens_per_block)
        return dataclasses.replace(target, quant=self.quant, group_size=None,
                                   num_kv_blocks=max(per_seq, int(blocks * DRAFT_KV_FRACTION)))


def build_engine(source: SourceModel, options: BuildOptions, out_dir: Path, *,
                 name: str | None = None, replace: bool = False,
                 draft: DraftBuild | None = None) -> Path:
    """Builds the engine (and its draft engine, when given) into out_dir. An existing out_dir
    is an error unless replace=True. ValueError naming --draft when the draft does not share
    the model's tokenizer."""
    out_dir = Path(out_dir)
    options.check_model(source.architecture)
    check_source(source, options)
    manifest = make_manifest(source, options, name)
    draft_options = None
    if draft is not None:
        check_same_tokenizer(source, draft.source)
        draft_options = draft.options(options, source.architecture)
        draft_options.check_model(draft.source.architecture)
        check_source(draft.source, draft_options)
        manifest = dataclasses.replace(manifest, draft=DraftInfo(DRAFT_DIR, draft.max_draft_len))
    if out_dir.exists() and not replace:
        raise FileExistsError(f"{out_dir}: already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the engine is not
    try:
        write_engine_files(tmp, source, options, manifest)
        if draft is not None and draft_options is not None:
            write_engine_files(tmp / DRAFT_DIR, draft.source, draft_options,
                               make_manifest(draft.source, draft_options, None))
        install_dir(tmp, out_dir, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_engine_files(directory: Path, source: SourceModel, options: BuildOptions,
                       manifest: Manifest) -> None:
    """Weights, tokenizer, chat template and manifest of one engine into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, block_types = engine_tensors(source, options)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={BLOCK_TYPES_KEY: json.dumps(
        block_types, sort_keys=True)} if block_types else None)
    atomic_write_text(directory / TOKENIZER_FILE, source.tokenizer.tokenizer_json)
    if source.tokenizer.chat_template is not None:
        atomic_write_text(directory / CHAT_TEMPLATE_FILE, source.tokenizer.chat_template)
    manifest.save(directory)


def install_dir(tmp: Path, out_dir: Path, *, replace: bool) -> None:
    """Renames a finished tmp directory to out_dir, moving an old one aside first."""
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not replace or not out_dir.exists():
            raise
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, trash / out_dir.name)
    os.rename(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)
