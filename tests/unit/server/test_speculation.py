"""Speculative decoding through the server: the per-request field on gRPC and HTTP, its
validation, and the figures it reports (usage of each response, GetStats per drafter,
ListModels, /metrics), on the tiny engine drafting for itself with its own weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import openai
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer
from server.executor.cpu import CpuExecutor
from tests.unit.server.conftest import MakeServer
from tests.unit.server.test_ops import scrape

pytestmark = pytest.mark.unit
PROMPT = "the quick brown fox jumps over the lazy dog " * 3


@pytest.fixture
async def spec_server(make_server: MakeServer,
                      tiny_engine_factory: Callable[..., Path]) -> BackfillServer:
    engine = tiny_engine_factory(draft_seed=0)  # the draft is the model itself: all accepted
    return await make_server(CpuExecutor.open(engine), http_port=0, metrics_port=0)


def _request(k: int | None, tier: pb.Tier.ValueType = pb.TIER_ONLINE) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=16, ignore_eos=True)
    if k is not None:
        sampling.num_speculative_tokens = k
    return pb.GenerateRequest(text=PROMPT, sampling=sampling, tier=tier)


async def _generate(server: BackfillServer, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        return [c async for c in stub.Generate(req)]


async def test_a_request_that_asks_speculates_and_reports_it(spec_server: BackfillServer) -> None:
    plain = await _generate(spec_server, _request(0))
    spec = await _generate(spec_server, _request(3, pb.TIER_OFFLINE))
    assert [t for c in spec for t in c.token_ids] == [t for c in plain for t in c.token_ids]
    u = spec[-1].usage
    assert u.completion_tokens == 16 and u.drafter == "draft"
    assert u.draft_tokens_proposed == u.draft_tokens_accepted > 0
    assert u.speculative_steps > 0 and u.draft_acceptance_rate == 1.0
    assert u.mean_accepted_length == pytest.approx(u.draft_tokens_accepted / u.speculative_steps)
    assert u.mean_accepted_length == pytest.approx(3.0, abs=0.5)  # 3 drafts kept a step
    assert plain[-1].usage.draft_tokens_proposed == 0 and plain[-1].usage.drafter == ""
    async with grpc.aio.insecure_channel(spec_server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        [model] = (await stub.ListModels(pb.ListModelsRequest())).models
        stats = await stub.GetStats(pb.GetStatsRequest())
    assert (model.drafter, model.max_draft_len) == ("draft", 4)
    [drafter] = stats.drafters
    assert drafter.drafter == "draft" and drafter.acceptance_rate == 1.0
    assert drafter.draft_tokens_proposed >= u.draft_tokens_proposed
    assert spec_server.metrics_url is not None
    m = await scrape(spec_server.metrics_url)
    served = ("model", model.name)  # the label every engine and request figure carries
    proposed = m["backfill_draft_tokens_proposed_total"][(served, ("tier", "offline"))]
    assert proposed == m["backfill_draft_tokens_accepted_total"][(served, ("tier", "offline"))] \
        == u.draft_tokens_proposed
    assert m["backfill_draft_acceptance_ratio"][(("drafter", "draft"), served)] == 1.0
    assert m["backfill_speculative_steps_total"][(("drafter", "draft"), served)] \
        >= u.speculative_steps


@pytest.mark.parametrize("k, needle", [(5, "at most 4 on this model"), (17, "[0, 16]")])
async def test_asking_for_too_many_is_invalid(spec_server: BackfillServer, k: int,
                                              needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _generate(spec_server, _request(k))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_speculative_tokens" in (caught.value.details() or "")
    assert needle in (caught.value.details() or "")


async def test_http_takes_the_extension_and_reports_prediction_tokens(
    spec_server: BackfillServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://{spec_server.http_address}/v1",
                                api_key="none", max_retries=0)
    plain = await client.completions.create(model="auto", prompt=PROMPT, max_tokens=12,
                                            extra_body={"ignore_eos": True,
                                                        "num_speculative_tokens": 0})
    spec = await client.completions.create(model="auto", prompt=PROMPT, max_tokens=12,
                                           extra_body={"ignore_eos": True,
                                                       "num_speculative_tokens": 2})
    assert spec.choices[0].text == plain.choices[0].text
    assert plain.usage is not None and plain.usage.completion_tokens_details is None
    details = spec.usage.completion_tokens_details if spec.usage else None
    assert details is not None and details.accepted_prediction_tokens
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens == 0
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="auto", prompt=PROMPT, max_tokens=2,
                                        extra_body={"num_speculative_tokens": -1})
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "num_speculative_tokens"
