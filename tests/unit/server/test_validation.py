"""Every bad field is refused with INVALID_ARGUMENT and a message naming it."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes import ScriptedExecutor

pytestmark = pytest.mark.unit

Edit = Callable[[pb.GenerateRequest, int, int], None]  # (request, vocab size, max_seq_len)


def _ids(ids: list[int]) -> Edit:
    return lambda r, v, n: r.token_ids.CopyFrom(pb.TokenIds(ids=ids))


def _chat(*messages: pb.ChatMessage) -> Edit:
    return lambda r, v, n: r.chat.CopyFrom(pb.ChatMessages(messages=list(messages)))


def _sampling(**fields: object) -> Edit:
    return lambda r, v, n: r.sampling.MergeFrom(pb.SamplingParams(**fields))  # type: ignore[arg-type]


def _set(**fields: object) -> Edit:
    return lambda r, v, n: r.MergeFrom(pb.GenerateRequest(**fields))  # type: ignore[arg-type]


def _both(*edits: Edit) -> Edit:
    def apply(r: pb.GenerateRequest, v: int, n: int) -> None:
        for edit in edits:
            edit(r, v, n)

    return apply


# (edit of a valid request, expected message; {v} = vocab size, {n} = max_seq_len)
CASES: dict[str, tuple[Edit, str]] = {
    "no prompt": (
        lambda r, v, n: r.ClearField("token_ids"),
        "prompt: exactly one of text, chat, token_ids must be set",
    ),
    "empty text": (_set(text=""), "text must not be empty"),
    "empty ids": (_ids([]), "token_ids.ids must not be empty"),
    "id out of vocab": (
        lambda r, v, n: r.token_ids.CopyFrom(pb.TokenIds(ids=[1, 2, 3, v + 7])),
        "token_ids.ids[3]={v7} is >= vocab size {v}",
    ),
    "empty chat": (_chat(), "chat.messages must not be empty"),
    "chat without role": (_chat(pb.ChatMessage(content="hi")), "chat.messages[0].role"),
    "temperature high": (
        _sampling(temperature=101.0),
        "sampling.temperature must be in [0, 100], got 101",
    ),
    "temperature negative": (_sampling(temperature=-0.5), "sampling.temperature"),
    "top_p high": (_sampling(top_p=1.5), "sampling.top_p must be in (0, 1], got 1.5"),
    "top_p zero": (_sampling(top_p=0.0), "sampling.top_p must be in (0, 1], got 0"),
    "max_tokens zero": (_sampling(max_tokens=0), "sampling.max_tokens must be >= 1, got 0"),
    "min over max": (
        _sampling(max_tokens=2, min_tokens=5),
        "sampling.min_tokens (5) must not exceed max_tokens (2)",
    ),
    "min over default": (_sampling(min_tokens=100_000), "sampling.min_tokens (100000) exceeds"),
    "empty stop": (_sampling(stop=["ok", ""]), "sampling.stop[1] must not be empty"),
    "stop id out of vocab": (
        lambda r, v, n: r.sampling.stop_token_ids.append(v),
        "sampling.stop_token_ids[0]={v} is >= vocab size {v}",
    ),
    "unknown tier": (lambda r, v, n: setattr(r, "tier", 7), "tier: unknown value 7"),
    "negative deadline": (
        _set(ttft_deadline=Duration(seconds=-1)),
        "ttft_deadline must be positive",
    ),
    "zero deadline": (_set(ttft_deadline=Duration()), "ttft_deadline must be positive"),
    "long tenant": (_set(tenant="t" * 300), "tenant must be at most 256 characters"),
    "long id": (_set(client_request_id="c" * 300), "client_request_id must be at most 256"),
    "unknown model": (_set(model="x"), "model: unknown model 'x' (available: tiny-llama, auto)"),
    "prompt too long": (
        lambda r, v, n: r.token_ids.CopyFrom(pb.TokenIds(ids=[1] * n)),
        "prompt: {n} tokens leave no room to generate within the model's max_seq_len {n}",
    ),
    "chat role out of range": (
        _chat(pb.ChatMessage(role=9, content="x")),  # type: ignore[arg-type]
        "chat.messages[0].role",
    ),
    "too many stops": (_sampling(stop=[f"s{i}" for i in range(17)]), "sampling.stop: at most 16"),
}


def _valid() -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]))


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_field_is_invalid_argument_naming_it(
    case: str, stub: pb_grpc.InferenceServiceStub, executor: ScriptedExecutor
) -> None:
    edit, expected = CASES[case]
    v, n = executor.capacity.vocab_size, executor.capacity.max_seq_len
    req = _valid()
    edit(req, v, n)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [c async for c in stub.Generate(req)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected.format(v=v, n=n, v7=v + 7) in (info.value.details() or "")
    assert executor.enqueued == [], "an invalid request reached the executor"


async def test_batch_errors_name_the_request_index(
    stub: pb_grpc.InferenceServiceStub, executor: ScriptedExecutor
) -> None:
    bad = _valid()
    bad.sampling.top_p = 2.0
    batch = pb.SubmitBatchRequest(requests=[_valid(), _valid(), bad])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitBatch(batch)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[2].sampling.top_p must be in (0, 1], got 2" in (info.value.details() or "")
    assert executor.enqueued == [], "a job with an invalid request was partly queued"


async def test_empty_batch_is_refused(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitBatch(pb.SubmitBatchRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests must not be empty" in (info.value.details() or "")
