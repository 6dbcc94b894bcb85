"""The keys file, its CLI, and credentials → callers (server/security)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from server.__main__ import main as server_main
from server.security.auth import ANONYMOUS, Authenticator, Caller, Refusal
from server.security.keys import (
    KEY_PREFIX,
    ApiKey,
    KeyRing,
    TenantLimits,
    key_digest,
    load_keys,
    parse_keys,
    save_keys,
)

pytestmark = pytest.mark.unit


def _add(path: Path, tenant: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert server_main(["keys", "add", "--file", str(path), "--tenant", tenant]) == 0
    return capsys.readouterr().out.strip()


def test_cli_adds_a_key_printed_once_and_stored_as_its_digest_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    key = _add(path, "team-a", capsys)
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    text = path.read_text()
    assert key not in text and key_digest(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = load_keys(path)
    found = ring.key(key)
    assert found is not None and found.tenant == "team-a"
    assert ring.key(key + "x") is None
    second = _add(path, "team-b", capsys)
    assert second != key and load_keys(path).key(second).tenant == "team-b"  # type: ignore[union-attr]


def test_cli_sets_limits_maps_certificates_lists_and_revokes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    key = _add(path, "a", capsys)
    args = ["keys", "tenant", "--file", str(path), "a", "--weight", "2",
            "--max-online-requests", "4", "--tokens-per-minute", "1000"]
    assert server_main(args) == 0
    assert server_main(["keys", "client", "--file", str(path), "svc.a", "--tenant", "a"]) == 0
    ring = load_keys(path)
    assert ring.limits("a") == TenantLimits(2.0, 4, None, 1000)
    assert ring.clients == {"svc.a": "a"}
    assert server_main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "tenant=a" in listing and key not in listing and key_digest(key) not in listing
    key_id = ring.keys[0].id
    assert server_main(["keys", "revoke", "--file", str(path), key_id]) == 0
    assert load_keys(path).key(key) is None
    assert server_main(["keys", "revoke", "--file", str(path), key_id]) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must hold a JSON object"),
        ({"keys": [{"id": "k", "tenant": "a", "sha256": "xyz"}]}, "keys[0].sha256"),
        ({"keys": [{"id": "k", "tenant": "", "sha256": "0" * 64}]}, "keys[0].tenant"),
        ({"tenants": {"a": {"weight": 0}}}, "weight must be in (0, 1e6]"),
        ({"tenants": {"a": {"max_online_requests": 0}}}, "max_online_requests must be"),
        ({"tenants": {"a": {"burst": 1}}}, "unknown keys ['burst']"),
        ({"users": {}}, "unknown keys ['users']"),
        ({"keys": [{"id": "k", "tenant": "a", "sha256": "0" * 64},
                   {"id": "k", "tenant": "b", "sha256": "1" * 64}]}, "appears twice"),
    ],
)
def test_an_invalid_keys_file_is_refused_naming_the_problem(data: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_keys(data)
    assert message in str(info.value)


def test_a_keys_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{half")
    with pytest.raises(ValueError, match=r"keys\.json: not JSON"):
        load_keys(path)


def test_authenticator_maps_keys_and_certificate_names_to_tenants() -> None:
    ring = KeyRing.build(
        {"a": TenantLimits(weight=3.0)},
        (ApiKey("k1", "a", key_digest("secret-a")), ApiKey("k2", "b", key_digest("secret-b"))),
        {"svc.b": "b"},
    )
    auth = Authenticator(ring)
    assert auth.authenticate("Bearer secret-a") == Caller("a", TenantLimits(3.0), "key k1")
    assert auth.authenticate("bearer  secret-b ").tenant == "b"  # type: ignore[union-attr]
    assert auth.authenticate("Bearer nope") is Refusal.UNKNOWN_KEY
    assert auth.authenticate("Basic c2VjcmV0") is Refusal.MALFORMED
    assert auth.authenticate(None) is Refusal.MISSING
    assert auth.authenticate(None, ["other", "svc.b"]).tenant == "b"  # type: ignore[union-attr]
    assert auth.authenticate(None, ["unmapped"]) is Refusal.UNKNOWN_CERTIFICATE
    # A key, once sent, decides: a wrong key is not rescued by a good certificate.
    assert auth.authenticate("Bearer nope", ["svc.b"]) is Refusal.UNKNOWN_KEY
    assert Authenticator(None).authenticate(None) is ANONYMOUS


def test_saving_is_atomic_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing.build({"a": TenantLimits(2.0, None, 5, None)},
                         (ApiKey("k1", "a", "f" * 64, "2025-01-01T00:00:00Z"),), {"n": "a"})
    save_keys(path, ring)
    assert load_keys(path) == ring
    assert json.loads(path.read_text())["tenants"] == {"a": {"weight": 2.0,
                                                             "max_queued_offline": 5}}
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary left behind
