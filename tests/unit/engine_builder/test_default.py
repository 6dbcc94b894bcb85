"""ensure_default_engine's caching rules and race safety, on a synthetic GGUF of the tiny model
standing in for the real download (monkeypatched fetch and checksum)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from engine_builder import default
from engine_builder.fetch import sha256_of
from engine_builder.manifest import Manifest
from engine_builder.tiny import write_tiny_checkpoint
from tests.unit.engine_builder.test_gguf import write_tiny_gguf

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf_path = write_tiny_gguf(write_tiny_checkpoint(tmp_path / "hf"), tmp_path / "tiny.gguf")
    monkeypatch.setattr(default, "fetch_model", lambda model, home=None: gguf_path)
    monkeypatch.setattr(default, "DEFAULT_MODEL", dataclasses.replace(
        default.DEFAULT_MODEL, sha256=sha256_of(gguf_path)))
    return tmp_path / "home"


def _created_at(engine: Path) -> str:
    return Manifest.load(engine).provenance.created_at + (engine / "manifest.json").read_text()


def test_builds_once_then_reuses(home: Path) -> None:
    engine = default.ensure_default_engine(home, quant="int8")
    assert engine == home / "engines" / "default-int8"
    manifest = Manifest.load(engine)
    assert manifest.name == default.DEFAULT_ENGINE_NAME
    assert manifest.quantization.weights == "int8"
    assert manifest.provenance.tools["engine_builder.default"] == default.DEFAULT_ENGINE_REVISION
    before = _created_at(engine)
    assert default.ensure_default_engine(home, quant="int8") == engine
    assert _created_at(engine) == before


@pytest.mark.parametrize("damage", ["corrupt", "revision", "weights"])
def test_rebuilds_a_damaged_or_outdated_engine(home: Path, damage: str) -> None:
    engine = default.ensure_default_engine(home)
    if damage == "corrupt":
        (engine / "manifest.json").write_text("{")
    elif damage == "weights":
        (engine / "weights.safetensors").unlink()
    else:
        data = json.loads((engine / "manifest.json").read_text())
        data["provenance"]["tools"]["engine_builder.default"] = "0"
        (engine / "manifest.json").write_text(json.dumps(data))
    assert not default.is_current(engine, "none")
    assert default.ensure_default_engine(home) == engine
    assert default.is_current(engine, "none")
    assert sorted(p.name for p in engine.parent.iterdir()) == ["default-none"]


def test_concurrent_callers_get_one_complete_engine(home: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(default.ensure_default_engine(home))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3 and len(set(results)) == 1
    assert default.is_current(results[0], "none")
    assert sorted(p.name for p in results[0].parent.iterdir()) == ["default-none"]


def test_unknown_quant_is_rejected(home: Path) -> None:
    with pytest.raises(ValueError, match="quant"):
        default.ensure_default_engine(home, quant="int3")


def test_resolve_engine_builds_published_models_and_passes_directories(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """What --engine (server, planner) resolves: a directory as given; ``default`` or a
    published model's name to that model's engine, with its terms logged when it has any."""
    built: list[str] = []
    monkeypatch.setattr(default, "ensure_engine",
                        lambda model: built.append(model.name) or Path("/engines") / model.name)
    assert default.resolve_engine("some/dir") == Path("some/dir")
    assert built == []
    with caplog.at_level("INFO", logger=default.__name__):
        assert default.resolve_engine("gemma3-270m") == Path("/engines/gemma3-270m")
        assert default.resolve_engine("default") == Path("/engines/smollm2-135m-instruct")
    assert built == ["gemma3-270m", "smollm2-135m-instruct"]
    assert [r.getMessage() for r in caplog.records if "Gemma Terms" in r.getMessage()] != []
    assert not any("Apache" in r.getMessage() for r in caplog.records)
