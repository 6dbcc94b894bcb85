"""UploadBatch through the SDK: both formats, invalid lines failing alone, OpenAI-shaped output,
idempotent retries, pieces that split lines, and refusals that leave nothing behind."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import AlreadyExists, AsyncClient, InvalidArgument, JobState
from client.jobs import openai_line, result_line
from server.app import BackfillServer
from server.jobs.upload import LineSplitter

pytestmark = pytest.mark.unit


def chat(cid: str, content: str, **body: object) -> dict[str, object]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": content}],
                     **body}}


def completion(cid: str, prompt: object, **body: object) -> dict[str, object]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny-llama", "prompt": prompt, **body}}


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


async def test_openai_file_runs_and_bad_lines_fail_alone(
    server: BackfillServer, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "in.jsonl", [
        chat("a", "hello", max_tokens=3),
        completion("b", [5, 6, 7], max_tokens=2),
        chat("c", "hi", max_tokens=2, tools=[{"type": "function"}]),
        "{not json",
        "",
        completion("b", "again", max_tokens=2),  # a custom_id used twice
        {"id": "own", "token_ids": [9, 8], "max_tokens": 4},  # Backfill's format, same file
    ])
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(path, labels={"k": "v"})
        assert (job.total, job.failed) == (6, 3)
        assert job.state in (JobState.QUEUED, JobState.RUNNING) and job.labels == {"k": "v"}
        results = [r async for r in client.results(job.id)]
        done = await client.get_batch(job.id)
    assert done.state is JobState.COMPLETED and (done.completed, done.failed) == (3, 3)
    assert done.expires_at is not None and done.expires_at - done.created_at == 24 * 3600
    assert [r.index for r in results] == list(range(6))
    a, b, c, bad_json, dup, own = results
    assert (a.url, a.model, a.request_id, len(a.token_ids)) == (
        "/v1/chat/completions", "tiny-llama", "a", 3)
    assert b.token_ids and b.usage.prompt_tokens == 3
    assert c.error is not None and "line 3: body.tools" in c.error.details
    assert bad_json.error is not None and "line 4: not JSON" in bad_json.error.details
    assert dup.error is not None and "line 6: custom_id 'b' is used by an earlier" in \
        dup.error.details
    assert own.request_id == "own" and own.url == "" and own.error is None

    body = openai_line(job.id, a)["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": a.text}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == a.usage.prompt_tokens + 3
    text = openai_line(job.id, b)
    assert text["custom_id"] == "b" and text["response"]["status_code"] == 200
    assert text["response"]["body"]["object"] == "text_completion"
    assert text["response"]["body"]["choices"][0]["text"] == b.text
    failed = openai_line(job.id, c)
    assert failed["response"]["status_code"] == 400 and failed["error"] is None
    assert failed["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert result_line(job.id, own)["id"] == "own"  # Backfill's own output format


async def test_an_upload_of_only_bad_lines_fails_the_job(
    server: BackfillServer, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ['{"promt": "typo"}', '{"prompt": ""}'])
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(path)
        assert job.state is JobState.FAILED and job.failed == 2 and job.error
        results = [r async for r in client.results(job.id)]
    assert "unknown keys ['promt']" in (results[0].error.details if results[0].error else "")
    assert "text must not be empty" in (results[1].error.details if results[1].error else "")


async def test_pieces_may_split_lines_anywhere(server: BackfillServer) -> None:
    data = b"".join(json.dumps({"id": f"q{i}", "token_ids": [i + 1], "max_tokens": 2}).encode()
                    + b"\r\n" for i in range(20))

    async def messages() -> AsyncIterator[pb.UploadBatchRequest]:
        yield pb.UploadBatchRequest(header=pb.UploadBatchHeader(tenant="t"))
        for start in range(0, len(data), 7):
            yield pb.UploadBatchRequest(data=data[start:start + 7])

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        job = await stub.UploadBatch(messages())
        assert (job.total, job.failed) == (20, 0)
        request = pb.StreamBatchResultsRequest(id=job.id, tenant="t")
        results = [r async for r in stub.StreamBatchResults(request)]
    assert [r.client_request_id for r in results] == [f"q{i}" for i in range(20)]
    assert all(len(r.token_ids) == 2 for r in results)


def test_line_splitter_bounds_a_line() -> None:
    splitter = LineSplitter(max_line_bytes=8)
    out = splitter.feed(b"ab\ncdefghij") + splitter.feed(b"klm\nn") + splitter.finish()
    assert out == [(b"ab", 2), (None, 11), (b"n", 1)]


async def test_refused_uploads_leave_nothing_behind(server: BackfillServer) -> None:
    async def send(*messages: pb.UploadBatchRequest) -> grpc.aio.AioRpcError:
        async def gen() -> AsyncIterator[pb.UploadBatchRequest]:
            for m in messages:
                yield m

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UploadBatch(gen())
        return info.value

    header = pb.UploadBatchRequest(header=pb.UploadBatchHeader())
    data = pb.UploadBatchRequest(data=b'{"prompt": "x"}\n')
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for messages, needle in [
            ((), "the upload is empty"),
            ((data,), "first message of an upload must be its header"),
            ((header, data, header), "only data may follow"),
            ((header, pb.UploadBatchRequest(data=b"\n# only a comment\n")), "no requests"),
            ((pb.UploadBatchRequest(header=pb.UploadBatchHeader(model="nope")),), "header.model"),
        ]:
            error = await send(*messages)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in (error.details() or "")
        window = pb.UploadBatchHeader()
        window.completion_window.FromSeconds(-5)
        error = await send(pb.UploadBatchRequest(header=window), data)
        assert "completion_window" in (error.details() or "")
        assert (await stub.ListBatches(pb.ListBatchesRequest())).jobs == []


async def test_idempotent_upload(server: BackfillServer, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [{"token_ids": [3, 4], "max_tokens": 2}])
    other = write_lines(tmp_path / "other.jsonl", [{"token_ids": [3, 5], "max_tokens": 2}])
    async with AsyncClient(server.address) as client:
        first = await client.submit_batch(path, idempotency_key="k")
        again = await client.submit_batch(path, idempotency_key="k")
        assert again.id == first.id
        with pytest.raises(AlreadyExists, match="idempotency_key 'k'"):
            await client.submit_batch(other, idempotency_key="k")
        with pytest.raises(AlreadyExists):
            await client.submit_batch(path, idempotency_key="k", labels={"x": "y"})
        assert [j.id for j in await client.list_batches()] == [first.id]
        with pytest.raises(InvalidArgument, match="idempotency_key"):
            await client.submit_batch(path, idempotency_key="x" * 300)


async def test_a_job_larger_than_a_grpc_message_submits(
    server: BackfillServer, tmp_path: Path
) -> None:
    """Past gRPC's 4 MiB message limit, which a one-message submit cannot cross."""
    ids = list(range(1, 251)) * 2
    path = write_lines(tmp_path / "big.jsonl", [
        {"id": f"r{i}", "token_ids": ids, "max_tokens": 1} for i in range(2500)])
    assert path.stat().st_size > 5 * 1024 * 1024
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(path)
        assert (job.total, job.failed) == (2500, 0)
        tail = [r async for r in client.results(job.id, start_index=2495)]
    assert [r.request_id for r in tail] == [f"r{i}" for i in range(2495, 2500)]
    assert all(r.usage.prompt_tokens == 500 and r.error is None for r in tail)


async def test_a_refused_upload_keeps_its_status_while_the_client_still_writes(
    server: BackfillServer,
) -> None:
    """A refusal that overtakes the client's writes reaches the client as the server's status
    (grpcio's asyncio client reports INTERNAL for a write that meets the closed stream unless
    the server reads the input first); the SDK's error names the field."""
    bad_header = pb.UploadBatchHeader(model="nope")
    pieces = [json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(20)]
    async with AsyncClient(server.address) as client:
        for _ in range(30):
            with pytest.raises(InvalidArgument, match=r"header\.model"):
                await client.submit_batch([{"prompt": "x"}] * 50, model="nope")
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for _ in range(30):
                async def gen() -> AsyncIterator[pb.UploadBatchRequest]:
                    yield pb.UploadBatchRequest(header=bad_header)
                    for piece in pieces:
                        yield pb.UploadBatchRequest(data=piece)

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.UploadBatch(gen())
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
