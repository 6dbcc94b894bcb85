"""The engine manifest (docs/engine-format.md, schema version 3): the one reader and writer.

Every section is a frozen, slotted dataclass validated at construction, so a ``Manifest`` that
exists is a valid one. ``Manifest.load`` turns any problem with ``DIR/manifest.json`` into a
``ManifestError`` whose message names the file and the offending field by its JSON path
(``limits.max_batch_size``). Unknown keys are rejected too: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from engine_builder.manifest_json import FieldError, is_int, parse_section

# Written by this build. Older manifests still load (version 1: no "source" weights; version
# 2: no gemma3 family); an older reader refuses a newer version instead of misreading it.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = frozenset({1, 2, 3})
SOURCE_BLOCKS_SCHEMA_VERSION = 2  # the first version with quantization.weights = "source"
GEMMA3_SCHEMA_VERSION = 3  # the first version with architecture.family = "gemma3"
MANIFEST_FILE = "manifest.json"
# For "source" weights: the weights file's metadata key holding JSON {"<name>.blocks": GGML type}.
BLOCK_TYPES_KEY = "backfill.block_types"

BACKENDS = frozenset({"cpu", "trtllm", "trtllm-llmapi"})
# "source": a GGUF file's own quantized blocks, kept as they are (cpu backend only).
CPU_WEIGHT_QUANTS = frozenset({"none", "int8", "int4", "source"})
TRTLLM_WEIGHT_QUANTS = frozenset({"none", "int8", "int4", "int4_awq"})
LLMAPI_WEIGHT_QUANTS = TRTLLM_WEIGHT_QUANTS | {"fp8"}
WEIGHT_QUANTS = CPU_WEIGHT_QUANTS | LLMAPI_WEIGHT_QUANTS
CPU_KV_DTYPES = frozenset({"float32", "int8"})
TRTLLM_KV_DTYPES = frozenset({"auto", "int8", "fp8"})
LLMAPI_KV_DTYPES = frozenset({"auto", "fp8"})
SPECULATIVE_MODES = ("draft_target", "ngram", "eagle3")


class ManifestError(ValueError):
    """A missing, unreadable or invalid manifest; the message says which file and field."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise FieldError(name, message)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 1, name, f"must be >= 1, got {value}")


ROPE_SCALING_TYPES = ("linear", "llama3")
# "llama": pre-norm blocks, SiLU-gated MLP, one RoPE base (Mistral / Qwen2 layouts map onto
# it). "gemma3": pre- and post-norms around attention and MLP, RMS-normed queries and keys,
# GELU(tanh)-gated MLP, embeddings scaled by sqrt(hidden_size), and sliding-window layers
# with a RoPE base of their own (the fields below marked gemma3).
FAMILIES = ("llama", "gemma3")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
_GEMMA3_FIELDS = ("sliding_window", "layer_types", "rope_local_theta", "query_pre_attn_scalar")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Context extension of the rotary embedding, as Hugging Face's ``rope_scaling``.

    ``linear``: every frequency divided by ``factor`` (position interpolation). ``llama3``
    (Llama 3.1+): wavelengths above ``original_max_position_embeddings / low_freq_factor``
    divided by ``factor``, those below ``.../ high_freq_factor`` kept, a smooth blend between.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self) -> None:
        _require(self.rope_type in ROPE_SCALING_TYPES, "rope_type",
                 f"unsupported {self.rope_type!r} (supported: {', '.join(ROPE_SCALING_TYPES)})")
        _require(self.factor > 0, "factor", f"must be > 0, got {self.factor}")
        llama3 = (self.low_freq_factor, self.high_freq_factor,
                  self.original_max_position_embeddings)
        if self.rope_type == "llama3":
            for name, value in zip(("low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings"), llama3, strict=True):
                _require(value is not None and value > 0, name, f"llama3 needs it > 0, got {value}")
            assert self.low_freq_factor is not None and self.high_freq_factor is not None
            _require(self.low_freq_factor < self.high_freq_factor, "high_freq_factor",
                     f"must exceed low_freq_factor {self.low_freq_factor}, got "
                     f"{self.high_freq_factor}")
        else:
            _require(all(v is None for v in llama3), "rope_type",
                     "only llama3 takes low/high_freq_factor and original_max_position_embeddings")


