"""The TensorRT-LLM path on a real GPU: build an engine, serve requests through the adapter.

Skipped without ``tensorrt_llm`` and an NVIDIA GPU. The engine comes from
``BACKFILL_GPU_ENGINE`` (a built engine directory, as docker/gpu-check.sh passes), or is built
here from ``BACKFILL_GPU_MODEL`` (an HF Llama-family directory, or ``tiny`` for the project's
random-weight model) with ``BACKFILL_GPU_QUANT`` (default int8) and optional
``BACKFILL_GPU_DRAFT``. One executor is open at a time (``OneAtATime``): the plain target,
the draft-target pair and a reference never hold GPU memory together.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, Executor, FinishReason, SamplingParams
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


def _build(out: Path) -> Path:
    import argparse

    from engine_builder.trtllm_build import main_build

    model = os.environ["BACKFILL_GPU_MODEL"]
    if model == "tiny":
        from engine_builder.tiny import write_tiny_checkpoint

        model = str(write_tiny_checkpoint(out.parent / "tiny-hf", dtype="BF16"))
    extra = []
    if os.environ.get("BACKFILL_GPU_DRAFT"):
        extra = ["--draft", os.environ["BACKFILL_GPU_DRAFT"], "--max-draft-len", "4"]
    args = argparse.Namespace(
        model=model, output=out, name=None, force=True,
        quant=os.environ.get("BACKFILL_GPU_QUANT", "int8"), group_size=None,
        kv_cache_dtype=None, max_batch_size=8, max_seq_len=512, max_num_tokens=1024,
        tokens_per_block=None, num_kv_blocks=None, extra_args=extra)
    assert main_build(args) == 0, "build --backend trtllm failed (its log is above)"
    return out


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("BACKFILL_GPU_ENGINE"):
        path = Path(os.environ["BACKFILL_GPU_ENGINE"])
        if Manifest.load(path).backend != "trtllm":
            pytest.skip(f"{path} is not a trtllm engine")
        return path
    if not os.environ.get("BACKFILL_GPU_MODEL"):
        pytest.skip("set BACKFILL_GPU_ENGINE (a built engine) or BACKFILL_GPU_MODEL (HF dir)")
    return _build(tmp_path_factory.mktemp("trtllm") / "engine")


@pytest.fixture(scope="module")
def engines() -> Iterator[OneAtATime]:
    held = OneAtATime()
    yield held
    held.close()


@pytest.fixture
def plain(engines: OneAtATime, engine_dir: Path) -> Executor:
    """The target engine alone (no draft), whatever the manifest says."""
    from server.executor.trtllm.open import open_trtllm

    manifest = dataclasses.replace(Manifest.load(engine_dir), draft=None)
    return engines.get("plain", lambda: open_trtllm(engine_dir, manifest))


def test_streams_greedy_tokens_and_text(plain: Executor, engine_dir: Path) -> None:
    check_streams_greedy_text(plain, engine_dir)


def test_greedy_repeats_and_reuses_the_prefix(plain: Executor, engine_dir: Path) -> None:
    check_greedy_repeats_and_reuses_the_prefix(plain, engine_dir)


def test_temperature_alone_samples(plain: Executor, engine_dir: Path) -> None:
    check_temperature_alone_samples(plain, engine_dir)


def test_batch_of_requests_all_finish(plain: Executor, engine_dir: Path) -> None:
    prompt = prompt_ids(engine_dir, "List three colors:")
    reqs = [ExecRequest(100 + i, prompt, SamplingParams(temperature=0.8, top_p=0.9, seed=i,
                                                        max_tokens=24),
                        priority=0.9 if i % 2 else 0.1) for i in range(8)]
    out = run(plain, reqs)
    assert all(ds[-1].finish in (FinishReason.LENGTH, FinishReason.STOP) for ds in out.values())
    stats = plain.stats()
    assert stats.kv_blocks_total > 0 and stats.steps > 0 and stats.generated_tokens > 0
    assert plain.capacity.num_kv_blocks == stats.kv_blocks_total


def test_cancel_ends_with_cancelled(plain: Executor, engine_dir: Path) -> None:
    check_cancel(plain, engine_dir)


def test_draft_target_counts_acceptance(engines: OneAtATime, engine_dir: Path) -> None:
    manifest = Manifest.load(engine_dir)
    if manifest.draft is None:
        pytest.skip("the engine was built without --draft")
    from server.executor.factory import load_executor
    from server.executor.trtllm.open import open_trtllm

    prompt = prompt_ids(engine_dir, "The quick brown fox")
    plain = engines.get("plain", lambda: open_trtllm(
        engine_dir, dataclasses.replace(manifest, draft=None)))
    want = tokens(run(plain, [ExecRequest(301, prompt, greedy(32))])[301])
    spec = engines.get("spec", lambda: load_executor(engine_dir))  # plain is shut down first
    deltas = run(spec, [ExecRequest(300, prompt, greedy(32))])[300]
    proposed = sum(d.draft_tokens_proposed for d in deltas)
    accepted = sum(d.draft_tokens_accepted for d in deltas)
    assert proposed > 0 and 0 <= accepted <= proposed
    # Greedy speculation reproduces the target's own greedy output (kernel numerics may
    # diverge late; the start must agree).
    assert tokens(deltas)[:8] == want[:8]
