"""SDK behaviour the real server cannot be made to show on demand: every status code, broken
Session streams (retried only before the first token), and the error mapping itself."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import (
    AsyncClient,
    BackfillError,
    Cancelled,
    Client,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    ResourceExhausted,
    SamplingParams,
    Unavailable,
    error_from_status,
)
from client._session import Session
from tests.unit.client.fake_service import FakeServer, FakeService, expected_tokens

pytestmark = pytest.mark.unit

CODES = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, Cancelled),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.INTERNAL, Internal),
]


@pytest.fixture(scope="module")
def fake():
    server = FakeServer(FakeService())
    yield server
    server.stop()


@pytest.mark.parametrize(("code", "cls"), CODES)
def test_error_from_status_maps_enum_and_int(code, cls):
    for given in (code, code.value[0]):
        err = error_from_status(given, "why")
        assert type(err) is cls and err.code is code and "why" in str(err)
    assert err.retryable is (code is grpc.StatusCode.UNAVAILABLE)


def test_unmapped_code_is_plain_backfill_error():
    err = error_from_status(grpc.StatusCode.ABORTED, "x")
    assert type(err) is BackfillError and err.code is grpc.StatusCode.ABORTED


@pytest.mark.parametrize("transport", ["session", "unary"])
@pytest.mark.parametrize(("code", "cls"), CODES)
async def test_status_codes_raise_their_class(fake, transport, code, cls):
    async with AsyncClient(fake.address, transport=transport, max_retries=0) as client:
        with pytest.raises(cls) as info:
            await client.complete(f"error:{code.name}")
        assert info.value.code is code
        # The Session stays usable for the next request.
        done = await client.complete("ok", sampling=SamplingParams(max_tokens=3))
        assert list(done.token_ids) == expected_tokens("ok", 3)


async def test_unavailable_is_retried_before_first_token():
    server = FakeServer(FakeService(breaks=2))
    try:
        async with AsyncClient(server.address, max_retries=3, retry_backoff_s=0.01) as client:
            done = await client.complete("break", sampling=SamplingParams(max_tokens=2))
            assert list(done.token_ids) == expected_tokens("break", 2)
            assert server.service.sessions_opened == 3  # two broken streams, then a fresh one
    finally:
        server.stop()


async def test_broken_stream_fails_in_flight_requests_without_retry_after_tokens():
    server = FakeServer(FakeService(breaks=1))
    try:
        async with AsyncClient(server.address, max_retries=3, retry_backoff_s=0.01) as client:
            stream = client.generate("slow", sampling=SamplingParams(max_tokens=50))
            first = await stream.__anext__()
            assert first.token_ids == tuple(expected_tokens("slow", 1))
            breaker = client.generate("break", sampling=SamplingParams(max_tokens=1))
            breaker_task = asyncio.ensure_future(breaker.complete())
            with pytest.raises(Unavailable):
                async for _ in stream:
                    pass
            await breaker_task  # it had no token yet: retried on a fresh stream
    finally:
        server.stop()


async def test_break_sends_cancel(fake):
    async with AsyncClient(fake.address) as client:
        stream = client.generate("slow", sampling=SamplingParams(max_tokens=100),
                                 request_id="to-cancel")
        async for _ in stream:
            break
        await stream.aclose()
        assert client.num_open_requests == 0
        for _ in range(100):
            if "to-cancel" in fake.service.cancels:
                break
            await asyncio.sleep(0.01)
        assert "to-cancel" in fake.service.cancels


async def test_task_cancellation_sends_cancel(fake):
    async with AsyncClient(fake.address) as client:
        stream = client.generate("slow", sampling=SamplingParams(max_tokens=100),
                                 request_id="task-cancel")
        task = asyncio.ensure_future(stream.complete())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if "task-cancel" in fake.service.cancels:
                break
            await asyncio.sleep(0.01)
        assert "task-cancel" in fake.service.cancels


def test_client_timeout_raises_deadline_exceeded(fake):
    with Client(fake.address, timeout=0.1) as client, pytest.raises(DeadlineExceeded):
        client.complete("slow", sampling=SamplingParams(max_tokens=100))


async def test_unary_call_dropped_by_grpc_is_retried_before_first_token():
    """grpc's bare CANCELLED ("CANCELLED", not our server's "cancelled") before any response
    means the call never ran: it is resent like UNAVAILABLE."""
    server = FakeServer(FakeService(drops=2))
    try:
        async with AsyncClient(server.address, transport="unary", max_retries=3,
                               retry_backoff_s=0.01) as client:
            done = await client.complete("drop", sampling=SamplingParams(max_tokens=2))
            assert list(done.token_ids) == expected_tokens("drop", 2)
            assert server.service.drops == 0
    finally:
        server.stop()


async def test_unary_server_cancel_with_a_message_is_not_retried():
    server = FakeServer(FakeService(drops=1))
    try:
        async with AsyncClient(server.address, transport="unary", max_retries=0) as client:
            with pytest.raises(Unavailable):  # dropped, but no retries allowed
                await client.complete("drop")
        async with AsyncClient(server.address, transport="unary", max_retries=3,
                               retry_backoff_s=0.01) as client:
            with pytest.raises(Cancelled):  # "injected": the server meant it
                await client.complete("error:CANCELLED")
    finally:
        server.stop()


async def test_requests_queued_together_go_out_in_one_batch_message():
    server = FakeServer(FakeService(batching=True))
    try:
        async with AsyncClient(server.address) as client:
            # The first request opens the stream; the server's header enables batching.
            await client.complete("warm", sampling=SamplingParams(max_tokens=1))
            prompts = [f"p{i}" * (i + 1) for i in range(20)]
            done = await asyncio.gather(
                *(client.complete(p, sampling=SamplingParams(max_tokens=5)) for p in prompts)
            )
            assert [list(d.token_ids) for d in done] == [expected_tokens(p, 5) for p in prompts]
            assert client.num_open_requests == 0
    finally:
        server.stop()
    messages = server.service.messages
    assert messages[0].WhichOneof("kind") == "generate"  # before the header arrived
    batches = [m.batch for m in messages if m.WhichOneof("kind") == "batch"]
    assert len(batches) == 1 and len(batches[0].generate) == 20
    assert sorted(g.text for g in batches[0].generate) == sorted(prompts)


async def test_batch_messages_stay_within_the_message_limit():
    server = FakeServer(FakeService(batching=True))
    try:
        async with AsyncClient(server.address, max_message_mb=1) as client:
            await client.complete("warm", sampling=SamplingParams(max_tokens=1))
            prompts = [f"{i:02d}" + "x" * 100_000 for i in range(20)]  # ~2 MB in all
            too_big = client.complete("y" * (1 << 20), sampling=SamplingParams(max_tokens=2))
            done, refused = await asyncio.gather(
                asyncio.gather(*(client.complete(p, sampling=SamplingParams(max_tokens=2))
                                 for p in prompts)),
                too_big, return_exceptions=True)
            assert [list(d.token_ids) for d in done] == [expected_tokens(p, 2) for p in prompts]
            assert isinstance(refused, MessageTooLarge)
            assert "this client's limit of 1 MiB" in str(refused)
    finally:
        server.stop()
    batches = [m for m in server.service.messages if m.WhichOneof("kind") == "batch"]
    assert len(batches) >= 2 and all(m.ByteSize() <= 1 << 20 for m in batches)
    sent = [g.text for m in batches for g in m.batch.generate]
    assert sent == prompts  # in order, each once, the oversized one never sent


async def test_cancel_queued_with_its_request_goes_in_the_same_batch():
    def request(text: str, rid: str, n: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            text=text, client_request_id=rid, sampling=pb.SamplingParams(max_tokens=n)
        )

    async def finish(inbox) -> list[int]:
        tokens: list[int] = []
        while True:
            chunk = await inbox.next()
            tokens.extend(chunk.token_ids)
            if chunk.finish_reason:
                return tokens

    server = FakeServer(FakeService(batching=True))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            session = Session(pb_grpc.InferenceServiceStub(channel), max_bytes=1 << 20)
            await finish(session.start(request("warm", "w", 1)))
            # Started and cancelled before the writer runs: one message carries both.
            session.start(request("slow", "s", 50)).cancel()
            kept = [session.start(request(f"o{i}", f"o{i}", 3)) for i in range(3)]
            outputs = await asyncio.gather(*(finish(inbox) for inbox in kept))
            assert outputs == [expected_tokens(f"o{i}", 3) for i in range(3)]
            assert session.num_open == 0
            await session.aclose()
    finally:
        server.stop()
    batches = [m.batch for m in server.service.messages if m.WhichOneof("kind") == "batch"]
    assert len(batches) == 1
    assert [g.client_request_id for g in batches[0].generate] == ["s", "o0", "o1", "o2"]
    assert list(batches[0].cancel) == ["s"]
    assert server.service.cancels == ["s"]


async def test_old_server_without_the_header_gets_unbatched_messages():
    server = FakeServer(FakeService(batching=False))
    try:
        async with AsyncClient(server.address) as client:
            prompts = [f"q{i}" for i in range(10)]
            for _ in range(2):  # an older server ignores a batch: the requests would hang
                done = await asyncio.wait_for(asyncio.gather(
                    *(client.complete(p, sampling=SamplingParams(max_tokens=3)) for p in prompts)
                ), 10)
                assert [list(d.token_ids) for d in done] == [expected_tokens(p, 3)
                                                             for p in prompts]
    finally:
        server.stop()
    kinds = {m.WhichOneof("kind") for m in server.service.messages}
    assert kinds == {"generate"}


async def test_batched_responses_are_routed_to_their_callers():
    server = FakeServer(FakeService(batching=True))
    try:
        async with AsyncClient(server.address) as client:
            await client.complete("warm", sampling=SamplingParams(max_tokens=1))
            prompts = [f"r{i}" * (i % 7 + 1) for i in range(50)]
            done = await asyncio.gather(
                *(client.complete(p, sampling=SamplingParams(max_tokens=8)) for p in prompts)
            )
            assert [list(d.token_ids) for d in done] == [expected_tokens(p, 8) for p in prompts]
    finally:
        server.stop()
