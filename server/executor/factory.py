"""Opens an engine directory as an Executor, by the backend its manifest names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine_builder.manifest import Manifest
from server.executor.base import Executor

if TYPE_CHECKING:
    from server.executor.cpu.speculation import SpeculationConfig


def load_executor(
    engine_dir: str | Path, *, speculation: SpeculationConfig | None = None
) -> Executor:
    """Reads DIR/manifest.json and starts the matching backend. Raises ManifestError
    (a ValueError) for a missing or corrupt manifest, ValueError for an unknown backend.
    ``speculation`` picks the CPU engine's drafter (TensorRT-LLM engines bring their own)."""
    path = Path(engine_dir)
    manifest = Manifest.load(path)
    # The GPU backends are imported here so that nothing else in the project needs them.
    if manifest.backend == "cpu":
        from server.executor.cpu import CpuExecutor

        return CpuExecutor.from_manifest(path, manifest, speculation)
    if manifest.backend == "trtllm":
        from server.executor.trtllm.open import open_trtllm

        return open_trtllm(path, manifest)
    if manifest.backend == "trtllm-llmapi":
        from server.executor.trtllm.llmapi import LlmApiExecutor

        return LlmApiExecutor.from_manifest(path, manifest)
    raise ValueError(f"{path}/manifest.json: unknown backend {manifest.backend!r}")
