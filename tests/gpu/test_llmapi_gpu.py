"""The trtllm-llmapi backend on a real GPU: tensorrt_llm.LLM (PyTorch backend) serving a
Hugging Face checkpoint through LlmApiExecutor.

Skipped without ``tensorrt_llm`` and an NVIDIA GPU. The engine directory comes from
``BACKFILL_GPU_LLMAPI_ENGINE`` (built by ``engine_builder build --backend trtllm-llmapi``, as
docker/gpu-check.sh does), or is written here for ``BACKFILL_GPU_MODEL`` (an HF Llama-family
directory). One LLM is open at a time (``OneAtATime``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, Executor
from tests.gpu.common import (
    OneAtATime,
    check_cancel,
    check_greedy_repeats_and_reuses_the_prefix,
    check_streams_greedy_text,
    check_temperature_alone_samples,
    greedy,
    prompt_ids,
    require_gpu_and_tensorrt_llm,
    run,
    tokens,
)

pytestmark = pytest.mark.gpu
require_gpu_and_tensorrt_llm()


def _write(model: str, out: Path, *flags: str) -> Path:
    from engine_builder.cli import main

    argv = ["build", "--backend", "trtllm-llmapi", "--model", model, "--output", str(out),
            "--force", "--max-batch-size", "8", "--max-seq-len", "1024", *flags]
    assert main(argv) == 0, "build --backend trtllm-llmapi failed (see above)"
    return out


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("BACKFILL_GPU_LLMAPI_ENGINE"):
        return Path(os.environ["BACKFILL_GPU_LLMAPI_ENGINE"])
    if not os.environ.get("BACKFILL_GPU_MODEL") or os.environ["BACKFILL_GPU_MODEL"] == "tiny":
        pytest.skip("set BACKFILL_GPU_LLMAPI_ENGINE or BACKFILL_GPU_MODEL (an HF directory)")
    return _write(os.environ["BACKFILL_GPU_MODEL"], tmp_path_factory.mktemp("llmapi") / "e")


@pytest.fixture(scope="module")
def llms() -> Iterator[OneAtATime]:
    held = OneAtATime()
    yield held
    held.close()


@pytest.fixture
def llm(llms: OneAtATime, engine_dir: Path) -> Executor:
    from server.executor.factory import load_executor

    return llms.get("plain", lambda: load_executor(engine_dir))


def test_streams_greedy_tokens_and_text(llm: Executor, engine_dir: Path) -> None:
    check_streams_greedy_text(llm, engine_dir)


def test_greedy_repeats_and_reuses_the_prefix(llm: Executor, engine_dir: Path) -> None:
    check_greedy_repeats_and_reuses_the_prefix(llm, engine_dir)


def test_temperature_alone_samples(llm: Executor, engine_dir: Path) -> None:
    check_temperature_alone_samples(llm, engine_dir)


def test_cancel_and_stats(llm: Executor, engine_dir: Path) -> None:
    check_cancel(llm, engine_dir)
    stats = llm.stats()
    assert stats.kv_blocks_total == llm.capacity.num_kv_blocks > 0 and stats.steps > 0


def test_shutdown_gives_the_gpu_back(llms: OneAtATime, engine_dir: Path) -> None:
    from server.executor.factory import load_executor

    before = llms.get("plain", lambda: load_executor(engine_dir)).capacity.num_kv_blocks
    llms.close()
    again = llms.get("plain", lambda: load_executor(engine_dir)).capacity.num_kv_blocks
    assert again >= 0.9 * before


def test_ngram_drafting_keeps_the_greedy_output(llms: OneAtATime, engine_dir: Path,
                                                tmp_path: Path) -> None:
    from server.executor.factory import load_executor

    prompt = prompt_ids(engine_dir, "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2,")
    plain = llms.get("plain", lambda: load_executor(engine_dir))
    want = tokens(run(plain, [ExecRequest(300, prompt, greedy(24))])[300])
    model = str(Manifest.load(engine_dir).checkpoint_path(engine_dir))
    spec_dir = _write(model, tmp_path / "ngram", "--speculative", "ngram")
    spec = llms.get("ngram", lambda: load_executor(spec_dir))
    got = tokens(run(spec, [ExecRequest(301, prompt, greedy(24))])[301])
    assert got[:8] == want[:8]
    time.sleep(0.5)
    assert spec.stats().draft_tokens_proposed > 0
