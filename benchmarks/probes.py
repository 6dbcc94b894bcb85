"""The security and robustness probes of the README's table, run against one server with
everything on (TLS with client certificates, API keys, quotas) and the HTTP surface: each
probe prints the status it got, what was expected, and whether the server still serves (a
health check and a request of another tenant succeed after it). The server runs in this
process with the scripted executor (tests.fakes) and test-made certificates (cryptography).

    python -m benchmarks.probes
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.app import BackfillServer
from server.config import ServerConfig
from server.security.keys import TenantLimits
from tests.certs import Ca, Issued, issue, make_ca
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import tiny_capacity
from tests.unit.server.tenants import KEY_A, KEY_B, bearer, http_request, write_keys

Probe = Callable[["Env"], Awaitable[str]]
PROBES: list[tuple[str, str, Probe]] = []


def probe(name: str, expected: str) -> Callable[[Probe], Probe]:
    def register(fn: Probe) -> Probe:
        PROBES.append((name, expected, fn))
        return fn

    return register


@dataclass
class Env:
    server: BackfillServer
    ca: Ca
    client: Issued  # mapped to no tenant: its calls need a key
    expired: Issued
    executor: ScriptedExecutor
    job_a: str = ""

    def channel(self, cert: Issued | None = None, plain: bool = False) -> grpc.aio.Channel:
        if plain:
            return grpc.aio.insecure_channel(self.server.address)
        cert = self.client if cert is None else cert
        creds = grpc.ssl_channel_credentials(self.ca.cert.read_bytes(), cert.key.read_bytes(),
                                             cert.cert.read_bytes())
        return grpc.aio.secure_channel(f"localhost:{self.server.port}", creds)

    def anonymous_channel(self) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(self.ca.cert.read_bytes())
        return grpc.aio.secure_channel(f"localhost:{self.server.port}", creds)

    def http(self, method: str, path: str, key: str | None, body: object = None
             ) -> Awaitable[tuple[int, dict[str, str], bytes]]:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        ctx.load_cert_chain(self.client.cert, self.client.key)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        assert self.server.http_port is not None
        return asyncio.to_thread(http_request, self.server.http_port, method, path,
                                 headers=headers, body=body, context=ctx, host="localhost")


def gen(ids: list[int] | None = None, **fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids or [1, 2]), **fields)  # type: ignore[arg-type]


async def code_of(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def stream_code(call: object) -> str:
    try:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


# ---- the issue's probes -------------------------------------------------------------------------


@probe("plaintext client (no TLS)", "refused at the connection (UNAVAILABLE)")
async def plaintext(env: Env) -> str:
    async with env.channel(plain=True) as ch:
        return await code_of(pb_grpc.InferenceServiceStub(ch).ListModels(
            pb.ListModelsRequest(), timeout=10))


@probe("no credentials", "UNAUTHENTICATED; HTTP 401")
async def no_credentials(env: Env) -> str:
    async with env.channel() as ch:
        grpc_code = await code_of(pb_grpc.InferenceServiceStub(ch).ListModels(
            pb.ListModelsRequest()))
    status, _, _ = await env.http("GET", "/v1/models", None)
    return f"{grpc_code}; HTTP {status}"


@probe("tenant B streams tenant A's results", "NOT_FOUND, nothing sent")
async def read_results(env: Env) -> str:
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        return await stream_code(stub.StreamBatchResults(
            pb.StreamBatchResultsRequest(id=env.job_a), metadata=bearer(KEY_B)))


@probe("tenant B lists jobs", "only its own (0 of A's)")
async def list_jobs(env: Env) -> str:
    async with env.channel() as ch:
        page = await pb_grpc.InferenceServiceStub(ch).ListBatches(
            pb.ListBatchesRequest(), metadata=bearer(KEY_B))
    return f"{sum(j.id == env.job_a for j in page.jobs)} of A's jobs listed"


@probe("tenant B cancels tenant A's job", "NOT_FOUND; A's 200 requests all complete")
async def cancel_job(env: Env) -> str:
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        code = await code_of(stub.CancelBatch(pb.CancelBatchRequest(id=env.job_a),
                                              metadata=bearer(KEY_B)))
        results = [r async for r in stub.StreamBatchResults(
            pb.StreamBatchResultsRequest(id=env.job_a), metadata=bearer(KEY_A))]
    ok = sum(not r.HasField("error") for r in results)
    return f"{code}; A: {ok}/{len(results)} completed"


@probe("tenant B claims to be tenant A", "PERMISSION_DENIED")
async def claim(env: Env) -> str:
    async with env.channel() as ch:
        return await code_of(pb_grpc.InferenceServiceStub(ch).GetBatch(
            pb.GetBatchRequest(id=env.job_a, tenant="a"), metadata=bearer(KEY_B)))


@probe("ttft_deadline of 2^62 s; nanos out of range", "INVALID_ARGUMENT (both)")
async def deadline(env: Env) -> str:
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        codes = [await stream_code(stub.Generate(gen(ttft_deadline=d), metadata=bearer(KEY_A)))
                 for d in (Duration(seconds=2**62), Duration(seconds=1, nanos=-1))]
    return ", ".join(codes)


@probe("three 3.9 MB prompts at once", "INVALID_ARGUMENT before tokenizing; health on time")
async def huge_prompts(env: Env) -> str:
    return await _prompts_and_health(env, "hello world, " * 300_000)


@probe("three prompts just under the size bound (64 KB of text each)",
       "tokenized off the event loop (INVALID_ARGUMENT: too many tokens); health on time")
async def bounded_prompts(env: Env) -> str:
    return await _prompts_and_health(env, "hello world, " * 5000)


async def _prompts_and_health(env: Env, text: str) -> str:
    """Three prompts of ``text`` at once while health is asked every 10 ms: the codes, and
    the slowest health answer."""
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        calls = [stream_code(stub.Generate(pb.GenerateRequest(text=text),
                                           metadata=bearer(KEY_A))) for _ in range(3)]
        started = time.perf_counter()
        worst = 0.0

        async def ping() -> None:
            nonlocal worst
            while time.perf_counter() - started < 2.0:
                t = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest())
                worst = max(worst, time.perf_counter() - t)
                await asyncio.sleep(0.01)

        codes, _ = await asyncio.gather(asyncio.gather(*calls), ping())
    return f"{', '.join(sorted(set(codes)))}; health max {worst * 1e3:.0f} ms"


@probe("duplicate client_request_id in a Session", "one INVALID_ARGUMENT, its last message")
async def duplicate(env: Env) -> str:
    async def messages():  # type: ignore[no-untyped-def]
        yield pb.SessionRequest(generate=gen(client_request_id="x",
                                             sampling=pb.SamplingParams(max_tokens=100_000)))
        await asyncio.sleep(0.2)
        yield pb.SessionRequest(generate=gen(client_request_id="x"))

    async with env.channel() as ch:
        replies = [r async for r in pb_grpc.InferenceServiceStub(ch).Session(
            messages(), metadata=bearer(KEY_A))]
    errors = [r for r in replies if r.HasField("error")]
    codes = [grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.error.code))
             for r in errors]
    last = "its last message" if replies and replies[-1].HasField("error") else "NOT last"
    return f"{', '.join(c.name for c in codes) or 'no error'}; {last}"


@probe("labels of 3 MB on a job", "INVALID_ARGUMENT; listings stay < 4 MiB")
async def labels(env: Env) -> str:
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        code = await code_of(stub.SubmitBatch(pb.SubmitBatchRequest(
            requests=[gen()], labels={"k": "v" * 3_000_000}), metadata=bearer(KEY_A)))
        page = await stub.ListBatches(pb.ListBatchesRequest(), metadata=bearer(KEY_A))
    return f"{code}; listing {page.ByteSize()} bytes"


# ---- the new probes -----------------------------------------------------------------------------


@probe("wrong API key", "UNAUTHENTICATED; HTTP 401")
async def wrong_key(env: Env) -> str:
    async with env.channel() as ch:
        grpc_code = await code_of(pb_grpc.InferenceServiceStub(ch).ListModels(
            pb.ListModelsRequest(), metadata=bearer("bfk_wrong")))
    status, _, _ = await env.http("GET", "/v1/models", "bfk_wrong")
    return f"{grpc_code}; HTTP {status}"


@probe("expired client certificate", "refused at the handshake (UNAVAILABLE)")
async def expired(env: Env) -> str:
    async with env.channel(env.expired) as ch:
        return await code_of(pb_grpc.InferenceServiceStub(ch).ListModels(
            pb.ListModelsRequest(), metadata=bearer(KEY_A), timeout=10))


@probe("client without a certificate under mTLS", "refused at the handshake (UNAVAILABLE)")
async def no_cert(env: Env) -> str:
    async with env.anonymous_channel() as ch:
        return await code_of(pb_grpc.InferenceServiceStub(ch).ListModels(
            pb.ListModelsRequest(), metadata=bearer(KEY_A), timeout=10))


@probe("tenant over its online quota (2 in flight)", "RESOURCE_EXHAUSTED naming the quota")
async def over_quota(env: Env) -> str:
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        held = [stub.Generate(gen(sampling=pb.SamplingParams(max_tokens=100_000)),
                              metadata=bearer(KEY_B)) for _ in range(2)]
        for call in held:
            await call.read()
        try:
            _ = [c async for c in stub.Generate(gen(), metadata=bearer(KEY_B))]
            got = "OK"
        except grpc.aio.AioRpcError as exc:
            got = f"{exc.code().name} ({(exc.details() or '').split(' quota')[0]})"
        status, _, _ = await env.http("POST", "/v1/completions", KEY_B,
                                            {"prompt": [1, 2], "max_tokens": 3})
        for call in held:
            call.cancel()
    return f"{got}; HTTP {status}"


async def drain(env: Env) -> str:
    """SIGTERM's drain with an offline backlog queued: offline runs started after it began."""
    async with env.channel() as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(
            requests=[gen(sampling=pb.SamplingParams(max_tokens=50))] * 2000),
            metadata=bearer(KEY_A))
        online = stub.Generate(gen(sampling=pb.SamplingParams(max_tokens=300)),
                               metadata=bearer(KEY_A))
        await online.read()
        while env.server.scheduler.snapshot().offline.running == 0:
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(env.server.stop(grace_s=30.0))
        while not env.server.scheduler.snapshot().draining:
            await asyncio.sleep(0.001)
        before = _offline_runs(env)
        while await online.read() is not grpc.aio.EOF:
            pass
        report = await stopping
    started = _offline_runs(env) - before
    left = dict(report.unfinished_by_job).get(job.id, 0)
    return (f"{started} offline runs started after the drain began (a pass under way); the "
            f"online request finished; {left} of the job's requests kept for the next start")