@dataclass(frozen=True, slots=True)
class Architecture:
    """Shapes of a decoder of one of ``FAMILIES``. Invariant: heads divide evenly into KV
    groups; the gemma3 fields are set exactly for gemma3."""

    family: str  # one of FAMILIES
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float  # the RoPE base (gemma3: of the full-attention layers)
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    # gemma3: a query at position p of a sliding layer attends to keys at p - window < k <= p
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # gemma3: one of LAYER_TYPES per layer
    rope_local_theta: float | None = None  # gemma3: the RoPE base of the sliding layers
    query_pre_attn_scalar: float | None = None  # gemma3: scores are scaled by its -1/2 power

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES, "family", f"unsupported family {self.family!r} "
                 f"(supported: {', '.join(FAMILIES)})")
        _positive(self, "num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings")
        _require(self.num_attention_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"{self.num_kv_heads} does not divide num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.family == "gemma3":
            self._check_gemma3()
        else:
            for name in _GEMMA3_FIELDS:
                _require(getattr(self, name) is None, name, "only the gemma3 family takes it")

    def _check_gemma3(self) -> None:
        for name in _GEMMA3_FIELDS:
            _require(getattr(self, name) is not None, name, "gemma3 needs it")
        assert self.layer_types is not None and self.sliding_window is not None
        _require(len(self.layer_types) == self.num_layers, "layer_types",
                 f"has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        _require(not unknown, "layer_types", f"unknown layer type {unknown[:1]} (known: "
                 f"{', '.join(LAYER_TYPES)})")
        _require(self.sliding_window >= 1, "sliding_window",
                 f"must be >= 1, got {self.sliding_window}")
        for name in ("rope_local_theta", "query_pre_attn_scalar"):
            value = getattr(self, name)
            _require(value > 0, name, f"must be > 0, got {value}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends over a sliding window (gemma3's local layers)."""
        return self.layer_types is not None and self.layer_types[layer] == SLIDING_ATTENTION


@dataclass(frozen=True, slots=True)
class Quantization:
    """Weight and KV-cache numerics. ``group_size`` is set exactly for the group-wise int4
    schemes; TensorRT-LLM's plain W4A16 has one scale per output channel (no group size)."""

    weights: str = "none"
    group_size: int | None = None
    kv_cache_dtype: str = "float32"
    quant_algo: str | None = None  # trtllm only: a TensorRT-LLM QuantAlgo name
    kv_cache_quant_algo: str | None = None  # trtllm only

    def __post_init__(self) -> None:
        _require(self.weights in WEIGHT_QUANTS, "weights",
                 f"unknown weight quantization {self.weights!r}")
        per_channel_int4 = self.quant_algo == "W4A16" and self.group_size is None
        if self.weights.startswith("int4") and not per_channel_int4:
            _require(self.group_size is not None and self.group_size >= 2
                     and self.group_size % 2 == 0, "group_size",
                     f"int4 needs an even group_size >= 2, got {self.group_size}")
        else:
            _require(self.group_size is None, "group_size",
                     f"only int4 uses a group size, got {self.group_size} for {self.weights!r}")
        _require(self.kv_cache_dtype in CPU_KV_DTYPES | TRTLLM_KV_DTYPES, "kv_cache_dtype",
                 f"unknown KV-cache dtype {self.kv_cache_dtype!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one engine instance holds; the executor's ``Capacity`` comes from here."""

    max_batch_size: int  # sequences in one step
    max_seq_len: int  # prompt + generated tokens of one sequence
    max_num_tokens: int  # prefill + decode tokens in one step
    tokens_per_block: int  # KV-cache page size
    num_kv_blocks: int  # KV-cache pages in the pool

    def __post_init__(self) -> None:
        _positive(self, "max_batch_size", "max_seq_len", "max_num_tokens", "tokens_per_block",
                  "num_kv_blocks")


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    file: str = "tokenizer.json"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = False  # prepend BOS when encoding plain text
    chat_template_file: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        _require(bool(self.file), "file", "must not be empty")
        _require(len(self.eos_token_ids) >= 1, "eos_token_ids", "needs at least one id")
        _require(all(i >= 0 for i in self.eos_token_ids), "eos_token_ids", "ids must be >= 0")
        _require(self.bos_token_id is None or self.bos_token_id >= 0, "bos_token_id",
                 f"must be >= 0, got {self.bos_token_id}")
        _require(not self.add_bos or self.bos_token_id is not None, "add_bos",
                 "is true but bos_token_id is null")


@dataclass(frozen=True, slots=True)
class DraftInfo:
    path: str  # relative to the engine directory; a full engine directory of its own
    max_draft_len: int

    def __post_init__(self) -> None:
        _require(bool(self.path), "path", "must not be empty")
        _positive(self, "max_draft_len")


STEP_COST_VERSION = 1  # of the step-cost model's feature set (engine_builder/step_cost.py)


@dataclass(frozen=True, slots=True)
class StepCostFit:
    """A fitted step-cost model (engine_builder/step_cost.py), written by ``engine_builder
    profile``. A build that does not know ``version`` ignores the fit (and says so)."""

    version: int
    features: tuple[str, ...]  # names of the coefficients, in order
    intercept_s: float  # seconds of a step that carries anything at all
    coefficients_s: tuple[float, ...]  # seconds per unit of each feature
    num_steps: int  # steps the fit was made from
    median_error: float  # median relative error of the fit on those steps
    blas_threads: int | None  # BLAS threads of the executor while it was measured

    def __post_init__(self) -> None:
        for name in ("features", "coefficients_s"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(len(self.coefficients_s) == len(self.features), "coefficients_s",
                 f"has {len(self.coefficients_s)} entries for {len(self.features)} features")
        _require(self.intercept_s >= 0, "intercept_s", f"must be >= 0, got {self.intercept_s}")
        _require(all(c >= 0 for c in self.coefficients_s), "coefficients_s",
                 "must all be >= 0")
        _positive(self, "num_steps")


@dataclass(frozen=True, slots=True)
class SpeculativeInfo:
    """Speculative decoding inside a ``trtllm-llmapi`` engine (TensorRT-LLM's own drafters)."""

    mode: str  # draft_target | ngram | eagle3
    max_draft_len: int
    model: str | None = None  # draft_target / eagle3: the drafter's checkpoint, DIR-relative
    max_matching_ngram_size: int | None = None  # ngram only

    def __post_init__(self) -> None:
        _require(self.mode in SPECULATIVE_MODES, "mode",
                 f"unknown mode {self.mode!r} (known: {', '.join(SPECULATIVE_MODES)})")
        _positive(self, "max_draft_len")
        if self.mode == "ngram":
            _require(self.model is None, "model", "ngram drafting needs no draft model")
            _require(self.max_matching_ngram_size is not None
                     and self.max_matching_ngram_size >= 1, "max_matching_ngram_size",
                     f"ngram needs it >= 1, got {self.max_matching_ngram_size}")
        else:
            _require(bool(self.model), "model", f"{self.mode} needs a draft model")
            _require(self.max_matching_ngram_size is None, "max_matching_ngram_size",
                     "only ngram takes it")


@dataclass(frozen=True, slots=True)
class Profile:
    """Decode throughput by batch size and the step-cost fit, written by ``engine_builder
    profile``."""

    batch_sizes: tuple[int, ...]
    decode_tokens_per_s: tuple[float, ...]
    step_latency_ms: tuple[float, ...]
    memory_bandwidth_gb_s: float
    weight_bytes: int
    peak_tokens_per_s: float  # the highest aggregate decode rate measured
    measured_at: str
    host: str
    step_cost: StepCostFit | None = None  # absent in profiles made before the step-cost model

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "decode_tokens_per_s", "step_latency_ms"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.batch_sizes)
        _require(n >= 1, "batch_sizes", "needs at least one entry")
        _require(len(self.decode_tokens_per_s) == n, "decode_tokens_per_s",
                 f"has {len(self.decode_tokens_per_s)} entries for {n} batch sizes")
        _require(len(self.step_latency_ms) == n, "step_latency_ms",
                 f"has {len(self.step_latency_ms)} entries for {n} batch sizes")
        _require(self.peak_tokens_per_s > 0, "peak_tokens_per_s",
                 f"must be > 0, got {self.peak_tokens_per_s}")


@dataclass(frozen=True, slots=True)
class Provenance:
    source: str  # file or directory name the engine was built from
    source_sha256: str | None
    created_at: str  # ISO 8601, UTC
    tools: Mapping[str, str] = field(default_factory=dict)  # package -> version

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", dict(self.tools))  # a plain dict keeps it picklable


@dataclass(frozen=True, slots=True)
class Manifest:
    """The whole of ``manifest.json``. Invariant: ``files`` names what ``backend`` loads."""

    name: str
    backend: str
    architecture: Architecture
    quantization: Quantization
    limits: Limits
    tokenizer: TokenizerInfo
    # cpu: {"weights": ...}; trtllm: {"engine_dir": ...}; trtllm-llmapi: {"checkpoint": ...}
    files: Mapping[str, str]
    provenance: Provenance
    draft: DraftInfo | None = None  # trtllm, cpu: a second engine directory
    profile: Profile | None = None
    speculative: SpeculativeInfo | None = None  # trtllm-llmapi
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", dict(self.files))  # a copy; read-only by convention
        _require(self.schema_version in READABLE_SCHEMA_VERSIONS, "schema_version",
                 f"unsupported schema version {self.schema_version} (this build reads "
                 f"{sorted(READABLE_SCHEMA_VERSIONS)})")
        _require(self.quantization.weights != "source"
                 or self.schema_version >= SOURCE_BLOCKS_SCHEMA_VERSION, "schema_version",
                 f"source weights need schema version >= {SOURCE_BLOCKS_SCHEMA_VERSION}")
        _require(self.architecture.family != "gemma3"
                 or self.schema_version >= GEMMA3_SCHEMA_VERSION, "schema_version",
                 f"the gemma3 family needs schema version >= {GEMMA3_SCHEMA_VERSION}")
        _require(bool(self.name), "name", "must not be empty")
        _require(self.backend in BACKENDS, "backend", f"unknown backend {self.backend!r}")
        needs = {"cpu": ("weights", CPU_WEIGHT_QUANTS, CPU_KV_DTYPES),
                 "trtllm": ("engine_dir", TRTLLM_WEIGHT_QUANTS, TRTLLM_KV_DTYPES),
                 "trtllm-llmapi": ("checkpoint", LLMAPI_WEIGHT_QUANTS, LLMAPI_KV_DTYPES)}
        file_key, weights, kv_dtypes = needs[self.backend]
        _require(file_key in self.files, "files", f"a {self.backend} engine needs files.{file_key}")
        _require(self.quantization.weights in weights, "quantization.weights",
                 f"{self.quantization.weights!r} is not available on the {self.backend} backend")
        _require(self.quantization.kv_cache_dtype in kv_dtypes, "quantization.kv_cache_dtype",
                 f"{self.quantization.kv_cache_dtype!r} is not available on the {self.backend} "
                 "backend")
        _require(self.draft is None or self.backend in ("trtllm", "cpu"), "draft",
                 "only trtllm and cpu engines have a draft engine directory")
        _require(self.speculative is None or self.backend == "trtllm-llmapi", "speculative",
                 "only trtllm-llmapi engines configure TensorRT-LLM's drafters")

    # -- derived paths --------------------------------------------------------------------

    def weights_path(self, engine_dir: Path) -> Path:
        """DIR/<files.weights>; only cpu engines have one."""
        if "weights" not in self.files:
            raise ManifestError(f"{engine_dir}: the {self.backend} engine has no files.weights")
        return Path(engine_dir) / self.files["weights"]

    def checkpoint_path(self, engine_dir: Path) -> Path:
        """The Hugging Face checkpoint a trtllm-llmapi engine serves (absolute, or DIR-relative)."""
        if "checkpoint" not in self.files:
            raise ManifestError(f"{engine_dir}: the {self.backend} engine has no files.checkpoint")
        return Path(engine_dir) / self.files["checkpoint"]

    def tokenizer_path(self, engine_dir: Path) -> Path:
        return Path(engine_dir) / self.tokenizer.file

    def chat_template_path(self, engine_dir: Path) -> Path | None:
        name = self.tokenizer.chat_template_file
        return None if name is None else Path(engine_dir) / name

    def with_profile(self, profile: Profile | None) -> Manifest:
        return replace(self, profile=profile)

    # -- JSON -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict in the documented key order."""
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "backend": self.backend,
            "architecture": _section_json(self.architecture),
            "quantization": _section_json(self.quantization),
            "limits": _section_json(self.limits),
            "tokenizer": _section_json(self.tokenizer),
            "files": dict(self.files),
            "draft": None if self.draft is None else _section_json(self.draft),
            "profile": None if self.profile is None else _section_json(self.profile),
            "speculative": None if self.speculative is None else _section_json(self.speculative),
            "provenance": _section_json(self.provenance),
        }

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Parses a decoded manifest; raises FieldError naming the JSON path of the problem."""
        if not isinstance(data, dict):
            raise FieldError("manifest", f"must be a JSON object, got {type(data).__name__}")
        # Checked first so that a future schema is reported as such, not as a pile of field
        # errors.
        version = data.get("schema_version")
        if version is None:
            raise FieldError("schema_version", "missing")
        if not is_int(version) or version not in READABLE_SCHEMA_VERSIONS:
            raise FieldError("schema_version", f"unsupported schema version {version!r} "
                             f"(this build reads {sorted(READABLE_SCHEMA_VERSIONS)})")
        try:
            return parse_section(cls, data, "<root>", _SECTIONS)
        except FieldError as exc:
            # Top-level fields come back as "<root>.name"; drop the placeholder root.
            raise FieldError(exc.name.removeprefix("<root>."), exc.message) from exc

    @classmethod
    def load(cls, engine_dir: str | Path) -> Manifest:
        path = Path(engine_dir) / MANIFEST_FILE
        if not Path(engine_dir).is_dir():
            problem = "is not a directory" if Path(engine_dir).exists() else "does not exist"
            raise ManifestError(f"{engine_dir}: engine directory {problem}")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path}: missing (not an engine directory?)") from None
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: corrupt JSON: {exc}") from exc
        try:
            return cls.from_json(data)
        except FieldError as exc:
            raise ManifestError(f"{path}: {exc.name}: {exc.message}") from exc

    def save(self, engine_dir: str | Path) -> Path:
        """Writes DIR/manifest.json atomically (temp file + rename), so readers never see half."""
        directory = Path(engine_dir)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        return atomic_write_text(directory / MANIFEST_FILE, text)


# The manifest's sections, by the names their fields' annotations use.
_SECTIONS = {
    cls.__name__: cls
    for cls in (Architecture, RopeScaling, Quantization, Limits, TokenizerInfo, DraftInfo,
                Profile, StepCostFit, Provenance, SpeculativeInfo)
}


def atomic_write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _section_json(section: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if is_dataclass(value):
            value = _section_json(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out
