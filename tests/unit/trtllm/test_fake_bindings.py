"""The fake itself behaves as the 1.2.1 bindings do where the adapter depends on it."""

from __future__ import annotations

import datetime
import gc
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.trtllm import fake_bindings as b
from tests.unit.trtllm import fake_model

pytestmark = pytest.mark.unit

WAIT = datetime.timedelta(seconds=5)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[b.Executor]:
    b.write_engine_config(tmp_path, vocab_size=300, max_batch_size=2)
    ex = b.Executor(tmp_path, b.ModelType.DECODER_ONLY,
                    b.ExecutorConfig(kv_cache_config=b.KvCacheConfig(enable_block_reuse=True)))
    yield ex
    ex.shutdown()


def finals(engine: b.Executor, engine_id: int) -> b.Response:
    while True:
        for response in engine.await_responses(engine_id, WAIT):
            if response.has_error() or response.result.is_final:
                return response


def test_constructors_take_the_binding_keywords_only() -> None:
    with pytest.raises(TypeError):
        b.Request([1, 2], 4, no_such_arg=1)
    with pytest.raises(TypeError):
        b.SamplingConfig(1, temprature=0.5)
    with pytest.raises(TypeError):
        b.ExecutorConfig(no_such_arg=1)  # type: ignore[call-arg]
    with pytest.raises(RuntimeError):
        b.Request([1], 4, priority=1.5)
    assert not hasattr(b.Request([1], 4), "priority")  # constructor-only in the bindings


def test_non_streaming_output_includes_the_input_unless_excluded(engine: b.Executor) -> None:
    full = finals(engine, engine.enqueue_request(b.Request([97, 98], 3)))
    only_new = finals(engine, engine.enqueue_request(b.Request(
        [97, 98], 3, output_config=b.OutputConfig(exclude_input_from_output=True))))
    assert full.result.output_token_ids[0][:2] == [97, 98]
    assert full.result.output_token_ids[0][2:] == only_new.result.output_token_ids[0]
    assert full.result.finish_reasons == [b.FinishReason.LENGTH]


def test_error_responses_have_no_result(engine: b.Executor) -> None:
    response = b.Response(7, "boom")
    assert response.has_error() and response.error_msg == "boom"
    with pytest.raises(RuntimeError):
        _ = response.result
    with pytest.raises(RuntimeError):
        _ = b.Response(7, b.Result()).error_msg


def test_streaming_sends_only_new_tokens_and_stats_drain(engine: b.Executor) -> None:
    engine_id = engine.enqueue_request(b.Request([97], 5, streaming=True))
    chunks: list[b.Result] = []
    while not chunks or not chunks[-1].is_final:
        chunks += [r.result for r in engine.await_responses(engine_id, WAIT)]
    assert sum(len(c.output_token_ids[0]) for c in chunks) == 5
    assert all(len(c.output_token_ids[0]) == 1 for c in chunks)
    stats = engine.get_latest_iteration_stats()
    kv = stats[-1].kv_cache_stats if stats else None
    assert kv is not None and kv.max_num_blocks == 64
    assert engine.get_latest_iteration_stats() == []  # handed over once


def test_queue_bound_raises_at_enqueue(tmp_path: Path) -> None:
    b.write_engine_config(tmp_path)
    ex = b.Executor(tmp_path, b.ModelType.DECODER_ONLY, b.ExecutorConfig(max_queue_size=1))
    try:
        ex.pause()
        ex.enqueue_request(b.Request([97], 2))
        with pytest.raises(RuntimeError, match="Maximum queue size"):
            ex.enqueue_request(b.Request([97], 2))
    finally:
        ex.shutdown()


def open_engine_at(path: Path, **config: object) -> b.Executor:
    return b.Executor(path, b.ModelType.DECODER_ONLY, b.ExecutorConfig(**config))  # type: ignore[arg-type]


def test_every_executor_numbers_its_requests_from_one(tmp_path: Path) -> None:
    b.write_engine_config(tmp_path)
    first, second = open_engine_at(tmp_path), open_engine_at(tmp_path)
    try:
        assert [first.enqueue_request(b.Request([97], 2)) for _ in range(2)] == [1, 2]
        assert second.enqueue_request(b.Request([97], 2)) == 1
    finally:
        first.shutdown()
        second.shutdown()


