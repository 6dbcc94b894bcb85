"""Authentication → tenant on both surfaces: API keys from the keys file (reloaded while
serving), callers that name another tenant, another tenant's jobs, health and reflection."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer
from server.config import ServerConfig
from server.security.keys import TenantLimits
from server.security.setup import load_security
from server.tenant_metrics import TenantMetrics
from tests.unit.server.conftest import MakeServer, scrape
from tests.unit.server.tenants import (
    KEY_A,
    KEY_B,
    bearer,
    generate,
    http_async,
    request,
    status_of,
    write_keys,
)

pytestmark = pytest.mark.unit
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def server(make_server: MakeServer, tmp_path: Path) -> BackfillServer:
    keys = write_keys(tmp_path / "keys.json")
    return await make_server(auth_keys=str(keys), http_port=0, reload_s=0.05, metrics_port=0)


async def test_calls_without_a_valid_key_are_unauthenticated_and_change_nothing(
    server: BackfillServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for metadata in (None, bearer("bfk_wrong"), (("authorization", "Basic eA=="),)):
            calls = [
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
                stub.GetStats(pb.GetStatsRequest(), metadata=metadata),
                stub.SubmitBatch(pb.SubmitBatchRequest(requests=[request()]), metadata=metadata),
                stub.GetBatch(pb.GetBatchRequest(id="x"), metadata=metadata),
            ]
            for call in calls:
                assert await status_of(call) == UNAUTH
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(stub, request(), None if metadata is None else "bfk_wrong")
            assert info.value.code() == UNAUTH
            session = stub.Session(iter([pb.SessionRequest(generate=request(
                client_request_id="x"))]), metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [r async for r in session]
            assert info.value.code() == UNAUTH
        assert "API key is not valid" in (
            await _details(stub.ListModels(pb.ListModelsRequest(), metadata=bearer("bfk_x"))))
    snap = server.scheduler.snapshot()
    assert snap.online.finished == snap.offline.finished == 0
    assert server.scheduler.executor_stats().steps == 0


async def _details(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.details() or ""
    return ""


async def test_the_tenant_comes_from_the_key_and_a_foreign_claim_is_denied(
    server: BackfillServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        chunks = await generate(stub, request(tenant="a"), KEY_A)
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[request()]),
                                     metadata=bearer(KEY_A))
        assert job.tenant == "a"  # the key's, with the field left empty
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(stub, request(tenant="b"), KEY_A)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tenant: 'b' is not the tenant" in (info.value.details() or "")
        denied = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[request()], tenant="b"),
                                  metadata=bearer(KEY_A))
        assert await status_of(denied) == grpc.StatusCode.PERMISSION_DENIED


async def test_tenant_b_cannot_see_list_read_or_cancel_tenant_a_jobs(
    server: BackfillServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        reqs = [request(sampling=pb.SamplingParams(max_tokens=50)) for _ in range(20)]
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=reqs, labels={"p": "q"}),
                                     metadata=bearer(KEY_A))
        for call in (stub.GetBatch(pb.GetBatchRequest(id=job.id), metadata=bearer(KEY_B)),
                     stub.CancelBatch(pb.CancelBatchRequest(id=job.id), metadata=bearer(KEY_B))):
            assert await status_of(call) == grpc.StatusCode.NOT_FOUND
        results = stub.StreamBatchResults(pb.StreamBatchResultsRequest(id=job.id),
                                          metadata=bearer(KEY_B))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [r async for r in results]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListBatches(pb.ListBatchesRequest(), metadata=bearer(KEY_B))
        assert list(listed.jobs) == []
        # b claiming to be a is denied, not answered
        claim = stub.GetBatch(pb.GetBatchRequest(id=job.id, tenant="a"), metadata=bearer(KEY_B))
        assert await status_of(claim) == grpc.StatusCode.PERMISSION_DENIED
        mine = await stub.ListBatches(pb.ListBatchesRequest(), metadata=bearer(KEY_A))
        assert [j.id for j in mine.jobs] == [job.id]
        done = [r async for r in stub.StreamBatchResults(
            pb.StreamBatchResultsRequest(id=job.id), metadata=bearer(KEY_A))]
        assert len(done) == 20 and all(not r.HasField("error") for r in done)


async def test_health_is_open_and_reflection_needs_a_key(server: BackfillServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [r async for r in stub.ServerReflectionInfo(iter([ask]))]
        assert info.value.code() == UNAUTH
        replies = [r async for r in stub.ServerReflectionInfo(iter([ask]),
                                                              metadata=bearer(KEY_B))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "backfill.v1.InferenceService" in names


async def test_keys_file_changes_apply_without_a_restart(
    server: BackfillServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def code(key: str) -> grpc.StatusCode:
            return await status_of(stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key)))

        assert await code("bfk_new") == UNAUTH
        write_keys(keys, keys=((KEY_A, "a"), ("bfk_new", "c")))  # b revoked, c added
        await _eventually(lambda: code("bfk_new"), grpc.StatusCode.OK)
        assert await code(KEY_B) == UNAUTH
        keys.write_text("{not json")  # a broken file keeps the last good one in force
        await asyncio.sleep(0.3)
        assert await code("bfk_new") == grpc.StatusCode.OK


async def _eventually(probe, expected, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await probe()) != expected:
        assert loop.time() < deadline, f"still {got}"
        await asyncio.sleep(0.05)


async def test_http_needs_a_bearer_key_except_for_health(server: BackfillServer) -> None:
    port = server.http_port
    assert port is not None
    status, headers, body = await http_async(port, "GET", "/v1/models")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    error = json.loads(body)["error"]
    assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"
    status, _, _ = await http_async(port, "GET", "/v1/models",
                                    headers={"authorization": "Bearer bfk_wrong"})
    assert status == 401
    assert (await http_async(port, "GET", "/health"))[0] == 200
    ok = await http_async(port, "POST", "/v1/completions",
                          headers={"authorization": f"Bearer {KEY_A}"},
                          body={"prompt": [1, 2, 3], "max_tokens": 3})
    assert ok[0] == 200 and json.loads(ok[2])["usage"]["completion_tokens"] == 3
    denied = await http_async(port, "POST", "/v1/completions",
                              headers={"authorization": f"Bearer {KEY_A}",
                                       "x-backfill-tenant": "b"},
                              body={"prompt": [1, 2, 3], "max_tokens": 3})
    assert denied[0] == 403 and json.loads(denied[2])["error"]["type"] == "permission_error"


async def test_auth_failures_are_counted_by_surface_and_reason(server: BackfillServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await status_of(stub.ListModels(pb.ListModelsRequest()))
        await status_of(stub.ListModels(pb.ListModelsRequest(), metadata=bearer("bfk_bad")))
    assert server.http_port is not None
    await http_async(server.http_port, "GET", "/v1/models")
    assert server.metrics_url is not None
    failures = (await scrape(server.metrics_url))["backfill_auth_failures_total"]
    assert failures == {(("reason", "missing"), ("surface", "grpc")): 1,
                        (("reason", "unknown_key"), ("surface", "grpc")): 1,
                        (("reason", "missing"), ("surface", "http")): 1}


def test_a_server_without_auth_on_a_public_address_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="server"):
        load_security(ServerConfig(host="0.0.0.0"), TenantMetrics(None))
    assert "authentication is off" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server"):
        load_security(ServerConfig(host="127.0.0.1"), TenantMetrics(None))
        keys = write_keys(tmp_path / "k.json", {"a": TenantLimits()})
        load_security(ServerConfig(host="0.0.0.0", auth_keys=str(keys)), TenantMetrics(None))
    assert "authentication is off" not in caplog.text


def test_a_server_asked_for_keys_does_not_start_without_them(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_security(ServerConfig(auth_keys=str(tmp_path / "missing.json")), TenantMetrics(None))
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": 3}')
    with pytest.raises(ValueError, match="keys must be a list"):
        load_security(ServerConfig(auth_keys=str(bad)), TenantMetrics(None))


async def test_a_revoked_key_cannot_start_requests_on_a_stream_it_opened(
    server: BackfillServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    outbox: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()

    async def messages():  # type: ignore[no-untyped-def]
        while (message := await outbox.get()) is not None:
            yield message

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Session(messages(), metadata=bearer(KEY_B))
        await outbox.put(pb.SessionRequest(generate=request(client_request_id="before")))
        while not (await call.read()).chunk.finish_reason:
            pass
        write_keys(keys, keys=((KEY_A, "a"),))  # b revoked while its stream is open
        await _eventually(lambda: status_of(pb_grpc.InferenceServiceStub(channel).ListModels(
            pb.ListModelsRequest(), metadata=bearer(KEY_B))), UNAUTH)
        await outbox.put(pb.SessionRequest(generate=request(client_request_id="after")))
        reply = await call.read()
        await outbox.put(None)
        assert reply.client_request_id == "after"
        assert reply.error.code == UNAUTH.value[0]
