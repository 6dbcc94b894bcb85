"""The default engine: SmolLM2-135M-Instruct built for the cpu backend, cached under
``$BACKFILL_HOME/engines/default-<quant>``.

``ensure_default_engine`` is what ``--engine default``, the tests and the demo call. It rebuilds
when the cached engine is missing, unreadable, built from another source, or built by an older
``DEFAULT_ENGINE_REVISION`` of this builder. Two processes racing here both build into private
temporary directories; the first rename wins and the loser keeps the winner's engine.
"""

from __future__ import annotations

from pathlib import Path

from engine_builder.build import BuildOptions, build_engine
from engine_builder.fetch import DEFAULT_SHA256, backfill_home, fetch_default
from engine_builder.gguf_source import load_gguf
from engine_builder.manifest import CPU_WEIGHT_QUANTS, Manifest, ManifestError

DEFAULT_ENGINE_NAME = "smollm2-135m-instruct"
# Bump when a builder change alters what the default engine contains; cached ones get rebuilt.
DEFAULT_ENGINE_REVISION = "2"  # 2: int4 scales fitted to minimise error
_REVISION_TOOL = "engine_builder.default"


def default_engine_dir(home: Path | None = None, *, quant: str = "none") -> Path:
    return backfill_home(home) / "engines" / f"default-{quant}"


def is_current(engine_dir: Path, quant: str) -> bool:
    """True when engine_dir holds a default engine this builder would build identically."""
    try:
        manifest = Manifest.load(engine_dir)
    except ManifestError:
        return False
    return (manifest.provenance.source_sha256 == DEFAULT_SHA256
            and manifest.provenance.tools.get(_REVISION_TOOL) == DEFAULT_ENGINE_REVISION
            and manifest.quantization.weights == quant
            and manifest.weights_path(engine_dir).is_file())


def ensure_default_engine(home: Path | None = None, *, quant: str = "none") -> Path:
    """The default engine's directory, fetching the model and building it when needed."""
    if quant not in CPU_WEIGHT_QUANTS:
        raise ValueError(f"quant must be one of {sorted(CPU_WEIGHT_QUANTS)}, got {quant!r}")
    out = default_engine_dir(home, quant=quant)
    if is_current(out, quant):
        return out
    source = load_gguf(fetch_default(home), sha256=DEFAULT_SHA256)
    source = source.with_tools({_REVISION_TOOL: DEFAULT_ENGINE_REVISION})
    stale = out.exists()
    try:
        build_engine(source, BuildOptions(quant=quant), out, name=DEFAULT_ENGINE_NAME,
                     replace=stale)
    except OSError:
        # Another process installed its build first: keep it if it is a good one.
        if not is_current(out, quant):
            raise
    return out
