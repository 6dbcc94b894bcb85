"""Several engines in one server and model=auto, on two real tiny engines: the tiny Llama
(chat template; the fewer parameters, so the router's small model) and the tiny Gemma 3 (no
chat template; the large model)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer, split_engine
from server.config import ServerConfig
from tests.unit.server.conftest import scrape, wait_until
from tests.unit.server.test_http import http_call

pytestmark = pytest.mark.unit
SMALL, LARGE = "tiny-llama", "tiny-gemma"
Serve = Callable[..., Awaitable[BackfillServer]]


@pytest.fixture
async def serve(tiny_engine: Path, tiny_gemma_engine: Path,
                tmp_path: Path) -> AsyncIterator[Serve]:
    servers: list[BackfillServer] = []

    async def make(**config: Any) -> BackfillServer:
        config.setdefault("engine", (str(tiny_engine), str(tiny_gemma_engine)))
        config.setdefault("job_store", str(tmp_path / f"jobs-{len(servers)}.db"))
        config.setdefault("job_flush_ms", 5.0)
        config.setdefault("port", 0)
        config.setdefault("metrics_port", -1)
        config.setdefault("window_ms", 2.0)
        server = await BackfillServer.start(ServerConfig(**config))
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop(grace_s=0.0)


def text(prompt: str, max_tokens: int = 6, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True), **kw)


async def generate(server: BackfillServer, req: pb.GenerateRequest
                   ) -> tuple[str, list[int], list[pb.GenerateResponse]]:
    """(the model named by the first chunk, all token ids, the chunks)."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        chunks = [c async for c in pb_grpc.InferenceServiceStub(channel).Generate(req)]
    assert all(not c.model for c in chunks[1:])
    return chunks[0].model, [t for c in chunks for t in c.token_ids], chunks


def test_engines_are_repeated_flags_with_optional_names() -> None:
    from server.__main__ import parse_args

    config = parse_args(["--engine", "a", "--engine", "big=/e/b", "--route-policy", "cascade"])
    assert config.engine == ("a", "big=/e/b") and config.route_policy == "cascade"
    assert parse_args([]).engine == ("default",)
    assert ServerConfig(engine="x").engine == ("x",)
    assert split_engine("big=/e/b") == ("big", "/e/b")
    assert split_engine("/e/a=b") == (None, "/e/a=b")  # a directory with "=" in it
    with pytest.raises(ValueError, match="cascade_threshold"):
        ServerConfig(cascade_threshold=1.5)


