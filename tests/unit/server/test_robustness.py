"""The defects found by probing the server as an attacker or a careless client would: each
test here fails without its fix (see the README's probe table)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import AsyncClient
from engine_builder.tokenizer import EngineTokenizer
from server.api.validation import MAX_PROMPT_BYTES_PER_TOKEN
from server.app import BackfillServer
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import MakeServer, is_idle, wait_until
from tests.unit.server.tenants import http_async, request, status_of

pytestmark = pytest.mark.unit
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# A held tokenizer goes on by itself after this long, so that a failing test still ends.
HOLD_TIMEOUT_S = 30.0


async def _invalid(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == INVALID, info.value.details()
    return info.value.details() or ""


async def _generate(stub: pb_grpc.InferenceServiceStub, req: pb.GenerateRequest) -> list[
        pb.GenerateResponse]:
    return [c async for c in stub.Generate(req)]


# ---- deadlines and durations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deadline", "message", "bad_window"),
    [
        (Duration(seconds=2**62), "ttft_deadline must be at most 86400 seconds", True),
        (Duration(seconds=86_401), "ttft_deadline must be at most 86400 seconds", False),
        (Duration(seconds=1, nanos=-5), "ttft_deadline must be positive", True),
        (Duration(seconds=1, nanos=2_000_000_000), "nanos in [0, 999999999]", True),
    ],
)
async def test_out_of_range_deadlines_are_invalid_not_internal(
    stub: pb_grpc.InferenceServiceStub, executor: ScriptedExecutor, deadline: Duration,
    message: str, bad_window: bool,
) -> None:
    details = await _invalid(_generate(stub, request(ttft_deadline=deadline)))
    assert message in details
    if bad_window:  # a job's completion window: the same rules, up to 366 days
        window = pb.SubmitBatchRequest(requests=[request()], completion_window=deadline)
        assert "completion_window" in await _invalid(stub.SubmitBatch(window))
    assert executor.enqueued == []
    assert (await _generate(stub, request()))[-1].finish_reason == pb.FINISH_REASON_LENGTH


# ---- prompts: size bound first, tokenized off the event loop ------------------------------------


class _TokenizerSpy:
    """Records each text encode (the thread it ran on, and its return); with ``hold``, each
    one waits for ``release`` (up to HOLD_TIMEOUT_S), the way a long prompt keeps the
    tokenizer busy, without holding the GIL (as the real long-text path does)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: bool = False) -> None:
        self.threads: list[str] = []
        self.returned = 0
        self.release = threading.Event()
        if not hold:
            self.release.set()
        real = EngineTokenizer._encode

        def encode(tok: EngineTokenizer, text: str) -> list[int]:
            self.threads.append(threading.current_thread().name)
            self.release.wait(HOLD_TIMEOUT_S)
            self.returned += 1
            return real(tok, text)

        monkeypatch.setattr(EngineTokenizer, "_encode", encode)