def test_calls_after_shutdown_raise(tmp_path: Path) -> None:
    b.write_engine_config(tmp_path)
    ex = open_engine_at(tmp_path)
    ex.shutdown()
    ex.shutdown()  # idempotent
    assert ex.can_enqueue_requests() is False
    for call in (lambda: ex.enqueue_request(b.Request([97], 2)), lambda: ex.await_responses(WAIT),
                 lambda: ex.cancel_request(1), ex.get_latest_iteration_stats,
                 ex.get_latest_request_stats, ex.get_num_responses_ready):
        with pytest.raises(RuntimeError, match="Shutdown called"):
            call()


def test_a_queued_cancel_ends_only_once_scheduled(tmp_path: Path) -> None:
    b.write_engine_config(tmp_path, max_batch_size=1)
    ex = open_engine_at(tmp_path)
    try:
        first = ex.enqueue_request(b.Request([97], 30, streaming=True))
        second = ex.enqueue_request(b.Request([97], 30))
        ex.cancel_request(second)
        done = finals(ex, second)
        assert done.result.finish_reasons == [b.FinishReason.CANCELLED]
        assert done.result.output_token_ids[0]  # it ran its context step before ending
        assert finals(ex, first).result.finish_reasons == [b.FinishReason.LENGTH]
    finally:
        ex.shutdown()


def test_validate_clamps_and_refuses_as_llm_request_does(tmp_path: Path) -> None:
    b.write_engine_config(tmp_path, max_seq_len=20, max_draft_len=4)
    config = json.loads((tmp_path / "config.json").read_text())["build_config"]
    assert config["speculative_decoding_mode"] == 2  # DRAFT_TOKENS_EXTERNAL, not 8 (lookahead)
    ex = open_engine_at(tmp_path)
    only_new = b.OutputConfig(exclude_input_from_output=True)

    def run(prompt_len: int, max_tokens: int, drafts: int = 0) -> b.Response:
        draft = b.ExternalDraftTokensConfig([97] * drafts) if drafts else None
        return finals(ex, ex.enqueue_request(b.Request(
            [97] * prompt_len, max_tokens, output_config=only_new,
            external_draft_tokens_config=draft)))

    try:
        assert len(run(10, 10).result.output_token_ids[0]) == 20 - 10 - 4  # K reserved
        nothing_left = run(16, 1)
        assert nothing_left.result.output_token_ids[0] == []
        assert nothing_left.result.finish_reasons == [b.FinishReason.LENGTH]
        assert "Draft tokens length (5) exceeds maximum draft tokens length (4)" in \
            run(4, 6, drafts=5).error_msg
        assert "exceeds maximum input length (19)" in run(20, 1).error_msg
    finally:
        ex.shutdown()


def test_unset_sampling_is_greedy_and_explicit_sampling_draws(tmp_path: Path) -> None:
    b.write_engine_config(tmp_path)
    ex = open_engine_at(tmp_path)

    def tokens(sampling: b.SamplingConfig) -> list[int]:
        request = b.Request([97, 98], 12, sampling_config=sampling,
                            output_config=b.OutputConfig(exclude_input_from_output=True))
        return list(finals(ex, ex.enqueue_request(request)).result.output_token_ids[0])

    try:
        greedy = tokens(b.SamplingConfig(1, top_k=1))
        assert tokens(b.SamplingConfig(1, temperature=0.8, seed=1)) == greedy  # k=0, p=0
        sampled = {tuple(tokens(b.SamplingConfig(1, top_k=0, top_p=1.0, temperature=0.8,
                                                 seed=s))) for s in (1, 2, 3)}
        assert len(sampled) == 3 and tuple(greedy) not in sampled
        again = tokens(b.SamplingConfig(1, top_k=0, top_p=1.0, temperature=0.8, seed=1))
        assert tuple(again) in sampled
    finally:
        ex.shutdown()


def test_the_kv_pool_returns_to_the_device_when_the_executor_is_destroyed(
        tmp_path: Path) -> None:
    device = fake_model.FakeDevice(total_blocks=1000)
    original, fake_model.DEVICE = fake_model.DEVICE, device
    try:
        b.write_engine_config(tmp_path, fake={"num_blocks": 10**6})
        ex = open_engine_at(tmp_path, kv_cache_config=b.KvCacheConfig(
            free_gpu_memory_fraction=0.5))
        assert ex.limits.num_blocks == 500 and device.used == 500
        ex.shutdown()
        assert device.used == 500  # shutdown() keeps the pool
        del ex
        gc.collect()
        assert device.used == 0
    finally:
        fake_model.DEVICE = original
