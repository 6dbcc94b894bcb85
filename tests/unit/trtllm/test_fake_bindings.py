"""The fake itself behaves as the 1.2.1 bindings do where the adapter depends on it."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.trtllm import fake_bindings as b

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
