"""Shared fixtures: engines built once per test session.

- ``tiny_engine``: the tiny random-weight Llama (float32 weights, float32 KV), no download.
- ``tiny_engine_factory(**kwargs)``: other tiny variants (``quant="int4"``, ``kv_cache_dtype=
  "int8"``, limits such as ``max_batch_size=4``), each built once per distinct kwargs.
- ``default_engine``: the real SmolLM2-135M-Instruct cpu engine (fetched and built once into
  ``$BACKFILL_HOME``); only for tests marked ``model``.
- ``gemma_engine``: the real Gemma 3 270M cpu engine, likewise (its ``source`` build), when
  its model is fetched already or BACKFILL_TEST_GEMMA=1 (its terms: see the fixture).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _blas_threads() -> None:
    """Engines that tests drive on their own thread take ``BACKFILL_CPU_THREADS`` BLAS threads,
    as the executor's worker does (``make test``: 1): OpenBLAS threads spinning against the
    other processes of a loaded host make small matmuls an order of magnitude slower."""
    from server.executor.cpu.blas import default_threads, set_thread_blas_threads

    set_thread_blas_threads(default_threads())


@pytest.fixture(scope="session")
def tiny_engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from engine_builder.tiny import build_tiny_engine

    built: dict[tuple[tuple[str, Any], ...], Path] = {}
    root = tmp_path_factory.mktemp("tiny-engines")

    def make(**kwargs: Any) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            name = "tiny-" + "-".join(f"{k}={v}" for k, v in key) if key else "tiny"
            built[key] = build_tiny_engine(root / name, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_engine_factory: Callable[..., Path]) -> Path:
    return tiny_engine_factory()


@pytest.fixture(scope="session")
def default_engine() -> Path:
    from engine_builder.default import ensure_default_engine

    return ensure_default_engine()


@pytest.fixture(scope="session")
def gemma_engine() -> Path:
    """Skipped unless the model is fetched already (``python -m engine_builder fetch-model
    gemma3-270m``) or BACKFILL_TEST_GEMMA=1: fetching it accepts the Gemma Terms of Use, which
    a test run must not do on its user's behalf."""
    import os

    from engine_builder.default import ensure_engine
    from engine_builder.fetch import GEMMA3_270M

    if not GEMMA3_270M.path().is_file() and os.environ.get("BACKFILL_TEST_GEMMA") != "1":
        pytest.skip("Gemma 3 270M not fetched (fetch-model gemma3-270m accepts its terms; or "
                    "set BACKFILL_TEST_GEMMA=1)")
    return ensure_engine(GEMMA3_270M)


@pytest.fixture(scope="session")
def tiny_gemma_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Gemma 3 (engine_builder/tiny_gemma.py): a second family, no chat
    template, no download."""
    from engine_builder.tiny_gemma import build_tiny_gemma_engine

    return build_tiny_gemma_engine(tmp_path_factory.mktemp("tiny-gemma") / "engine")
