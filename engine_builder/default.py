"""Engines of the published models (engine_builder/fetch.py), built for the cpu backend and
cached under ``$BACKFILL_HOME/engines/<model>-<quant>`` (the default model's under
``default-<quant>``).

``ensure_engine`` is what ``--engine default`` (or a published model's name), the tests and the
demo call. It rebuilds when the cached engine is missing, unreadable, built from another source,
or built by an older ``DEFAULT_ENGINE_REVISION`` of this builder. Two processes racing here
both build into private temporary directories; the first rename wins and the loser keeps the
winner's engine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine_builder.build import BuildOptions, build_engine
from engine_builder.fetch import (
    DEFAULT_MODEL,
    MODELS,
    PublishedModel,
    backfill_home,
    fetch_model,
    published_model,
)
from engine_builder.gguf_source import load_gguf
from engine_builder.manifest import CPU_WEIGHT_QUANTS, Manifest, ManifestError

log = logging.getLogger(__name__)
DEFAULT_ENGINE_NAME = DEFAULT_MODEL.name
# Bump when a builder change alters what a cached engine contains; cached ones get rebuilt.
DEFAULT_ENGINE_REVISION = "2"  # 2: int4 scales fitted to minimise error
_REVISION_TOOL = "engine_builder.default"


def engine_dir(model: PublishedModel, home: Path | None = None, *, quant: str) -> Path:
    stem = "default" if model is DEFAULT_MODEL else model.name
    return backfill_home(home) / "engines" / f"{stem}-{quant}"


def default_engine_dir(home: Path | None = None, *, quant: str = "none") -> Path:
    return engine_dir(DEFAULT_MODEL, home, quant=quant)


def is_current(path: Path, quant: str, model: PublishedModel | None = None) -> bool:
    """True when path holds an engine of model (default: the default model) this builder
    would build identically."""
    model = DEFAULT_MODEL if model is None else model
    try:
        manifest = Manifest.load(path)
    except ManifestError:
        return False
    return (manifest.provenance.source_sha256 == model.sha256
            and manifest.provenance.tools.get(_REVISION_TOOL) == DEFAULT_ENGINE_REVISION
            and manifest.quantization.weights == quant
            and manifest.weights_path(path).is_file())


def ensure_engine(model: PublishedModel, home: Path | None = None, *,
                  quant: str | None = None) -> Path:
    """The model's engine directory (``quant`` default: the model's ``engine_quant``),
    fetching the model and building the engine when needed."""
    quant = model.engine_quant if quant is None else quant
    if quant not in CPU_WEIGHT_QUANTS:
        raise ValueError(f"quant must be one of {sorted(CPU_WEIGHT_QUANTS)}, got {quant!r}")
    out = engine_dir(model, home, quant=quant)
    if is_current(out, quant, model):
        return out
    source = load_gguf(fetch_model(model, home), sha256=model.sha256)
    source = source.with_tools({_REVISION_TOOL: DEFAULT_ENGINE_REVISION})
    stale = out.exists()
    try:
        build_engine(source, BuildOptions(quant=quant), out, name=model.name, replace=stale)
    except OSError:
        # Another process installed its build first: keep it if it is a good one.
        if not is_current(out, quant, model):
            raise
    return out


def resolve_engine(source: str) -> Path:
    """An engine directory, or ``default`` / a published model's name: that model's CPU
    engine, fetched and built on first use (minutes, once), its terms logged."""
    if source != "default" and source not in MODELS:
        return Path(source)
    model = published_model(source)
    if model is not DEFAULT_MODEL:
        log.info("%s: %s", model.name, model.terms)
    return ensure_engine(model)


def ensure_default_engine(home: Path | None = None, *, quant: str = "none") -> Path:
    """The default model's engine (see ``ensure_engine``)."""
    return ensure_engine(DEFAULT_MODEL, home, quant=quant)