def _offline_runs(env: Env) -> int:
    return sum(1 for r in env.executor.enqueued if r.priority < 0.5)


# ---- running ------------------------------------------------------------------------------------


async def still_serving(env: Env) -> bool:
    async with env.channel() as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        chunks = [c async for c in pb_grpc.InferenceServiceStub(ch).Generate(
            gen(sampling=pb.SamplingParams(max_tokens=2)), metadata=bearer(KEY_A))]
    return health.status == health_pb2.HealthCheckResponse.SERVING and chunks[-1].finish_reason == (
        pb.FINISH_REASON_LENGTH)


async def run() -> list[tuple[str, str, str, str]]:
    from engine_builder.tiny import build_tiny_engine

    tmp = Path(tempfile.mkdtemp(prefix="probes-"))
    engine = build_tiny_engine(tmp / "tiny")
    ca = make_ca(tmp)
    server_cert = issue(ca, tmp, "server")
    keys = write_keys(tmp / "keys.json", {"b": TenantLimits(max_online_requests=2)})
    config = ServerConfig(engine=str(engine), port=0, http_port=0, metrics_port=-1,
                          job_store=str(tmp / "jobs.db"), tls_cert=str(server_cert.cert),
                          tls_key=str(server_cert.key), tls_client_ca=str(ca.cert),
                          auth_keys=str(keys))
    executor = ScriptedExecutor(tiny_capacity(engine), step_hook=lambda _: time.sleep(0.002))
    server = await BackfillServer.start(config, executor=executor)
    env = Env(server, ca, issue(ca, tmp, "client", client=True),
              issue(ca, tmp, "old-client", client=True, expired=True), executor)
    try:
        async with env.channel() as ch:
            job = await pb_grpc.InferenceServiceStub(ch).SubmitBatch(pb.SubmitBatchRequest(
                requests=[gen(sampling=pb.SamplingParams(max_tokens=20))] * 200,
                labels={"team": "a"}), metadata=bearer(KEY_A))
        env.job_a = job.id
        rows = []
        for name, expected, fn in PROBES:
            got = await fn(env)
            rows.append((name, expected, got, "yes" if await still_serving(env) else "NO"))
        rows.append(("SIGTERM drain with an offline backlog queued",
                     "no offline admissions once draining; queued work kept", await drain(env),
                     "(stopped)"))
    finally:
        await server.stop(grace_s=1.0)
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = asyncio.run(run())
    print("| probe | expected | result | still serving |")
    print("|---|---|---|---|")
    for name, expected, got, serving in rows:
        print(f"| {name} | {expected} | {got} | {serving} |")
    return 0 if all(serving != "NO" for *_, serving in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