async def test_a_prompt_over_its_size_bound_is_refused_before_tokenizing(
    stub: pb_grpc.InferenceServiceStub, executor: ScriptedExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _TokenizerSpy(monkeypatch)
    limit = executor.capacity.max_seq_len * MAX_PROMPT_BYTES_PER_TOKEN
    text = pb.GenerateRequest(text="é" * (limit // 2 + 1))  # within limit characters, over bytes
    assert "text: the prompt is over" in await _invalid(_generate(stub, text))
    chat = pb.GenerateRequest(chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role=pb.ROLE_USER, content="x" * (limit // 2 + 1))] * 2))
    assert "chat.messages[].content: the prompt is over" in await _invalid(_generate(stub, chat))
    assert spy.threads == []


LONG_TEXT = "hello world " * 30  # long as far as POOL_PROMPT_CHARS (lowered below) goes


async def test_long_prompts_are_tokenized_off_the_loop_while_health_answers(
    server: BackfillServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("server.api.convert.POOL_PROMPT_CHARS", len(LONG_TEXT))
    spy = _TokenizerSpy(monkeypatch, hold=True)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            long = pb.GenerateRequest(text=LONG_TEXT, sampling=pb.SamplingParams(max_tokens=2))
            task = asyncio.ensure_future(_generate(stub, long))
            await wait_until(lambda: bool(spy.threads))
            await health.Check(health_pb2.HealthCheckRequest(), timeout=HOLD_TIMEOUT_S)
            # On the loop, the encode would have kept health waiting until it gave up.
            assert spy.returned == 0, "health waited for a tokenizer"
            spy.release.set()
            chunks = await task
    finally:
        spy.release.set()
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert spy.threads[0].startswith("tokenize")


async def test_a_long_session_prompt_cancelled_while_tokenizing_ends_cancelled(
    server: BackfillServer, executor: ScriptedExecutor, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("server.api.convert.POOL_PROMPT_CHARS", len(LONG_TEXT))
    spy = _TokenizerSpy(monkeypatch, hold=True)  # long tokenizes until its cancel is answered
    long = pb.GenerateRequest(text=LONG_TEXT, client_request_id="long")
    short = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), client_request_id="short",
                               sampling=pb.SamplingParams(max_tokens=3))
    gate = asyncio.Event()

    async def messages():  # type: ignore[no-untyped-def]
        yield pb.SessionRequest(generate=long)
        yield pb.SessionRequest(generate=short)
        await gate.wait()
        yield pb.SessionRequest(cancel="long")

    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.InferenceServiceStub(channel).Session(messages())
            seen: list[pb.SessionResponse] = []
            async for response in call:
                seen.append(response)
                if response.client_request_id == "short" and response.chunk.finish_reason:
                    gate.set()  # short went on while long was tokenizing; now cancel long
                if response.client_request_id == "long":
                    spy.release.set()
    finally:
        spy.release.set()
    await wait_until(lambda: spy.returned == 1)  # long's tokens came after its cancel...
    await asyncio.sleep(0.05)  # ...and a submit of them would follow at once, on the loop
    by_id = {r.client_request_id: r for r in seen}
    assert by_id["short"].chunk.finish_reason == pb.FINISH_REASON_LENGTH
    assert by_id["long"].error.code == grpc.StatusCode.CANCELLED.value[0]
    assert spy.threads and len(executor.enqueued) == 1  # long never reached the engine


def test_long_texts_are_encoded_by_the_gil_releasing_batch_call(tokenizer: EngineTokenizer
                                                                ) -> None:
    calls: list[str] = []
    real = tokenizer._tok

    class Spy:
        def encode(self, *a, **k):  # type: ignore[no-untyped-def]
            calls.append("encode")
            return real.encode(*a, **k)

        def encode_batch(self, *a, **k):  # type: ignore[no-untyped-def]
            calls.append("encode_batch")
            return real.encode_batch(*a, **k)

    text = "The quick brown fox. " * 500
    expected = list(real.encode(text, add_special_tokens=False).ids)
    tokenizer._tok = Spy()  # type: ignore[assignment]
    try:
        assert tokenizer.encode(text)[-len(expected):] == expected
        tokenizer.encode("short")
    finally:
        tokenizer._tok = real
    assert calls == ["encode_batch", "encode"]


# ---- labels and listings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({f"k{i}": "v" for i in range(17)}, "labels: at most 16 labels"),
        ({"k": "v" * 3_000_000}, "labels['k'] must be at most 512 characters"),
        ({"k" * 65: "v"}, "labels: a key must have 1 to 64 characters"),
    ],
)
async def test_oversized_labels_are_refused(
    stub: pb_grpc.InferenceServiceStub, labels: dict[str, str], message: str
) -> None:
    job = pb.SubmitBatchRequest(requests=[request()], labels=labels)
    assert message in await _invalid(stub.SubmitBatch(job))
    assert list((await stub.ListBatches(pb.ListBatchesRequest())).jobs) == []


async def test_listings_stay_under_a_default_clients_message_limit(
    server: BackfillServer,
) -> None:
    labels = {f"key-{i:02}": "😀" * 512 for i in range(16)}  # the largest labels: 4-byte chars
    options = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]  # gRPC's default
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for _ in range(101):
            await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[request()], labels=labels))
        page = await stub.ListBatches(pb.ListBatchesRequest())
        assert len(page.jobs) == 100 and page.has_more
        assert page.ByteSize() < 4 * 1024 * 1024
        rest = await stub.ListBatches(pb.ListBatchesRequest(after=page.jobs[-1].id))
        assert len(rest.jobs) == 1 and not rest.has_more
        assert "after must be at most 256" in await _invalid(
            stub.ListBatches(pb.ListBatchesRequest(after="x" * 300)))
        assert "id must be at most 256" in await _invalid(
            stub.GetBatch(pb.GetBatchRequest(id="x" * 300)))
    async with AsyncClient(server.address) as client:
        assert len(await client.list_batches()) == 101  # the SDK reads every page


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.stop.append("s" * 257), "sampling.stop[0] must be at most 256"),
        (lambda s: s.stop_token_ids.extend([1] * 257), "sampling.stop_token_ids: at most 256"),
    ],
)
async def test_repeated_and_free_text_sampling_fields_are_bounded(
    stub: pb_grpc.InferenceServiceStub, edit, message: str  # type: ignore[no-untyped-def]
) -> None:
    req = request()
    edit(req.sampling)
    assert message in await _invalid(_generate(stub, req))


