"""The SDK's and the CLI's credentials: API keys (and the warning for a key sent in the clear
to another machine), TLS and client certificates, against a server with all of them on."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from client import Client, PermissionDenied, Unauthenticated, tls_credentials
from client.cli import main
from client.credentials import is_loopback, warn_if_plaintext_key
from tests.certs import issue, make_ca
from tests.unit.server.tenants import KEY_A, KEY_B, write_keys

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("target", "loopback"),
    [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:5", True),
     ("10.0.0.2:50051", False), ("api.example.com:443", False), ("dns:///127.0.0.1:9", True)],
)
def test_a_key_in_the_clear_to_another_machine_warns(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_plaintext_key(target, secure=False)
        warn_if_plaintext_key(target, secure=True)
    assert len(caught) == (0 if loopback else 1)


def test_a_client_certificate_needs_its_key(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert = issue(ca, tmp_path, "c", client=True)
    with pytest.raises(ValueError, match="both cert and key"):
        tls_credentials(ca.cert, cert.cert)


@pytest.fixture(scope="module")
def secure_server(tiny_engine, tmp_path_factory):  # type: ignore[no-untyped-def]
    from server.app import serve_in_thread
    from server.config import ServerConfig

    tmp = tmp_path_factory.mktemp("secure")
    ca = make_ca(tmp)
    cert = issue(ca, tmp, "server")
    keys = write_keys(tmp / "keys.json")
    thread = serve_in_thread(ServerConfig(
        engine=str(tiny_engine), port=0, metrics_port=-1, job_store=":memory:",
        tls_cert=str(cert.cert), tls_key=str(cert.key), auth_keys=str(keys)))
    yield thread, ca
    thread.stop(grace_s=1.0)


def test_the_sdk_sends_its_key_over_tls(secure_server) -> None:  # type: ignore[no-untyped-def]
    thread, ca = secure_server
    target = f"localhost:{thread.server.port}"
    with Client(target, credentials=tls_credentials(ca.cert), api_key=KEY_A) as client:
        job = client.submit_batch([{"prompt": "hi", "max_tokens": 2}])
        assert client.get_batch(job.id).id == job.id
        with pytest.raises(PermissionDenied):
            client.get_batch(job.id, tenant="b")
    with Client(target, credentials=tls_credentials(ca.cert), api_key=KEY_B) as other:
        assert other.list_batches() == []
    with Client(target, credentials=tls_credentials(ca.cert)) as anonymous, \
            pytest.raises(Unauthenticated):
        anonymous.list_models()


def test_the_cli_takes_a_key_and_a_ca(secure_server, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    thread, ca = secure_server
    target = f"localhost:{thread.server.port}"
    base = ["models", "--target", target, "--tls-ca", str(ca.cert)]
    assert main([*base, "--api-key", KEY_A]) == 0
    assert "tiny-llama" in capsys.readouterr().out
    monkeypatch.setenv("BACKFILL_API_KEY", "bfk_wrong")
    assert main(base) == 1  # the environment's key, refused
    assert "UNAUTHENTICATED" in capsys.readouterr().err
