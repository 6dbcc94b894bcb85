"""The TensorRT-LLM path on a real GPU: build an engine, serve requests through the adapter.

Skipped without ``tensorrt_llm`` and an NVIDIA GPU. The engine comes from
``BACKFILL_GPU_ENGINE`` (a built engine directory, as docker/gpu-check.sh passes), or is built
here from ``BACKFILL_GPU_MODEL`` (an HF Llama-family directory, or ``tiny`` for the project's
random-weight model) with ``BACKFILL_GPU_QUANT`` (default int8) and optional
``BACKFILL_GPU_DRAFT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, FinishReason, SamplingParams, TokenDelta

pytestmark = pytest.mark.gpu


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "GPU " in out.stdout


if not _has_gpu():
    pytest.skip("no NVIDIA GPU", allow_module_level=True)
pytest.importorskip("tensorrt_llm")

from server.executor.trtllm import (  # noqa: E402 (after the skips: needs the GPU stack)
    TrtllmConfig,
    TrtllmExecutor,
    load_bindings,
    open_engine,
)


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
        return Path(os.environ["BACKFILL_GPU_ENGINE"])
    if not os.environ.get("BACKFILL_GPU_MODEL"):
        pytest.skip("set BACKFILL_GPU_ENGINE (a built engine) or BACKFILL_GPU_MODEL (HF dir)")
    return _build(tmp_path_factory.mktemp("trtllm") / "engine")


@pytest.fixture(scope="module")
def plain(engine_dir: Path) -> Iterator[TrtllmExecutor]:
    """The target engine alone (no draft), whatever the manifest says."""
    manifest = Manifest.load(engine_dir)
    cfg = TrtllmConfig()
    b = load_bindings()
    ex = TrtllmExecutor(open_engine(b, engine_dir, manifest, cfg), b,
                        EngineTokenizer.load(engine_dir, manifest), manifest, cfg)
    yield ex
    ex.shutdown()


def run(ex: object, requests: list[ExecRequest], timeout: float = 120.0
        ) -> dict[int, list[TokenDelta]]:
    out: dict[int, list[TokenDelta]] = {r.request_id: [] for r in requests}
    for r in requests:
        ex.enqueue(r)  # type: ignore[attr-defined]
    open_ids = set(out)
    deadline = time.monotonic() + timeout
    while open_ids and time.monotonic() < deadline:
        for d in ex.poll(0.1):  # type: ignore[attr-defined]
            assert d.request_id in open_ids, f"delta after the final: {d}"
            out[d.request_id].append(d)
            if d.finish is not None:
                open_ids.discard(d.request_id)
    assert not open_ids, f"no final within {timeout}s for {sorted(open_ids)}"
    return out


def prompt_ids(engine_dir: Path, text: str) -> tuple[int, ...]:
    manifest = Manifest.load(engine_dir)
    return tuple(EngineTokenizer.load(engine_dir, manifest).encode(text))


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)  # type: ignore[arg-type]


def test_streams_greedy_tokens_and_text(plain: TrtllmExecutor, engine_dir: Path) -> None:
    prompt = prompt_ids(engine_dir, "The capital of France is")
    deltas = run(plain, [ExecRequest(1, prompt, greedy(16))])[1]
    tokens = [t for d in deltas for t in d.token_ids]
    assert 1 <= len(tokens) <= 16
    assert deltas[-1].finish in (FinishReason.LENGTH, FinishReason.STOP)
    manifest = Manifest.load(engine_dir)
    tokenizer = EngineTokenizer.load(engine_dir, manifest)
    assert "".join(d.text for d in deltas) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_greedy_is_deterministic_and_reuses_the_prefix(plain: TrtllmExecutor,
                                                       engine_dir: Path) -> None:
    tpb = Manifest.load(engine_dir).limits.tokens_per_block
    base = prompt_ids(engine_dir, "Once upon a time, in a land far away, there lived " * 8)
    prompt = base[:3 * tpb] if len(base) >= 3 * tpb else base
    first = run(plain, [ExecRequest(10, prompt, greedy(12))])[10]
    second = run(plain, [ExecRequest(11, prompt, greedy(12))])[11]
    assert [t for d in first for t in d.token_ids] == [t for d in second for t in d.token_ids]
    if len(prompt) >= 2 * tpb:
        assert (second[0].cached_prompt_tokens or 0) >= tpb


def test_batch_of_requests_all_finish(plain: TrtllmExecutor, engine_dir: Path) -> None:
    prompt = prompt_ids(engine_dir, "List three colors:")
    reqs = [ExecRequest(100 + i, prompt, SamplingParams(temperature=0.8, top_p=0.9, seed=i,
                                                        max_tokens=24),
                        priority=0.9 if i % 2 else 0.1) for i in range(8)]
    out = run(plain, reqs)
    assert all(ds[-1].finish in (FinishReason.LENGTH, FinishReason.STOP) for ds in out.values())
    stats = plain.stats()
    assert stats.kv_blocks_total > 0 and stats.steps > 0 and stats.generated_tokens > 0
    assert plain.capacity.num_kv_blocks == stats.kv_blocks_total


def test_cancel_ends_with_cancelled(plain: TrtllmExecutor, engine_dir: Path) -> None:
    prompt = prompt_ids(engine_dir, "Count to one thousand:")
    plain.enqueue(ExecRequest(200, prompt, greedy(400, ignore_eos=True)))
    time.sleep(0.2)
    plain.cancel(200)
    finals: list[TokenDelta] = []
    deadline = time.monotonic() + 60
    while not finals and time.monotonic() < deadline:
        finals = [d for d in plain.poll(0.1) if d.request_id == 200 and d.finish is not None]
    assert finals and finals[0].finish is FinishReason.CANCELLED


def test_draft_target_counts_acceptance(engine_dir: Path, plain: TrtllmExecutor) -> None:
    manifest = Manifest.load(engine_dir)
    if manifest.draft is None:
        pytest.skip("the engine was built without --draft")
    from server.executor.factory import load_executor

    spec = load_executor(engine_dir)
    try:
        prompt = prompt_ids(engine_dir, "The quick brown fox")
        deltas = run(spec, [ExecRequest(300, prompt, greedy(32))])[300]
        reference = run(plain, [ExecRequest(301, prompt, greedy(32))])[301]
    finally:
        spec.shutdown()
    tokens = [t for d in deltas for t in d.token_ids]
    want = [t for d in reference for t in d.token_ids]
    proposed = sum(d.draft_tokens_proposed for d in deltas)
    accepted = sum(d.draft_tokens_accepted for d in deltas)
    assert proposed > 0 and 0 <= accepted <= proposed
    # Greedy speculation reproduces the target's own greedy output (kernel numerics may
    # diverge late; the start must agree).
    assert tokens[:8] == want[:8]
