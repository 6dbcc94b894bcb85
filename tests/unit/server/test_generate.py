"""Generate over real gRPC on localhost, with the ScriptedExecutor behind the scheduler."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from engine_builder.tokenizer import EngineTokenizer
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import MakeServer, is_idle, tiny_capacity, wait_until

pytestmark = pytest.mark.unit


def request(ids: list[int], max_tokens: int = 8, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=max_tokens), **kw
    )


def slow_executor(engine: Path, step_s: float = 0.01, **capacity: int) -> ScriptedExecutor:
    """Steps take step_s, so requests stay running long enough to be observed."""
    return ScriptedExecutor(
        tiny_capacity(engine, **capacity), step_hook=lambda _: time.sleep(step_s)
    )


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    return info.value


async def test_generate_streams_the_executors_tokens(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    executor.script([5, 6, 7], [11, 12, 13])
    chunks = [c async for c in stub.Generate(request([5, 6, 7], client_request_id="a"))]
    assert [t for c in chunks for t in c.token_ids] == [11, 12, 13]
    assert "".join(c.text for c in chunks) == "<11><12><13>"
    assert chunks[0].model == "tiny-llama"
    assert all(c.client_request_id == "a" for c in chunks)
    assert all(not c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 3)
    assert last.timing.HasField("ttft") and last.timing.HasField("total_time")


async def test_max_tokens_ends_with_length(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    chunks = [c async for c in stub.Generate(request([9, 9], max_tokens=5))]
    tokens = tuple(t for c in chunks for t in c.token_ids)
    expected, _ = executor.expected_output([9, 9], executor.enqueued[0].sampling)
    assert tokens == expected and len(tokens) == 5
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_text_prompt_is_tokenized(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub, tokenizer: EngineTokenizer
) -> None:
    req = pb.GenerateRequest(text="hello world", sampling=pb.SamplingParams(max_tokens=2))
    _ = [c async for c in stub.Generate(req)]
    assert list(executor.enqueued[0].prompt_token_ids) == tokenizer.encode("hello world")


async def test_chat_prompt_goes_through_the_template(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub, tokenizer: EngineTokenizer
) -> None:
    chat = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role=pb.ROLE_SYSTEM, content="be brief"),
            pb.ChatMessage(role=pb.ROLE_USER, content="hi"),
        ]
    )
    _ = [c async for c in stub.Generate(pb.GenerateRequest(chat=chat))]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert list(executor.enqueued[0].prompt_token_ids) == tokenizer.encode_chat(messages)


async def test_sampling_reaches_the_executor(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    sampling = pb.SamplingParams(
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        seed=42,
        max_tokens=3,
        min_tokens=1,
        stop=["x"],
        stop_token_ids=[4],
        ignore_eos=True,
    )
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=sampling)
    _ = [c async for c in stub.Generate(req)]
    s = executor.enqueued[0].sampling
    assert (s.top_k, s.seed, s.max_tokens, s.min_tokens) == (5, 42, 3, 1)
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9)
    assert (s.stop, s.stop_token_ids, s.ignore_eos) == (("x",), (4,), True)


async def test_default_max_tokens_is_capped_by_max_seq_len(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    room = executor.capacity.max_seq_len - 3
    _ = [c async for c in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3])))]
    assert executor.enqueued[0].sampling.max_tokens == min(256, room)


@pytest.mark.parametrize("name", ["", "auto", "tiny-llama"])
async def test_model_names_accepted(stub: pb_grpc.InferenceServiceStub, name: str) -> None:
    chunks = [c async for c in stub.Generate(request([3], max_tokens=1, model=name))]
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)


async def test_client_cancel_frees_slot_and_blocks(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = slow_executor(tiny_engine)
    server = await make_server(executor)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Generate(request([4, 5], max_tokens=500))
        first = await call.read()
        assert first.token_ids
        assert server.scheduler.executor_stats().kv_blocks_used > 0
        call.cancel()
        await wait_until(lambda: is_idle(server))
    assert executor.cancels, "the executor was never told to cancel"
    assert server.scheduler.snapshot().online.finished == 1


async def test_queue_full_is_resource_exhausted(make_server: MakeServer, tiny_engine: Path) -> None:
    server = await make_server(slow_executor(tiny_engine, max_slots=1), max_online_queue=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        running = stub.Generate(request([1], max_tokens=500))
        await running.read()
        queued = stub.Generate(request([2], max_tokens=1))
        await wait_until(lambda: server.scheduler.snapshot().online.queued == 1)
        err = await rpc_error(stub.Generate(request([3], max_tokens=1)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        assert [c async for c in queued][-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_ttft_deadline_is_deadline_exceeded(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    server = await make_server(slow_executor(tiny_engine, max_slots=1), preemption="off")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        running = stub.Generate(request([1], max_tokens=500))
        await running.read()
        late = request([2], max_tokens=1, ttft_deadline=Duration(nanos=20_000_000))
        err = await rpc_error(stub.Generate(late))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "ttft_deadline" in (err.details() or "")
        running.cancel()


async def test_engine_error_is_internal_with_its_message(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = ScriptedExecutor(
        tiny_capacity(tiny_engine), error_fn=lambda req, done: "boom" if done == 2 else None
    )
    server = await make_server(executor)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Generate(request([7], max_tokens=10))
        tokens: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in call:
                tokens.extend(chunk.token_ids)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" in (info.value.details() or "")
    assert len(tokens) == 2  # what came before the failure was delivered


async def test_many_concurrent_generates_get_their_own_tokens(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    prompts = [[i + 1, i + 2] for i in range(24)]

    async def run(ids: list[int]) -> tuple[int, ...]:
        chunks = [c async for c in stub.Generate(request(ids, max_tokens=6))]
        return tuple(t for c in chunks for t in c.token_ids)

    outputs = await asyncio.gather(*(run(p) for p in prompts))
    sampling = executor.enqueued[0].sampling
    for ids, out in zip(prompts, outputs, strict=True):
        assert out == executor.expected_output(ids, sampling)[0]


async def test_a_burst_of_generate_calls_is_not_dropped_by_grpc(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    """2,000 calls at once: grpc core's default backlog (1,000 parked calls) would cancel some
    with a bare CANCELLED before the servicer saw them; every one must finish normally."""
    n = 2000
    server = await make_server(ScriptedExecutor(tiny_capacity(tiny_engine, max_slots=256)),
                               max_online_queue=4 * n)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def run(i: int) -> grpc.StatusCode:
            call = stub.Generate(request([1 + i % 200, 2], max_tokens=1))
            async for _ in call:
                pass
            return await call.code()

        codes = await asyncio.gather(*(run(i) for i in range(n)), return_exceptions=True)
    failed = [c for c in codes if c != grpc.StatusCode.OK]
    assert not failed, f"{len(failed)} of {n} calls failed, e.g. {failed[0]!r}"
