"""The OpenAI-compatible HTTP surface, driven by the real ``openai`` client against the tiny
engine's CPU executor: completions, chat, streaming, logprobs, n, errors, tiers, files and
batches, disconnects and drain; and parity with the gRPC surface on the same server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer
from server.executor.cpu import CpuExecutor
from tests.unit.server.conftest import MakeServer, is_idle, wait_until

pytestmark = pytest.mark.unit
PROMPT = "the quick brown fox jumps over the lazy dog " * 3


@pytest.fixture
async def http_server(make_server: MakeServer, tiny_engine: Path) -> BackfillServer:
    return await make_server(CpuExecutor.open(tiny_engine), http_port=0)


@pytest.fixture
async def client(http_server: BackfillServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{http_server.http_address}/v1", api_key="none",
                              max_retries=0)


async def http_call(address: str, method: str, path: str, body: object = None,
                    *, first_event_only: bool = False) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection (closed after, or after the first SSE event
    when ``first_event_only``: a client that goes away mid-stream)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = b"" if body is None else json.dumps(body).encode()
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    status = int((await reader.readline()).split()[1])
    if first_event_only:
        while b"data: " not in await reader.readline():
            pass
        out = b""
    else:
        out = await reader.read()
    writer.close()
    return status, out.split(b"\r\n\r\n", 1)[-1]


async def grpc_generate(server: BackfillServer, request: pb.GenerateRequest
                        ) -> list[pb.GenerateResponse]:
    async with __import__("grpc").aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        return [chunk async for chunk in stub.Generate(request)]


async def test_completion_matches_grpc_and_reports_usage(
    http_server: BackfillServer, client: openai.AsyncOpenAI
) -> None:
    done = await client.completions.create(model="auto", prompt=PROMPT, max_tokens=8,
                                           extra_body={"ignore_eos": True})
    chunks = await grpc_generate(http_server, pb.GenerateRequest(
        text=PROMPT, sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)))
    assert done.choices[0].text == "".join(c.text for c in chunks)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 8
    assert done.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


async def test_chat_stream_equals_the_whole_answer_and_ends_with_usage(
    client: openai.AsyncOpenAI,
) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    whole = await client.chat.completions.create(model="auto", messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=10, seed=3)
    stream = await client.chat.completions.create(
        model="auto", messages=messages, max_tokens=10, seed=3, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


async def test_streamed_chat_logprobs_one_per_token_best_first(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    entries, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            entries += chunk.choices[0].logprobs.content or []
        usage = chunk.usage or usage
    assert usage is not None and len(entries) == usage.completion_tokens == 6
    for e in entries:
        values = [t.logprob for t in e.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert e.logprob <= values[0] + 1e-9  # greedy: the chosen token is the best
        assert e.logprob == pytest.approx(values[0])


async def test_echo_logprobs_score_the_prompt_as_grpc_does(
    http_server: BackfillServer, client: openai.AsyncOpenAI
) -> None:
    done = await client.completions.create(model="auto", prompt=PROMPT, max_tokens=1, echo=True,
                                           logprobs=2)
    lp = done.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    chunks = await grpc_generate(http_server, pb.GenerateRequest(
        text=PROMPT, sampling=pb.SamplingParams(max_tokens=1, prompt_logprobs=2, logprobs=2)))
    prompt_lp = [p.logprob for p in chunks[0].prompt_logprobs]
    assert done.choices[0].text.startswith(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(prompt_lp) + 2  # first prompt token + generated one
    assert lp.token_logprobs[1:-1] == pytest.approx(prompt_lp, abs=1e-6)
    assert "".join(lp.tokens or []) == done.choices[0].text


async def test_n_choices_are_seeded_distinct_and_counted_once(
    http_server: BackfillServer, client: openai.AsyncOpenAI
) -> None:
    def ask() -> object:
        return client.completions.create(model="auto", prompt=PROMPT, max_tokens=6, n=3,
                                          seed=11, temperature=1.0,
                                          extra_body={"ignore_eos": True})

    first, again = await ask(), await ask()  # type: ignore[misc]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert first.usage.completion_tokens == 18
    # The other choices started from the prompt's blocks in the prefix cache.
    assert first.usage.prompt_tokens_details.cached_tokens > 0
    chunks = await grpc_generate(http_server, pb.GenerateRequest(
        text=PROMPT, n=3, sampling=pb.SamplingParams(max_tokens=6, seed=11, temperature=1.0,
                                                     ignore_eos=True)))
    by_index = {i: "".join(c.text for c in chunks if c.index == i) for i in range(3)}
    assert [by_index[i] for i in range(3)] == texts
    assert sum(1 for c in chunks if c.finish_reason) == 3
    await wait_until(lambda: is_idle(http_server))


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"prompt": "x", "top_p": 3}, "top_p", "top_p must be in (0, 1]"),
        ({"prompt": "x", "model": "nope"}, "model", "unknown model"),
        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools", "tools"),
        ({"prompt": "x", "logprobs": 50}, "logprobs", "logprobs must be in [0, 20]"),
        ({"prompt": "x", "presence_penalty": 5}, "presence_penalty", "[-2, 2]"),
        ({"prompt": ""}, "prompt", "must not be empty"),
    ],
)
async def test_bad_requests_get_openai_errors_naming_the_field(
    client: openai.AsyncOpenAI, body: dict[str, object], param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/completions", body=body, cast_to=object)
    error = caught.value.body
    assert isinstance(error, dict) and needle in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_priority_picks_the_tier(http_server: BackfillServer,
                                       client: openai.AsyncOpenAI) -> None:
    before = http_server.scheduler.snapshot().offline.finished
    await client.completions.create(model="auto", prompt="x", max_tokens=2,
                                    extra_body={"priority": "offline"})
    await client.completions.create(model="auto", prompt="x", max_tokens=2,
                                    extra_headers={"x-backfill-priority": "1"})
    await client.completions.create(model="auto", prompt="x", max_tokens=2)
    assert http_server.scheduler.snapshot().offline.finished == before + 2


async def test_files_and_batches_run_offline_with_openai_output(
    http_server: BackfillServer, client: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "auto", "messages": [{"role": "user", "content": f"q{i}"}],
                       "max_tokens": 3}} for i in range(4)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [], "max_tokens": 3}})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    uploaded = await client.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size
    assert (await client.files.content(uploaded.id)).content == path.read_bytes()
    batch = await client.batches.create(input_file_id=uploaded.id,
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"run": "1"})
    for _ in range(500):
        batch = await client.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed"):
            break
        await asyncio.sleep(0.02)
    assert batch.status == "completed" and batch.metadata == {"run": "1"}
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (5, 4, 1)
    assert batch.output_file_id and batch.error_file_id
    out = (await client.files.content(batch.output_file_id)).text.splitlines()
    done = [json.loads(line) for line in out]
    assert [d["custom_id"] for d in done] == ["r0", "r1", "r2", "r3"]
    assert all(d["response"]["body"]["object"] == "chat.completion" for d in done)
    errors = [json.loads(line) for line in
              (await client.files.content(batch.error_file_id)).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    listed = await client.batches.list()
    assert batch.id in [b.id for b in listed.data]
    assert http_server.scheduler.snapshot().offline.finished >= 4
    other = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0,
                               default_headers={"x-backfill-tenant": "someone-else"})
    with pytest.raises(openai.NotFoundError):
        await other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await other.files.content(uploaded.id)


async def test_a_client_that_disconnects_mid_stream_frees_its_slots(
    http_server: BackfillServer,
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2000, "stream": True, "n": 2, "ignore_eos": True}
    assert http_server.http_address is not None
    status, _ = await http_call(http_server.http_address, "POST", "/v1/completions", body,
                                first_event_only=True)
    assert status == 200
    await wait_until(lambda: is_idle(http_server), timeout=10)


async def test_health_turns_503_while_draining(make_server: MakeServer) -> None:
    server = await make_server(http_port=0)
    address = server.http_address
    assert address is not None
    assert (await http_call(address, "GET", "/health"))[0] == 200
    server._servicer.draining = True
    assert (await http_call(address, "GET", "/health"))[0] == 503
    status, body = await http_call(address, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 503
    assert json.loads(body)["error"]["type"] == "service_unavailable_error"
