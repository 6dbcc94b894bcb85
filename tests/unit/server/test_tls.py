"""TLS and mTLS on both surfaces, with certificates made by the test: plaintext and
certificate-less clients are refused at the handshake, an expired certificate is refused, a
client certificate can name the tenant, and a new certificate is served without a restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import AsyncClient, SamplingParams, Unauthenticated, tls_credentials
from server.app import BackfillServer
from tests.certs import Ca, Issued, issue, make_ca
from tests.unit.server.conftest import MakeServer
from tests.unit.server.tenants import KEY_A, bearer, http_async, request, status_of, write_keys

pytestmark = pytest.mark.unit


@pytest.fixture
def ca(tmp_path: Path) -> Ca:
    return make_ca(tmp_path)


@pytest.fixture
def server_cert(ca: Ca, tmp_path: Path) -> Issued:
    return issue(ca, tmp_path, "server")


def _channel(server: BackfillServer, ca: Ca, client: Issued | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(),
        None if client is None else client.key.read_bytes(),
        None if client is None else client.cert.read_bytes(),
    )
    return grpc.aio.secure_channel(f"localhost:{server.port}", creds)


def _context(ca: Ca, client: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


async def _list_models(channel: grpc.aio.Channel, key: str | None = None) -> grpc.StatusCode:
    stub = pb_grpc.InferenceServiceStub(channel)
    metadata = bearer(key) if key else None
    return await status_of(stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10))


async def test_tls_serves_trusting_clients_and_refuses_plaintext(
    make_server: MakeServer, ca: Ca, server_cert: Issued
) -> None:
    server = await make_server(tls_cert=str(server_cert.cert), tls_key=str(server_cert.key),
                               http_port=0)
    async with _channel(server, ca) as channel:
        assert await _list_models(channel) == grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(server.address) as plain:
        assert await _list_models(plain) == grpc.StatusCode.UNAVAILABLE
    assert server.http_port is not None
    status, _, _ = await http_async(server.http_port, "GET", "/v1/models", host="localhost",
                                    context=_context(ca))
    assert status == 200
    with pytest.raises(ConnectionError):  # plain HTTP to a TLS port
        await http_async(server.http_port, "GET", "/v1/models")
    # the SDK with tls_credentials
    async with AsyncClient(f"localhost:{server.port}", credentials=tls_credentials(ca.cert)) as c:
        done = await c.complete(token_ids=[1, 2], sampling=SamplingParams(max_tokens=3))
    assert done.usage.completion_tokens == 3


async def test_mtls_refuses_clients_without_a_valid_certificate(
    make_server: MakeServer, ca: Ca, server_cert: Issued, tmp_path: Path
) -> None:
    server = await make_server(tls_cert=str(server_cert.cert), tls_key=str(server_cert.key),
                               tls_client_ca=str(ca.cert), http_port=0)
    good = issue(ca, tmp_path, "client-ok", client=True)
    expired = issue(ca, tmp_path, "client-expired", client=True, expired=True)
    stranger = issue(make_ca(tmp_path / "..", "other-ca"), tmp_path, "client-x", client=True)
    async with _channel(server, ca, good) as channel:
        assert await _list_models(channel) == grpc.StatusCode.OK
    for bad in (None, expired, stranger):
        async with _channel(server, ca, bad) as channel:
            assert await _list_models(channel) == grpc.StatusCode.UNAVAILABLE
    assert server.http_port is not None
    port = server.http_port
    ok = await http_async(port, "GET", "/v1/models", host="localhost",
                          context=_context(ca, good))
    assert ok[0] == 200
    for bad in (None, expired):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await http_async(port, "GET", "/v1/models", host="localhost",
                             context=_context(ca, bad))
    async with _channel(server, ca, good) as channel:  # still serving after the refusals
        assert await _list_models(channel) == grpc.StatusCode.OK


async def test_a_client_certificate_names_its_tenant(
    make_server: MakeServer, ca: Ca, server_cert: Issued, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path / "keys.json", clients={"svc-a.internal": "a"})
    server = await make_server(tls_cert=str(server_cert.cert), tls_key=str(server_cert.key),
                               tls_client_ca=str(ca.cert), auth_keys=str(keys), http_port=0)
    mapped = issue(ca, tmp_path, "svc-a", client=True, sans=("svc-a.internal",))
    unmapped = issue(ca, tmp_path, "svc-z", client=True)
    async with _channel(server, ca, mapped) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[request()]))
        assert job.tenant == "a"
    async with _channel(server, ca, unmapped) as channel:
        assert await _list_models(channel) == grpc.StatusCode.UNAUTHENTICATED
        assert await _list_models(channel, KEY_A) == grpc.StatusCode.OK  # a key still works
    assert server.http_port is not None
    status, _, body = await http_async(server.http_port, "GET", "/v1/batches", host="localhost",
                                       context=_context(ca, mapped))
    assert status == 200 and [b["id"] for b in json.loads(body)["data"]] == [job.id]
    status, _, _ = await http_async(server.http_port, "GET", "/v1/batches", host="localhost",
                                    context=_context(ca, unmapped))
    assert status == 401
    async with AsyncClient(f"localhost:{server.port}",
                           credentials=tls_credentials(ca.cert, unmapped.cert, unmapped.key)
                           ) as c:
        with pytest.raises(Unauthenticated):
            await c.list_models()


def _served_serial(port: int, ca: Ca) -> int:
    """The serial number of the certificate the server presents on a new connection."""
    from cryptography import x509

    ctx = _context(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _live_copy(issued: Issued, tmp_path: Path) -> tuple[Path, Path]:
    """The certificate and key copied where the test can replace them, as a renewal does."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"
    shutil.copy(issued.cert, cert)
    shutil.copy(issued.key, key)
    return cert, key


async def test_a_renewed_certificate_is_served_without_a_restart(
    make_server: MakeServer, ca: Ca, server_cert: Issued, tmp_path: Path
) -> None:
    cert, key = _live_copy(server_cert, tmp_path)
    server = await make_server(tls_cert=str(cert), tls_key=str(key), http_port=0, reload_s=0.05)
    assert server.http_port is not None
    ports = (server.port, server.http_port)
    for port in ports:
        assert await asyncio.to_thread(_served_serial, port, ca) == server_cert.serial
    renewed = issue(ca, tmp_path, "server-renewed")
    shutil.copy(renewed.key, key)  # a moment with a key that does not match: kept out
    shutil.copy(renewed.cert, cert)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    for port in ports:
        while await asyncio.to_thread(_served_serial, port, ca) != renewed.serial:
            assert loop.time() < deadline, "the renewed certificate was not served"
            await asyncio.sleep(0.05)
    async with _channel(server, ca) as channel:
        assert await _list_models(channel) == grpc.StatusCode.OK


async def test_an_invalid_certificate_file_keeps_the_one_in_use(
    make_server: MakeServer, ca: Ca, server_cert: Issued, tmp_path: Path
) -> None:
    cert, key = _live_copy(server_cert, tmp_path)
    server = await make_server(tls_cert=str(cert), tls_key=str(key), reload_s=0.05)
    other = issue(ca, tmp_path, "other")
    shutil.copy(other.cert, cert)  # its key never comes: the pair does not match
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(_served_serial, server.port, ca) == server_cert.serial
    async with _channel(server, ca) as channel:
        assert await _list_models(channel) == grpc.StatusCode.OK