async def test_each_engine_serves_under_its_name_with_figures_of_its_own(
        serve: Serve, tiny_engine: Path) -> None:
    server = await serve(metrics_port=0)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        listed = await stub.ListModels(pb.ListModelsRequest())
        assert [(m.name, m.architecture) for m in listed.models] == [
            (SMALL, "llama"), (LARGE, "gemma3")]
        assert [m.has_chat_template for m in listed.models] == [True, False]
        for name in (SMALL, LARGE, ""):
            model, tokens, _ = await generate(server, text("the cat", 5, model=name))
            assert model == (name or SMALL) and len(tokens) == 5
        stats = await stub.GetStats(pb.GetStatsRequest(model=LARGE))
        assert stats.model == LARGE and [m.model for m in stats.models] == [SMALL, LARGE]
        per_model = {m.model: m.stats for m in stats.models}
        assert per_model[SMALL].steps > 0 and per_model[LARGE].steps > 0
        assert stats.steps == per_model[LARGE].steps
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetStats(pb.GetStatsRequest(model="nope"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        chat = pb.GenerateRequest(model=LARGE, chat=pb.ChatMessages(
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [c async for c in stub.Generate(chat)]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no chat template" in (info.value.details() or "")
    assert server.metrics_url is not None
    m = await scrape(server.metrics_url)
    for family in ("backfill_slots", "backfill_kv_blocks", "backfill_generated_tokens_total",
                   "backfill_requests_total", "backfill_steps_total"):
        assert {dict(k)["model"] for k in m[family]} == {SMALL, LARGE}, family
    with pytest.raises(ValueError, match="called the same"):
        await serve(engine=(str(tiny_engine), str(tiny_engine)))


async def test_rules_route_by_hint_prompt_length_and_max_tokens(serve: Serve) -> None:
    server = await serve(route_max_prompt_tokens=8, route_max_new_tokens=6)
    assert (await generate(server, text("the cat", 4, model="auto")))[0] == SMALL
    long_prompt = "the cat sat on the mat and then the dog came in"
    assert (await generate(server, text(long_prompt, 4, model="auto")))[0] == LARGE
    assert (await generate(server, text("the cat", 7, model="auto")))[0] == LARGE
    hinted = text("the cat", 4, model="auto", route_hint="large")
    assert (await generate(server, hinted))[0] == LARGE
    chat = pb.GenerateRequest(model="auto", sampling=pb.SamplingParams(max_tokens=2),
                              chat=pb.ChatMessages(messages=[
                                  pb.ChatMessage(role=pb.ROLE_USER, content=long_prompt)]))
    assert (await generate(server, chat))[0] == SMALL  # the one model with a chat template
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for bad, field in ((pb.GenerateRequest(model="auto", token_ids=pb.TokenIds(ids=[1, 2])),
                            "token_ids"), (text("x", model="auto", route_hint="huge"),
                                           "route_hint")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in stub.Generate(bad)]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (info.value.details() or "")


@pytest.mark.parametrize(("threshold", "served"), [(1.0, LARGE), (0.0, SMALL)])
async def test_the_cascade_streams_one_models_answer(serve: Serve, threshold: float,
                                                     served: str) -> None:
    server = await serve(route_policy="cascade", cascade_threshold=threshold)
    prompt = "the cat sat on the mat"
    model, tokens, chunks = await generate(server, text(prompt, 8, model="auto"))
    direct_model, direct, _ = await generate(server, text(prompt, 8, model=served))
    assert model == direct_model == served
    assert tokens == direct  # the whole answer, once: no gap, no repeat
    last = chunks[-1]
    assert last.usage.completion_tokens == 8 and not any(c.logprobs for c in chunks)
    assert last.timing.ttft.ToNanoseconds() <= last.timing.total_time.ToNanoseconds()
    if served == SMALL:  # held until judged: the caller gets it all at once
        assert len(chunks) == 1
    wants = text(prompt, 8, model="auto")
    wants.sampling.logprobs = 2
    _, _, chunks = await generate(server, wants)
    assert sum(len(c.logprobs) for c in chunks) == 8  # asked for: kept


async def test_a_cancelled_cascade_frees_both_models(serve: Serve) -> None:
    server = await serve(route_policy="cascade", cascade_threshold=1.0)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        call = stub.Generate(text("the cat", 2000, model="auto"))
        await call.read()  # the large model's first chunk: the cascade escalated
        call.cancel()
    await wait_until(lambda: all(m.scheduler.snapshot().online.running == 0
                                 for m in server.models))


async def test_http_auto_names_the_model_and_lists_auto(serve: Serve) -> None:
    server = await serve(http_port=0, route_max_new_tokens=4)
    assert server.http_address is not None
    _, listed = await http_call(server.http_address, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(listed)["data"]] == [SMALL, LARGE, "auto"]
    body: dict[str, Any] = {"model": "auto", "prompt": "the cat", "max_tokens": 3,
                            "ignore_eos": True}
    for hint, served in (("", SMALL), ("large", LARGE)):
        body["route_hint"] = hint
        status, out = await http_call(server.http_address, "POST", "/v1/completions", body)
        assert status == 200 and json.loads(out)["model"] == served
    chat = {"model": LARGE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, out = await http_call(server.http_address, "POST", "/v1/chat/completions", chat)
    error = json.loads(out)["error"]
    assert status == 400 and "no chat template; send text" in error["message"]
    chat["model"] = "auto"  # the one model with a chat template serves it
    status, out = await http_call(server.http_address, "POST", "/v1/chat/completions", chat)
    assert status == 200 and json.loads(out)["model"] == SMALL


async def test_batch_jobs_route_auto_when_they_run(serve: Serve) -> None:
    server = await serve(route_max_prompt_tokens=4)
    requests = [text("the cat", 3, model="auto", client_request_id="short"),
                text("the cat sat on the mat all day", 3, model="auto",
                     client_request_id="long"),
                text("the cat", 3, model=LARGE, client_request_id="named")]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=requests))
        results = [r async for r in stub.StreamBatchResults(
            pb.StreamBatchResultsRequest(id=job.id))]
    served = {r.client_request_id: r.model for r in results}
    assert served == {"short": SMALL, "long": LARGE, "named": LARGE}
