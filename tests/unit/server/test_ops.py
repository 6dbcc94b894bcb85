"""Operations: health, reflection, ListModels, GetStats, /metrics and the graceful drain."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import MakeServer, scrape, tiny_capacity, wait_until

M = ("model", "tiny-llama")  # the label every engine figure carries
pytestmark = pytest.mark.unit

SERVICE = "backfill.v1.InferenceService"
# A held engine goes on by itself after this long, so that a failing test still ends.
HOLD_TIMEOUT_S = 30.0


def request(ids: list[int], max_tokens: int, tier: int = pb.TIER_ONLINE) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        tier=tier,  # type: ignore[arg-type]
    )


async def test_health_serving_and_reflection_lists_the_services(
    server: BackfillServer, channel: grpc.aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)

    replies = [r async for r in stub.ServerReflectionInfo(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_list_models_describes_the_engine(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    (model,) = (await stub.ListModels(pb.ListModelsRequest())).models
    cap = executor.capacity
    assert model.name == "tiny-llama" and model.backend == "cpu"
    assert model.architecture == "llama" and model.weight_quant == "none"
    assert (model.max_batch_size, model.max_seq_len, model.vocab_size) == (
        cap.max_slots,
        cap.max_seq_len,
        cap.vocab_size,
    )
    assert model.parameter_count > 0 and not model.has_draft


async def test_metrics_and_get_stats_move_with_traffic(
    make_server: MakeServer, executor: ScriptedExecutor
) -> None:
    server = await make_server(executor, metrics_port=0, price_per_hour=3.6)
    assert server.metrics_url is not None
    before = await scrape(server.metrics_url)
    assert before["backfill_slots"][(M, ("state", "free"))] == executor.capacity.max_slots
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        calls = [request([i + 1, 3], 10) for i in range(6)]
        calls += [request([i + 9], 5, pb.TIER_OFFLINE) for i in range(3)]

        async def run(r: pb.GenerateRequest) -> None:
            _ = [c async for c in stub.Generate(r)]

        await asyncio.gather(*(run(r) for r in calls))
        stats = await stub.GetStats(pb.GetStatsRequest())
    m = await scrape(server.metrics_url)
    assert m["backfill_requests_total"][(M, ("outcome", "length"), ("tier", "online"))] == 6
    assert m["backfill_requests_total"][(M, ("outcome", "length"), ("tier", "offline"))] == 3
    assert m["backfill_generated_tokens_total"][(M, ("tier", "online"))] == 60
    assert m["backfill_generated_tokens_total"][(M, ("tier", "offline"))] == 15
    assert m["backfill_prompt_tokens_total"][(M, ("tier", "online"))] == 12
    assert m["backfill_ttft_seconds_count"][(M, ("tier", "online"))] == 6
    assert m["backfill_e2e_seconds_count"][(M, ("tier", "offline"))] == 3
    assert m["backfill_inter_token_seconds_count"][(M, ("tier", "online"))] == 6 * 9
    steps = m["backfill_steps_total"][(M,)]
    assert steps > before["backfill_steps_total"][(M,)]
    triton = m["nv_trt_llm_request_metrics"]
    kinds = {dict(k)["request_type"]: v for k, v in triton.items()}
    assert set(kinds) == {"active", "max", "scheduled", "context", "waiting"}
    assert kinds["max"] == executor.capacity.max_slots and kinds["active"] == 0
    kv = {
        dict(k)["kv_cache_block_type"]: v for k, v in m["nv_trt_llm_kv_cache_block_metrics"].items()
    }
    assert kv["max"] == executor.capacity.num_kv_blocks and kv["used"] == 0
    assert kv["tokens_per"] == executor.capacity.tokens_per_block
    assert kv["free"] + kv["used"] == kv["max"]
    # GetStats reports the same figures.
    tiers = {t.tier: t for t in stats.tiers}
    assert tiers[pb.TIER_ONLINE].generated_tokens == 60
    assert tiers[pb.TIER_OFFLINE].requests_finished == 3
    assert stats.slots_total == executor.capacity.max_slots
    assert stats.kv_blocks_total == executor.capacity.num_kv_blocks
    assert stats.tokens_per_second > 0 and stats.steps > 0 and not stats.draining
    assert stats.cost_per_million_tokens == pytest.approx(1000 / stats.tokens_per_second)
    assert stats.utilization == 0.0  # the tiny engine has no profile
    assert stats.model == "tiny-llama" and [m.model for m in stats.models] == ["tiny-llama"]
    assert stats.models[0].stats.slots_total == stats.slots_total


async def test_drain_refuses_new_work_and_lets_online_finish(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    # The engine holds still twice: after its first step until both requests are in (the
    # online one cannot finish alone meanwhile), and, once each request's first token has
    # gone out (a step ago: it has two), until the drain's checks are done, so that the online
    # request keeps the drain open (had it finished, the server would stop, and a refused
    # call would meet a closed port instead of the drain).
    both_in, checked = threading.Event(), threading.Event()

    def hold(step: int) -> None:
        if step == 1:
            both_in.wait(HOLD_TIMEOUT_S)
        outputs = executor.outputs
        if len(outputs) == 2 and all(len(tokens) >= 2 for tokens in outputs.values()):
            checked.wait(HOLD_TIMEOUT_S)

    executor = ScriptedExecutor(tiny_capacity(tiny_engine), step_hook=hold)
    server = await make_server(executor)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            online = stub.Generate(request([1, 2], 40))
            offline = stub.Generate(request([3, 4], 100_000, pb.TIER_OFFLINE))
            await wait_until(lambda: _submitted(server) == (1, 1))
            both_in.set()
            tokens = list((await online.read()).token_ids)
            await offline.read()
            stopping = asyncio.ensure_future(server.stop(grace_s=10.0))
            await wait_until(lambda: server.scheduler.snapshot().draining)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in stub.Generate(request([5], 2))]
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (info.value.details() or "")
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not executor.finishes  # the online request ran throughout the checks
            assert not stopping.done()  # and the drain waits for it
            checked.set()
            await _read_to_the_end(online, offline, tokens)
            report = await stopping
    finally:
        both_in.set()
        checked.set()
    assert report.unfinished_offline == 1
    assert report.elapsed_seconds < 10.0


def _submitted(server: BackfillServer) -> tuple[int, int]:
    """Online and offline requests the scheduler took and has not finished."""
    snap = server.scheduler.snapshot()
    return snap.online.queued + snap.online.running, snap.offline.queued + snap.offline.running


async def _read_to_the_end(online: grpc.aio.UnaryStreamCall, offline: grpc.aio.UnaryStreamCall,
                           tokens: list[int]) -> None:
    """The online stream runs to its end, whole; the drain ends the offline one."""
    last = None
    while (chunk := await online.read()) != grpc.aio.EOF:
        tokens.extend(chunk.token_ids)
        last = chunk
    assert len(tokens) == 40 and last is not None
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await offline.read() != grpc.aio.EOF:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_token_figures_bucket_like_prometheus() -> None:
    """Plain-number token figures export what a prometheus_client Histogram would: bounds are
    inclusive upper limits, an event of n tokens counts n gaps, the first token no gap."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from server.metrics import _TOKEN_BUCKETS, RequestMetrics
    from server.scheduler.types import Tier

    ours, reference = CollectorRegistry(), CollectorRegistry()
    metrics = RequestMetrics(ours)
    hist = Histogram("backfill_inter_token_seconds", "x", ["model", "tier"],
                     buckets=_TOKEN_BUCKETS, registry=reference).labels("m", "online")
    events = [(1, None), (2, 0.005), (1, 0.0051), (3, 7.0), (1, 0.001)]
    for n, gap in events:
        metrics.children("m", Tier.ONLINE).tokens.observe(n, gap)
        for _ in range(n if gap is not None else 0):
            hist.observe(gap)

    def samples(registry: CollectorRegistry) -> set[str]:
        text = generate_latest(registry).decode()
        return {line for line in text.splitlines()
                if line.startswith("backfill_inter_token_seconds_")
                and 'tier="online"' in line and "_created" not in line}

    assert samples(ours) == samples(reference)
    exposition = generate_latest(ours).decode()
    assert 'backfill_generated_tokens_total{model="m",tier="online"} 8.0' in exposition
