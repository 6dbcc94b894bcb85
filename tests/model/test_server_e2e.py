"""The server on the real default engine (SmolLM2-135M-Instruct, CPU executor) over gRPC on
localhost. Kept short: a handful of requests with few tokens each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import ServerThread, serve_in_thread
from server.config import ServerConfig

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def running(default_engine: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerThread]:
    config = ServerConfig(engine=str(default_engine), port=0, metrics_port=-1, window_ms=5.0,
                          job_store=str(tmp_path_factory.mktemp("jobs") / "jobs.db"))
    with serve_in_thread(config) as server:
        yield server


def is_idle(server: ServerThread) -> bool:
    snap = server.server.scheduler.snapshot()
    stats = server.server.scheduler.executor_stats()
    return (
        snap.online.running + snap.online.queued + snap.offline.running + snap.offline.queued == 0
        and stats.active == 0
        and stats.kv_blocks_used == 0
    )


async def wait_idle(server: ServerThread, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_idle(server):
        assert time.monotonic() < deadline, "the server did not return to idle"
        await asyncio.sleep(0.02)


def chat(question: str, max_tokens: int, **kw: object) -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role=pb.ROLE_USER, content=question)]
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=messages),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        **kw,  # type: ignore[arg-type]
    )


async def test_paris_through_generate_with_chat_messages(running: ServerThread) -> None:
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        req = chat("What is the capital of France?", max_tokens=16)
        chunks = [c async for c in stub.Generate(req)]
    text = "".join(c.text for c in chunks)
    assert "Paris" in text, text
    assert chunks[0].model == "smollm2-135m-instruct"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)


async def test_online_and_offline_together(running: ServerThread) -> None:
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        job = await stub.SubmitBatch(
            pb.SubmitBatchRequest(
                requests=[chat(f"Count to {n}.", max_tokens=6) for n in range(3, 7)]
            )
        )

        async def online(n: int) -> pb.GenerateResponse:
            chunks = [c async for c in stub.Generate(chat(f"Name {n} colors.", max_tokens=6))]
            return chunks[-1]

        finals = await asyncio.gather(*(online(n) for n in range(2, 6)))
        results = [
            r async for r in stub.StreamBatchResults(pb.StreamBatchResultsRequest(id=job.id))
        ]
        stats = await stub.GetStats(pb.GetStatsRequest())
    assert all(f.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP) for f in finals)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert all(r.text and not r.HasField("error") for r in results)
    tiers = {t.tier: t for t in stats.tiers}
    assert tiers[pb.TIER_ONLINE].requests_finished >= 4
    assert tiers[pb.TIER_OFFLINE].requests_finished >= 4
    assert stats.tokens_per_second > 0


async def test_cancel_mid_stream_frees_the_blocks(running: ServerThread) -> None:
    async with grpc.aio.insecure_channel(running.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Generate(
            chat("Write a long story about a dragon.", max_tokens=500)
        )
        first = await call.read()
        assert first.token_ids
        assert running.server.scheduler.executor_stats().kv_blocks_used > 0
        call.cancel()
    await wait_idle(running)


async def test_a_disconnected_session_client_leaks_nothing(running: ServerThread) -> None:
    channel = grpc.aio.insecure_channel(running.address)
    outbox: asyncio.Queue[pb.SessionRequest] = asyncio.Queue()
    for i in range(4):
        req = chat("Tell me about the sea.", max_tokens=500, client_request_id=f"r{i}")
        outbox.put_nowait(pb.SessionRequest(generate=req))

    async def messages():  # type: ignore[no-untyped-def]
        while True:
            yield await outbox.get()

    call = pb_grpc.InferenceServiceStub(channel).Session(messages())
    response = await call.read()
    assert response.chunk.token_ids
    await channel.close(grace=None)  # the client vanishes mid-stream
    await wait_idle(running)