async def test_model_names_and_chat_message_counts_are_bounded(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    assert "model must be at most 256" in await _invalid(_generate(stub, request(model="m" * 300)))
    many = pb.GenerateRequest(chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role=pb.ROLE_USER, content="x")] * 4097))
    assert "chat.messages: at most 4096" in await _invalid(_generate(stub, many))


async def test_http_bodies_and_metadata_are_bounded(make_server: MakeServer) -> None:
    server = await make_server(http_port=0, max_message_mb=1)
    assert server.http_port is not None
    big = {"prompt": "x" * (2 * 1024 * 1024), "max_tokens": 1}
    status, _, body = await http_async(server.http_port, "POST", "/v1/completions", body=big)
    assert status == 413 and "over the server's limit of 1 MiB" in json.loads(body)["error"][
        "message"]
    meta = {"input_file_id": "file-x", "endpoint": "/v1/completions",
            "metadata": {f"k{i}": "v" for i in range(17)}}
    status, _, body = await http_async(server.http_port, "POST", "/v1/batches", body=meta)
    assert status in (400, 404)
    assert (await http_async(server.http_port, "GET", "/health"))[0] == 200


# ---- draining -----------------------------------------------------------------------------------


async def test_draining_admits_no_offline_work_and_keeps_job_requests_pending(
    make_server: MakeServer, tiny_engine: Path,
) -> None:
    from tests.unit.server.conftest import tiny_capacity

    executor = ScriptedExecutor(tiny_capacity(tiny_engine, max_slots=4),
                                step_hook=lambda _: time.sleep(0.01))
    server = await make_server(executor)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(
            requests=[request(sampling=pb.SamplingParams(max_tokens=5))] * 300))
        online = stub.Generate(request(sampling=pb.SamplingParams(max_tokens=60)))
        await online.read()
        await wait_until(lambda: server.scheduler.snapshot().offline.running > 0)
        report_task = asyncio.ensure_future(server.stop(grace_s=10.0))
        await wait_until(lambda: server.scheduler.snapshot().draining)
        offline_before = _offline_runs(executor)
        while await online.read() is not grpc.aio.EOF:  # online keeps its grace period
            pass
        report = await report_task
    started_in_drain = _offline_runs(executor) - offline_before
    assert started_in_drain <= executor.capacity.max_slots  # at most a pass already under way
    assert report.unfinished_by_job and report.unfinished_by_job[0][0] == job.id
    assert report.unfinished_by_job[0][1] > 200  # kept in the store for the next start


def _offline_runs(executor: ScriptedExecutor) -> int:
    return sum(1 for r in executor.enqueued if r.priority < 0.5)


async def test_the_server_keeps_serving_after_every_refusal(
    server: BackfillServer, stub: pb_grpc.InferenceServiceStub,
) -> None:
    codes = [await status_of(stub.SubmitBatch(pb.SubmitBatchRequest(
        requests=[request()], labels={"k": "v" * 600})))]
    codes.append(await status_of(stub.GetBatch(pb.GetBatchRequest(id="nope"))))
    assert codes == [INVALID, grpc.StatusCode.NOT_FOUND]
    assert (await _generate(stub, request()))[-1].finish_reason == pb.FINISH_REASON_LENGTH
    await wait_until(lambda: is_idle(server))
