"""The trtllm executors' lifecycle against the engine's: a cancel of a request still queued in
the engine, calls after shutdown, GPU memory given back at shutdown, and target and draft
sharing one GPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, FinishReason, SamplingParams
from server.executor.factory import load_executor
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.open import open_trtllm
from tests.unit.trtllm import fake_model
from tests.unit.trtllm.conftest import install_fakes, make_engine_dir
from tests.unit.trtllm.helpers import collect, open_plain

pytestmark = pytest.mark.unit

PROMPT = (104, 105, 32, 116, 104, 101, 114, 101)
ROOMY = {"num_blocks": 10**6}  # the pool is sized by the device, not capped


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.fixture
def small_gpu(monkeypatch: pytest.MonkeyPatch) -> fake_model.FakeDevice:
    device = fake_model.FakeDevice(total_blocks=1000)
    install_fakes(monkeypatch, device)
    return device


def test_cancel_of_a_request_queued_in_the_engine_ends_at_once(bindings: Any,
                                                                tmp_path: Path) -> None:
    ex, engine = open_plain(bindings, make_engine_dir(tmp_path, max_batch_size=1))
    try:
        engine.pause_after(1)  # request 1 holds still, mid-run, until the cancel is in
        ex.enqueue(ExecRequest(1, PROMPT, greedy(110)))
        ex.enqueue(ExecRequest(2, PROMPT, greedy(10)))  # waits in the engine behind 1
        deadline = time.monotonic() + 5
        while engine.queued_ids != [2]:  # engine ids count from 1, as the requests came
            assert time.monotonic() < deadline, f"queued in the engine: {engine.queued_ids}"
            time.sleep(0.001)
        ex.cancel(2)
        engine.resume()
        order: list[tuple[int, FinishReason]] = []
        deadline = time.monotonic() + 10
        while len(order) < 2 and time.monotonic() < deadline:
            order += [(d.request_id, d.finish) for d in ex.poll(0.05) if d.finish is not None]
        # The engine ends a queued request only once it schedules it, after request 1.
        assert order == [(2, FinishReason.CANCELLED), (1, FinishReason.LENGTH)]
        assert engine.cancel_calls == [2]
        time.sleep(0.05)
        assert ex.poll(0.05) == []  # the engine's late CANCELLED final is swallowed
    finally:
        ex.shutdown()


def test_after_shutdown_nothing_reaches_the_engine(bindings: Any, tmp_path: Path) -> None:
    ex, engine = open_plain(bindings, make_engine_dir(tmp_path))
    ex.enqueue(ExecRequest(1, PROMPT, greedy(4)))
    collect(ex, [1])
    ex.shutdown()
    with pytest.raises(RuntimeError, match="Shutdown called"):
        engine.get_latest_iteration_stats()  # the bindings raise after shutdown...
    stats = ex.stats()  # ...the executor does not ask them any more
    assert stats.generated_tokens == 4
    ex.cancel(1)
    with pytest.raises(ValueError, match="shut down"):
        ex.enqueue(ExecRequest(2, PROMPT, greedy(4)))


def test_shutdown_gives_the_kv_pool_back(small_gpu: fake_model.FakeDevice,
                                         tmp_path: Path) -> None:
    root = make_engine_dir(tmp_path, fake=ROOMY)
    first = load_executor(root)
    assert first.capacity.num_kv_blocks == 900  # 0.9 of the free memory
    first.shutdown()  # `first` is still referenced: the executor must drop the engine itself
    assert small_gpu.used == 0
    second = load_executor(root)
    try:
        assert second.capacity.num_kv_blocks == 900
    finally:
        second.shutdown()


def test_target_and_draft_split_the_gpu(small_gpu: fake_model.FakeDevice,
                                        tmp_path: Path) -> None:
    root = make_engine_dir(tmp_path, fake=ROOMY, draft_fake={**ROOMY, "weight_blocks": 150})
    ex = load_executor(root)
    try:
        assert ex.capacity.num_kv_blocks == 500  # the target's half
        assert small_gpu.used == 500 + 150 + 175  # the draft's half of what was left
        ex.enqueue(ExecRequest(1, PROMPT, greedy(12)))
        assert collect(ex, [1])[1][-1].finish is FinishReason.LENGTH
    finally:
        ex.shutdown()
    assert small_gpu.used == 0


def test_fractions_that_cannot_fit_fail_before_any_engine_starts(
        small_gpu: fake_model.FakeDevice, tmp_path: Path) -> None:
    root = make_engine_dir(tmp_path, fake=ROOMY, draft_fake=ROOMY)
    with pytest.raises(ValueError, match=r"BACKFILL_TRTLLM_KV_FRACTION=0\.9"):
        open_trtllm(root, Manifest.load(root), TrtllmConfig(kv_fraction=0.9))
    assert small_gpu.used == 0
    cfg = TrtllmConfig.from_env({"BACKFILL_TRTLLM_KV_FRACTION": "0.6",
                                 "BACKFILL_TRTLLM_DRAFT_KV_FRACTION": "0.4"})
    assert (cfg.kv_fractions(with_draft=True).target, cfg.draft_kv_fraction) == (0.6, 0.4)
    with pytest.raises(ValueError, match="BACKFILL_TRTLLM_DRAFT_KV_FRACTION: not a number"):
        TrtllmConfig.from_env({"BACKFILL_TRTLLM_DRAFT_KV_FRACTION": "half"})


def test_a_target_built_without_draft_mode_is_refused_at_open(
        small_gpu: fake_model.FakeDevice, tmp_path: Path) -> None:
    root = make_engine_dir(tmp_path, draft_fake={}, target_max_draft_len=0)
    with pytest.raises(ValueError, match="draft_tokens_external"):
        load_executor(root)
    assert small_gpu.used == 0
