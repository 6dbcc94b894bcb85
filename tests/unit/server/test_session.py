"""Session: many requests multiplexed on one bidirectional stream."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer
from server.executor.base import SamplingParams
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import MakeServer, is_idle, tiny_capacity, wait_until

pytestmark = pytest.mark.unit


def gen(cid: str, ids: list[int], max_tokens: int = 6) -> pb.SessionRequest:
    return pb.SessionRequest(
        generate=pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids),
            sampling=pb.SamplingParams(max_tokens=max_tokens),
            client_request_id=cid,
        )
    )


class Outbox:
    """A request iterator the test feeds while the call runs."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()

    def send(self, message: pb.SessionRequest) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[pb.SessionRequest]:
        while (message := await self._queue.get()) is not None:
            yield message


async def read_rest(call: grpc.aio.StreamStreamCall) -> list[pb.SessionResponse]:
    out = []
    while (r := await call.read()) != grpc.aio.EOF:
        out.append(r)
    return out


def is_final(r: pb.SessionResponse) -> bool:
    return r.HasField("error") or r.chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def test_many_requests_multiplexed_without_cross_talk(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    prompts = {f"r{i}": [i + 1, 2 * i + 3, 5] for i in range(40)}
    requests = [gen(cid, ids, max_tokens=4 + i % 5) for i, (cid, ids) in enumerate(prompts.items())]

    async def messages() -> AsyncIterator[pb.SessionRequest]:
        for r in requests:
            yield r

    tokens: dict[str, list[int]] = defaultdict(list)
    finals: dict[str, pb.SessionResponse] = {}
    async for response in stub.Session(messages()):
        cid = response.client_request_id
        assert cid not in finals, "a message came after the request's final one"
        assert response.chunk.client_request_id == cid
        tokens[cid].extend(response.chunk.token_ids)
        if is_final(response):
            finals[cid] = response
    assert set(finals) == set(prompts)  # half-close still gets every open request's output
    for i, (cid, ids) in enumerate(prompts.items()):
        sampling = requests[i].generate.sampling
        expected, _ = executor.expected_output(ids, SamplingParams(max_tokens=sampling.max_tokens))
        assert tuple(tokens[cid]) == expected, cid
        assert finals[cid].chunk.usage.completion_tokens == len(expected)
        assert not finals[cid].HasField("error")


async def test_first_chunk_names_the_model(stub: pb_grpc.InferenceServiceStub) -> None:
    async def messages() -> AsyncIterator[pb.SessionRequest]:
        yield gen("a", [1, 2], max_tokens=3)

    responses = [r async for r in stub.Session(messages())]
    assert responses[0].chunk.model == "tiny-llama"
    assert all(r.chunk.model == "" for r in responses[1:])


async def test_errors_of_one_request_leave_the_stream_up(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    bad_top_p = gen("bad", [1, 2])
    bad_top_p.generate.sampling.top_p = 3.0

    async def messages() -> AsyncIterator[pb.SessionRequest]:
        yield bad_top_p
        yield gen("", [1, 2])
        yield gen("good", [4, 4])

    responses = [r async for r in stub.Session(messages())]
    errors = {r.client_request_id: r.error for r in responses if r.HasField("error")}
    assert errors["bad"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "sampling.top_p must be in (0, 1], got 3" in errors["bad"].message
    assert "client_request_id must be set" in errors[""].message
    good = [r for r in responses if r.client_request_id == "good"]
    assert good[-1].chunk.finish_reason == pb.FINISH_REASON_LENGTH


async def test_duplicate_open_id_ends_both_and_the_error_is_the_ids_last_message(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    """The proto promises that an error response is the last message for its id: a request
    reusing the id of an open one ends both, rather than answering an error under an id that
    then goes on streaming."""
    executor = ScriptedExecutor(tiny_capacity(tiny_engine), step_hook=lambda _: time.sleep(0.005))
    server = await make_server(executor)
    outbox = Outbox()
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Session(outbox)
        outbox.send(gen("x", [1, 2], max_tokens=10_000))
        first = await call.read()
        assert first.client_request_id == "x" and not first.HasField("error")
        outbox.send(gen("x", [3, 4], max_tokens=20))
        outbox.send(gen("y", [5, 6], max_tokens=5))
        outbox.close()
        rest = await read_rest(call)
    for_x = [r for r in rest if r.client_request_id == "x"]
    assert for_x, "the duplicate got no answer"
    assert for_x[-1].HasField("error"), "a message for the id came after its error"
    assert [r.HasField("error") for r in for_x].count(True) == 1
    assert for_x[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "client_request_id 'x' was already open" in for_x[-1].error.message
    assert [r for r in rest if r.client_request_id == "y"][-1].chunk.finish_reason == (
        pb.FINISH_REASON_LENGTH
    )
    assert len(executor.enqueued) == 2  # the first x and y; the duplicate never ran
    await wait_until(lambda: is_idle(server))  # the first x was cancelled, its slot freed


async def test_cancel_message_cancels_that_request_only(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = ScriptedExecutor(tiny_capacity(tiny_engine), step_hook=lambda _: time.sleep(0.005))
    server = await make_server(executor)
    outbox = Outbox()
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Session(outbox)
        outbox.send(gen("long", [1, 2], max_tokens=10_000))
        outbox.send(gen("short", [3, 4], max_tokens=30))
        seen: dict[str, list[pb.SessionResponse]] = defaultdict(list)
        while not seen["long"]:
            r = await call.read()
            seen[r.client_request_id].append(r)
        outbox.send(pb.SessionRequest(cancel="long"))
        outbox.send(pb.SessionRequest(cancel="never-opened"))  # a no-op
        outbox.close()
        for r in await read_rest(call):
            seen[r.client_request_id].append(r)
    long_final = seen["long"][-1]
    assert long_final.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert long_final.chunk.finish_reason == pb.FINISH_REASON_CANCELLED
    assert seen["short"][-1].chunk.finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.chunk.token_ids) for r in seen["short"]) == 30
    assert set(seen) == {"long", "short"}
    await wait_until(lambda: is_idle(server))


async def test_broken_stream_cancels_everything_it_owns(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = ScriptedExecutor(
        tiny_capacity(tiny_engine, max_slots=4), step_hook=lambda _: time.sleep(0.005)
    )
    server: BackfillServer = await make_server(executor)
    outbox = Outbox()
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Session(outbox)
        for i in range(8):  # 4 running, 4 queued
            outbox.send(gen(f"r{i}", [i + 1, 9], max_tokens=10_000))
        await call.read()

        def all_in() -> bool:  # the server has read and submitted all eight
            online = server.scheduler.snapshot().online
            return (online.running, online.queued, executor.stats().active) == (4, 4, 4)

        await wait_until(all_in)
        call.cancel()  # the client goes away without a word
    await wait_until(lambda: is_idle(server))
    snap = server.scheduler.snapshot()
    assert snap.online.finished == 8
    assert len(executor.cancels) >= 4


async def test_real_cpu_executor_session_then_broken_stream(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    """The same multiplexing over the real CPU executor on the tiny engine: finished requests
    come back whole, and breaking the stream with requests still running frees every block."""
    from server.executor.factory import load_executor

    executor = await asyncio.to_thread(load_executor, tiny_engine)
    server = await make_server(executor)
    outbox = Outbox()
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Session(outbox)
        for i in range(6):
            outbox.send(gen(f"short{i}", [i + 5, 7, 9], max_tokens=4))
        finals: dict[str, pb.SessionResponse] = {}
        tokens: dict[str, int] = defaultdict(int)
        while len(finals) < 6:
            r = await call.read()
            tokens[r.client_request_id] += len(r.chunk.token_ids)
            if is_final(r):
                finals[r.client_request_id] = r
        for cid, final in finals.items():
            assert not final.HasField("error")
            assert final.chunk.usage.completion_tokens == tokens[cid] <= 4
        for i in range(3):
            outbox.send(gen(f"long{i}", [i + 3, 4], max_tokens=100_000))
        await call.read()
        call.cancel()
    await wait_until(lambda: is_idle(server), timeout=10)


# ---- batching (SessionRequest.batch / SessionResponse.batch) ------------------------------------


def batch(*generates: pb.SessionRequest, cancel: tuple[str, ...] = ()) -> pb.SessionRequest:
    return pb.SessionRequest(
        batch=pb.SessionRequestBatch(generate=[g.generate for g in generates], cancel=cancel)
    )


def unpack(responses: list[pb.SessionResponse]) -> list[pb.SessionResponse]:
    """The responses in order, batch items in place of their batch."""
    out: list[pb.SessionResponse] = []
    for r in responses:
        if r.batch:
            assert not r.client_request_id and not r.HasField("chunk"), "a batch carries items only"
            assert all(not item.batch for item in r.batch), "batch items never nest"
            out.extend(r.batch)
        else:
            out.append(r)
    return out


async def test_batched_requests_each_get_their_own_tokens(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    prompts = {f"b{i}": [i + 2, 3 * i + 1, 7] for i in range(30)}
    generates = [
        gen(cid, ids, max_tokens=3 + i % 6) for i, (cid, ids) in enumerate(prompts.items())
    ]

    async def messages() -> AsyncIterator[pb.SessionRequest]:
        yield batch(*generates[:20])
        yield batch(*generates[20:])

    call = stub.Session(messages())
    assert ("backfill-session-batch", "1") in tuple(await call.initial_metadata())
    raw = [r async for r in call]
    assert any(len(r.batch) > 1 for r in raw), "30 requests in 2 messages: responses are batched"
    assert len(raw) < sum(len(r.batch) or 1 for r in raw)
    tokens: dict[str, list[int]] = defaultdict(list)
    finals: dict[str, pb.SessionResponse] = {}
    for r in unpack(raw):
        cid = r.client_request_id
        assert cid not in finals, "a message came after the request's final one"
        assert r.chunk.client_request_id == cid
        tokens[cid].extend(r.chunk.token_ids)
        if is_final(r):
            finals[cid] = r
    assert set(finals) == set(prompts)
    for i, (cid, ids) in enumerate(prompts.items()):
        expected, _ = executor.expected_output(ids, SamplingParams(max_tokens=3 + i % 6))
        assert tuple(tokens[cid]) == expected, cid
        assert not finals[cid].HasField("error")


async def test_cancel_inside_a_batch_cancels_just_that_request(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = ScriptedExecutor(tiny_capacity(tiny_engine), step_hook=lambda _: time.sleep(0.005))
    server = await make_server(executor)
    outbox = Outbox()
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Session(outbox)
        outbox.send(batch(gen("long1", [1, 2], 10_000), gen("long2", [3, 4], 40)))
        seen: dict[str, list[pb.SessionResponse]] = defaultdict(list)
        while not (seen["long1"] and seen["long2"]):
            for r in unpack([await call.read()]):
                seen[r.client_request_id].append(r)
        # One message: cancel a running request, start one, and start-and-cancel another.
        outbox.send(batch(gen("short", [5, 6], 30), gen("gone", [7, 8], 10_000),
                          cancel=("long1", "gone", "never-opened")))
        outbox.close()
        for r in unpack(await read_rest(call)):
            seen[r.client_request_id].append(r)
    assert set(seen) == {"long1", "long2", "short", "gone"}
    for cid in ("long1", "gone"):
        assert seen[cid][-1].error.code == grpc.StatusCode.CANCELLED.value[0], cid
        assert seen[cid][-1].chunk.finish_reason == pb.FINISH_REASON_CANCELLED
    for cid, n in (("long2", 40), ("short", 30)):
        assert seen[cid][-1].chunk.finish_reason == pb.FINISH_REASON_LENGTH, cid
        assert sum(len(r.chunk.token_ids) for r in seen[cid]) == n
    await wait_until(lambda: is_idle(server))


async def test_bad_item_in_a_batch_fails_alone_naming_its_index(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    hot = gen("hot", [1, 2])
    hot.generate.sampling.temperature = 500.0
    wrong_model = gen("wrong-model", [1, 2])
    wrong_model.generate.model = "nope"

    async def messages() -> AsyncIterator[pb.SessionRequest]:
        yield batch(gen("ok0", [4, 4]), hot, gen("", [1]), wrong_model, gen("ok4", [5, 5]))

    responses = unpack([r async for r in stub.Session(messages())])
    errors = {r.client_request_id: r.error for r in responses if r.HasField("error")}
    assert set(errors) == {"hot", "", "wrong-model"}
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in errors.values())
    assert errors["hot"].message.startswith("batch.generate[1].sampling.temperature must be in")
    assert errors[""].message == "batch.generate[2].client_request_id must be set in a Session"
    assert errors["wrong-model"].message.startswith("batch.generate[3].model: unknown model")
    for cid in ("ok0", "ok4"):
        mine = [r for r in responses if r.client_request_id == cid]
        assert mine[-1].chunk.finish_reason == pb.FINISH_REASON_LENGTH, cid
        assert sum(len(r.chunk.token_ids) for r in mine) == 6
    assert len(executor.enqueued) == 2


async def test_unbatched_client_gets_unbatched_responses(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    """An old-style client (never sends a batch) reads one response per message, even when
    many are ready at once; it may ignore the server's header."""
    async def messages() -> AsyncIterator[pb.SessionRequest]:
        for i in range(30):
            yield gen(f"u{i}", [i + 1, 3], max_tokens=4)
        bad = gen("bad", [1, 2])
        bad.generate.sampling.top_p = 2.0
        yield bad

    responses = [r async for r in stub.Session(messages())]
    assert all(not r.batch for r in responses)
    finals = {r.client_request_id for r in responses if is_final(r)}
    assert finals == {f"u{i}" for i in range(30)} | {"bad"}
    bad_error = next(r.error for r in responses if r.client_request_id == "bad")
    assert bad_error.message.startswith("sampling.top_p")  # no batch prefix
