"""TrtllmExecutor over the fake bindings: request mapping, streaming, finishes, cancel, errors,
priority, stats."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine_builder.manifest import Manifest
from server.executor.base import (
    ExecRequest,
    Executor,
    FinishReason,
    SamplingParams,
    TokenDelta,
)
from server.executor.trtllm.bindings import load_bindings
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.executor import TrtllmExecutor
from server.executor.trtllm.open import engine_config
from tests.unit.trtllm.conftest import EOS, make_engine_dir
from tests.unit.trtllm.fake_model import FakeModel
from tests.unit.trtllm.helpers import collect, expected_tokens, open_plain, text_of, tokens_of

pytestmark = pytest.mark.unit

PROMPT = (104, 105, 32, 116, 104, 101, 114, 101)  # "hi there"
MODEL = FakeModel(vocab_size=257)


def greedy(max_tokens: int = 12, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture
def plain(bindings: Any, tmp_path: Path) -> Any:
    made: list[TrtllmExecutor] = []

    def _open(fake: dict[str, Any] | None = None, config: TrtllmConfig | None = None,
              **kw: Any) -> tuple[TrtllmExecutor, Any]:
        root = make_engine_dir(tmp_path / f"e{len(made)}", fake=fake, **kw)
        ex, engine = open_plain(bindings, root, config)
        made.append(ex)
        return ex, engine

    yield _open
    for ex in made:
        ex.shutdown()


def test_is_an_executor(plain: Any) -> None:
    ex, _ = plain()
    assert isinstance(ex, Executor)


def test_request_mapping(plain: Any) -> None:
    ex, engine = plain()
    engine.pause()
    sampling = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3, min_tokens=4,
                              max_tokens=10, stop_token_ids=(7,))
    ex.enqueue(ExecRequest(1, PROMPT, sampling, resume_token_ids=(97, 98), priority=0.8))
    ex.enqueue(ExecRequest(2, PROMPT, greedy(ignore_eos=True)))
    first, second = engine.enqueued
    assert first.input_token_ids == [*PROMPT, 97, 98]  # prompt + resume tokens
    assert first.max_tokens == 8  # resume tokens count as generated
    assert first.streaming is True
    assert first.output_config.exclude_input_from_output is True
    sc = first.sampling_config
    assert (sc.temperature, sc.top_k, sc.top_p, sc.seed, sc.min_tokens) == (0.7, 5, 0.9, 3, 2)
    assert first.end_id == EOS and first.pad_id == EOS
    assert first.stop_words == [[7]]
    assert first._priority == pytest.approx(0.8)
    g = second.sampling_config
    assert (g.top_k, g.temperature, g.top_p, g.min_tokens) == (1, None, None, None)
    assert second.end_id == -1  # ignore_eos
    assert isinstance(g.seed, int)  # None: the executor draws one


def test_streams_the_engine_tokens_as_text(plain: Any) -> None:
    ex, _ = plain()
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=12)))
    deltas = collect(ex, [1])[1]
    want = expected_tokens(MODEL, PROMPT, 12)
    assert tokens_of(deltas) == want
    assert text_of(deltas) == bytes(want).decode()
    assert len(deltas) >= 10  # streamed, not one lump
    assert deltas[-1].finish is FinishReason.LENGTH
    assert deltas[0].cached_prompt_tokens == 0
    assert all(d.cached_prompt_tokens is None for d in deltas[1:-1])


def test_resumed_request_continues_the_same_stream(plain: Any) -> None:
    ex, _ = plain()
    full = expected_tokens(MODEL, PROMPT, 10)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=10), resume_token_ids=tuple(full[:4])))
    deltas = collect(ex, [1])[1]
    assert tokens_of(deltas) == full[4:]
    assert text_of(deltas) == bytes(full[4:]).decode()


def test_eos_ends_with_stop(plain: Any) -> None:
    ex, _ = plain(fake={"eos_every": 14})
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=30)))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.STOP
    # EOS comes when the context reaches 14 tokens; EOS itself is not returned.
    assert len(tokens_of(deltas)) == 14 - len(PROMPT)


def test_stop_id_ends_with_stop_and_keeps_the_token(plain: Any) -> None:
    ex, _ = plain()
    want = expected_tokens(MODEL, PROMPT, 20)
    stop_id = want[5]
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=20, stop_token_ids=(stop_id,))))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.STOP
    assert tokens_of(deltas) == want[:want.index(stop_id) + 1]


def test_stop_string_cuts_the_text_and_cancels_the_engine(plain: Any) -> None:
    ex, engine = plain()
    want = bytes(expected_tokens(MODEL, PROMPT, 40)).decode()
    stop = want[9:12]
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=40, stop=(stop,))))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.STOP
    assert text_of(deltas) == want[:want.index(stop)]
    assert engine.cancel_calls, "the engine kept generating after the stop string"
    time.sleep(0.1)
    assert ex.poll(0.05) == []  # the engine's late CANCELLED final is swallowed


def test_stop_string_ignored_before_min_tokens(plain: Any) -> None:
    ex, _ = plain()
    want = bytes(expected_tokens(MODEL, PROMPT, 20)).decode()
    stop = want[1:3]
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=20, min_tokens=10, stop=(stop,))))
    deltas = collect(ex, [1])[1]
    assert text_of(deltas).startswith(want[:3])
    assert len(tokens_of(deltas)) >= 10


def test_cancel_ends_with_cancelled_once(plain: Any) -> None:
    ex, engine = plain()
    engine.pause_after(1)  # request 1 holds still, mid-run, until the cancel is in
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=100)))
    ex.enqueue(ExecRequest(2, PROMPT, greedy(max_tokens=5)))
    first: list[TokenDelta] = []
    deadline = time.monotonic() + 10
    while not first:
        assert time.monotonic() < deadline, "request 1 got no first token"
        first = [d for d in ex.poll(0.05) if d.request_id == 1]
    ex.cancel(1)
    ex.cancel(99)  # unknown: a no-op
    engine.resume()
    deltas = collect(ex, [1, 2])
    assert deltas[1][-1].finish is FinishReason.CANCELLED
    assert deltas[2][-1].finish is FinishReason.LENGTH
    assert len(tokens_of(first + deltas[1])) < 100
    ex.cancel(1)  # finished: a no-op
    assert ex.poll(0.05) == []


def test_shutdown_cancels_live_requests(plain: Any) -> None:
    ex, engine = plain()
    engine.pause()
    ex.enqueue(ExecRequest(1, PROMPT, greedy()))
    ex.shutdown()
    finals = [d for d in ex.poll(0.1) if d.finish is not None]
    assert [(d.request_id, d.finish) for d in finals] == [(1, FinishReason.CANCELLED)]
    ex.shutdown()  # idempotent
    with pytest.raises(ValueError):
        ex.enqueue(ExecRequest(2, PROMPT, greedy()))


def test_engine_error_becomes_an_error_final(plain: Any) -> None:
    ex, _ = plain(fake={"fail_at_context_len": len(PROMPT) + 3})
    ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=10)))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.ERROR
    assert "illegal memory access" in (deltas[-1].error or "")


def test_full_engine_queue_fails_the_request(plain: Any) -> None:
    ex, engine = plain(config=TrtllmConfig(max_queue_size=1, await_timeout_s=0.005))
    engine.pause()
    ex.enqueue(ExecRequest(1, PROMPT, greedy()))
    ex.enqueue(ExecRequest(2, PROMPT, greedy()))
    final = [d for d in ex.poll(0.2) if d.request_id == 2]
    assert final[0].finish is FinishReason.ERROR
    assert "Maximum queue size" in (final[0].error or "")


@pytest.mark.parametrize("request_", [
    ExecRequest(1, (), greedy()),
    ExecRequest(1, (5, 300), greedy()),
    ExecRequest(1, tuple([97] * 128), greedy()),
    ExecRequest(1, PROMPT, greedy(max_tokens=2), resume_token_ids=(97, 98)),
])
def test_rejects_requests_the_engine_cannot_run(plain: Any, request_: ExecRequest) -> None:
    ex, engine = plain()
    with pytest.raises(ValueError):
        ex.enqueue(request_)
    assert engine.enqueued == []


def test_rejects_duplicate_live_ids(plain: Any) -> None:
    ex, engine = plain()
    engine.pause()
    ex.enqueue(ExecRequest(1, PROMPT, greedy()))
    with pytest.raises(ValueError, match="duplicate"):
        ex.enqueue(ExecRequest(1, PROMPT, greedy()))


def test_engine_orders_its_queue_by_priority(plain: Any) -> None:
    ex, engine = plain(max_batch_size=1)
    engine.pause()
    for rid, priority in ((1, 0.2), (2, 0.9), (3, 0.5), (4, 0.9)):
        ex.enqueue(ExecRequest(rid, PROMPT, greedy(max_tokens=3), priority=priority))
    engine.resume()
    order: list[int] = []
    deadline = time.monotonic() + 10
    while len(order) < 4 and time.monotonic() < deadline:
        order += [d.request_id for d in ex.poll(0.05) if d.finish is not None]
    assert order == [2, 4, 3, 1]  # higher first, FCFS within equal priority


def test_stats_and_capacity_from_iteration_stats(plain: Any) -> None:
    ex, _ = plain(fake={"num_blocks": 40})
    assert ex.capacity.num_kv_blocks == 64  # the manifest's figure until the engine reports
    prompt = tuple([97 + i % 26 for i in range(40)])
    ex.enqueue(ExecRequest(1, prompt, greedy(max_tokens=6)))
    first = collect(ex, [1])[1]
    ex.enqueue(ExecRequest(2, prompt, greedy(max_tokens=6)))
    second = collect(ex, [2])[2]
    stats = ex.stats()
    assert stats.steps >= 6
    assert stats.generated_tokens == len(tokens_of(first)) + len(tokens_of(second)) == 12
    assert stats.prompt_tokens == 80
    assert stats.cached_prompt_tokens == 32  # one full 32-token block reused
    assert second[0].cached_prompt_tokens == 32 and second[-1].cached_prompt_tokens == 32
    assert stats.kv_blocks_total == 40 and ex.capacity.num_kv_blocks == 40
    assert stats.kv_blocks_used + stats.kv_blocks_free == 40
    assert stats.busy_seconds > 0 and stats.last_step_latency_s >= 0
    assert (stats.active, stats.queued) == (0, 0)


def test_executor_config_is_explicit(bindings: Any, tmp_path: Path) -> None:
    manifest = Manifest.load(make_engine_dir(tmp_path))
    cfg = engine_config(bindings, manifest, TrtllmConfig(capacity_policy="max_utilization",
                                                         enable_chunked_context=False), 0.9)
    assert cfg.scheduler_config.capacity_scheduler_policy is \
        bindings.CapacitySchedulerPolicy.MAX_UTILIZATION
    assert cfg.kv_cache_config.enable_block_reuse is True
    assert cfg.enable_chunked_context is False
    assert cfg.batching_type is bindings.BatchingType.INFLIGHT
    assert (cfg.max_batch_size, cfg.max_num_tokens) == (4, 256)
    default = engine_config(bindings, manifest, TrtllmConfig(), 0.9)
    assert default.scheduler_config.capacity_scheduler_policy is \
        bindings.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    assert default.enable_chunked_context is True


def test_config_validation_and_env() -> None:
    with pytest.raises(ValueError):
        TrtllmConfig(capacity_policy="static_batch")
    with pytest.raises(ValueError):
        TrtllmConfig(kv_fraction=0.0)
    cfg = TrtllmConfig.from_env({"BACKFILL_TRTLLM_CAPACITY_POLICY": "max_utilization",
                                 "BACKFILL_TRTLLM_MAX_QUEUE_SIZE": "8"})
    assert (cfg.capacity_policy, cfg.max_queue_size) == ("max_utilization", 8)


def test_missing_tensorrt_llm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(RuntimeError, match=r"TensorRT-LLM 1\.2\.1"):
        load_bindings()


def test_factory_opens_a_trtllm_engine(bindings: Any, tmp_path: Path) -> None:
    from server.executor.factory import load_executor

    ex = load_executor(make_engine_dir(tmp_path, fake={"num_blocks": 24}))
    try:
        assert isinstance(ex, TrtllmExecutor)
        assert ex.capacity.num_kv_blocks == 24  # probed at open, not the manifest's estimate
        ex.enqueue(ExecRequest(1, PROMPT, greedy(max_tokens=4)))
        assert tokens_of(collect(ex, [1])[1]) == expected_tokens(MODEL, PROMPT, 4)
    finally:
        ex.shutdown()
