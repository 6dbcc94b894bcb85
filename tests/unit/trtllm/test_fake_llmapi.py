"""The fake LLM API behaves as the 1.2 sources do where the adapter depends on it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.unit.trtllm import fake_llmapi as api
from tests.unit.trtllm.conftest import EOS, write_checkpoint

pytestmark = pytest.mark.unit


@pytest.fixture
def llm(llmapi: Any, tmp_path: Path) -> Any:
    model = api.LLM(str(write_checkpoint(tmp_path / "ckpt")), enable_iter_perf_stats=True,
                    max_batch_size=4, max_seq_len=128)
    yield model
    model.shutdown()


def test_arguments_are_checked_as_the_pytorch_backend_does(llmapi: Any, tmp_path: Path) -> None:
    ckpt = str(write_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="invalid argument: max_tokens_in_paged_kv_cache"):
        api.LLM(ckpt, max_tokens_in_paged_kv_cache=10)
    with pytest.raises(ValueError, match="specific to TensorRT backend"):
        api.LLM(ckpt, build_config=object())
    with pytest.raises(ValueError, match="extra inputs"):
        api.KvCacheConfig(free_gpu_memory_fraction=0.5, kv_cache_fraction=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        api.KvCacheConfig(free_gpu_memory_fraction=1.5)


def test_sampling_params_defaults_and_greedy() -> None:
    assert api.SamplingParams().max_tokens == 32
    assert api.SamplingParams()._greedy_decoding
    assert api.SamplingParams(top_k=1, temperature=0.8)._greedy_decoding
    assert not api.SamplingParams(temperature=0.8)._greedy_decoding
    with pytest.raises(ValueError):
        api.SamplingParams(top_p=1.5)


def test_requests_need_an_end_id_without_a_tokenizer(llm: Any) -> None:
    with pytest.raises(ValueError, match="end_id"):
        llm.generate_async([97, 98], api.SamplingParams(max_tokens=2))


def test_results_made_outside_a_running_loop_cannot_be_iterated_async(llm: Any) -> None:
    result = llm.generate_async([97, 98], api.SamplingParams(max_tokens=3, end_id=EOS))

    async def drain() -> None:
        async for _ in result:
            pass

    with pytest.raises(AssertionError, match="event loop was not present"):
        asyncio.run(drain())
    assert len(result.result(timeout=5).outputs[0].token_ids) == 3  # sync reads still work
    with pytest.raises(AssertionError):  # the stats queue was made here too, for good
        asyncio.run(anext_stats(llm))


async def anext_stats(llm: Any) -> list[dict[str, Any]]:
    return [item async for item in llm.get_stats_async(timeout=0.2)]


def test_stats_come_after_requests_and_stop_until_the_next(llm: Any) -> None:
    async def scenario() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        before = await anext_stats(llm)
        params = api.SamplingParams(max_tokens=4, end_id=EOS)
        await llm.generate_async([97, 98], params)
        first = await anext_stats(llm)
        idle = await anext_stats(llm)  # a drained round reports done until a new request
        await llm.generate_async([97, 98], params)
        return before, first, idle, await anext_stats(llm)

    before, first, idle, after = asyncio.run(scenario())
    assert before == [] and idle == []
    assert first and after and first[-1]["iter"] < after[0]["iter"]
    assert first[0]["kvCacheStats"]["maxNumBlocks"] == 64 and "iterLatencyMS" in first[0]


def test_stop_ids_are_cut_unless_asked_and_abort_cancels(llm: Any) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        probe = await llm.generate_async([97, 98], api.SamplingParams(max_tokens=6, end_id=EOS))
        stop = probe.outputs[0].token_ids[2]
        cut = await llm.generate_async([97, 98], api.SamplingParams(
            max_tokens=6, end_id=EOS, stop_token_ids=[stop]))
        kept = await llm.generate_async([97, 98], api.SamplingParams(
            max_tokens=6, end_id=EOS, stop_token_ids=[stop], include_stop_str_in_output=True))
        return probe, cut, kept

    probe, cut, kept = asyncio.run(scenario())
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].token_ids == \
        probe.outputs[0].token_ids[:2]
    assert kept.outputs[0].token_ids == probe.outputs[0].token_ids[:3]


def test_abort_ends_with_cancelled_and_shutdown_refuses(llm: Any) -> None:
    async def scenario() -> Any:
        result = llm.generate_async([97], api.SamplingParams(max_tokens=100, end_id=EOS),
                                    streaming=True)
        async for out in result:
            if not out.aborted():
                out.abort()
        return result

    result = asyncio.run(scenario())
    assert result.aborted() and result.outputs[0].finish_reason == "cancelled"
    assert len(result.outputs[0].token_ids) < 100
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shutting down"):
        llm.generate_async([97], api.SamplingParams(max_tokens=2, end_id=EOS))
