"""The keys file (``--auth-keys FILE``): tenants and their limits, API keys, and the client
certificate names (mTLS) that map to tenants. JSON:

    {"version": 1,
     "tenants": {"team-a": {"weight": 2, "max_online_requests": 64,
                            "max_queued_offline": 200000, "tokens_per_minute": 1000000}},
     "keys": [{"id": "key-1f2e3d4c", "tenant": "team-a", "sha256": "<hex>",
               "created_at": "2025-01-01T00:00:00Z"}],
     "clients": {"svc-a.internal": "team-a"}}

A key is stored as the SHA-256 digest of its text, never the text. SHA-256 rather than a slow
password hash (scrypt, argon2): keys are 256-bit random tokens made by ``python -m server keys
add``, which no amount of guessing finds, so a slow hash would protect nothing and would cost
every request tens of milliseconds of CPU; a digest also lets a key be found with one dict
lookup. (Slow hashes are for secrets people choose; this file never holds one.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEY_PREFIX = "bfk_"  # so that secret scanners and people recognize a key
KEY_BYTES = 32
MAX_TENANT_CHARS = 256
_LIMIT_FIELDS = ("max_online_requests", "max_queued_offline", "tokens_per_minute")


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's share and quotas; None: no limit."""

    weight: float = 1.0  # share of the offline tier relative to other tenants with work waiting
    max_online_requests: int | None = None  # online requests in flight at once
    # offline requests accepted and not finished: offline-tier requests plus batch job requests
    max_queued_offline: int | None = None
    tokens_per_minute: int | None = None  # prompt + generated tokens of Generate/Session/HTTP

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and 0 < self.weight <= 1e6):
            raise ValueError(f"weight must be in (0, 1e6], got {self.weight}")
        for name in _LIMIT_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or absent), got {value!r}")


UNLIMITED = TenantLimits()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str  # names the key in listings, logs and revocation; not secret
    tenant: str
    sha256: str  # hex digest of the key's text
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """A parsed keys file. Immutable: a reload builds a new one and swaps it in."""

    tenants: Mapping[str, TenantLimits] = field(default_factory=dict)
    keys: tuple[ApiKey, ...] = ()
    clients: Mapping[str, str] = field(default_factory=dict)  # certificate name -> tenant
    _by_digest: Mapping[str, ApiKey] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, tenants: Mapping[str, TenantLimits], keys: tuple[ApiKey, ...],
              clients: Mapping[str, str]) -> KeyRing:
        return cls(dict(tenants), keys, dict(clients), {k.sha256: k for k in keys})

    def key(self, text: str) -> ApiKey | None:
        """The key whose text this is, or None."""
        return self._by_digest.get(key_digest(text))

    def limits(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, UNLIMITED)

    def tenant_names(self) -> list[str]:
        """Every tenant the file names (limits, keys or clients), sorted."""
        names = set(self.tenants) | {k.tenant for k in self.keys} | set(self.clients.values())
        return sorted(names)


def key_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key: (its text, its id)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES), "key-" + secrets.token_hex(4)


# ---- the file ----------------------------------------------------------------------------------


def load_keys(path: str | os.PathLike[str]) -> KeyRing:
    """The keys file at path (ValueError naming what is wrong; OSError if unreadable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    try:
        return parse_keys(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def parse_keys(data: Any) -> KeyRing:
    if not isinstance(data, dict):
        raise ValueError("the keys file must hold a JSON object")
    if data.get("version", 1) != 1:
        raise ValueError(f"version: unknown version {data.get('version')!r}")
    unknown = set(data) - {"version", "tenants", "keys", "clients"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    tenants = {_tenant(name, "tenants"): _limits(name, value)
               for name, value in _obj(data.get("tenants", {}), "tenants").items()}
    keys = tuple(_key(i, k) for i, k in enumerate(_list(data.get("keys", []), "keys")))
    clients = {name: _tenant(tenant, f"clients[{name!r}]")
               for name, tenant in _obj(data.get("clients", {}), "clients").items()}
    digests = [k.sha256 for k in keys]
    if len(set(digests)) != len(digests) or len({k.id for k in keys}) != len(keys):
        raise ValueError("keys: a key id or digest appears twice")
    return KeyRing.build(tenants, keys, clients)


def save_keys(path: str | os.PathLike[str], ring: KeyRing) -> None:
    """Writes the file atomically (a reader sees the old or the new file, never a part),
    readable by its owner only."""
    data = {
        "version": 1,
        "tenants": {name: _limits_json(limits) for name, limits in ring.tenants.items()},
        "keys": [asdict(k) for k in ring.keys],
        "clients": dict(ring.clients),
    }
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _limits_json(limits: TenantLimits) -> dict[str, Any]:
    return {k: v for k, v in asdict(limits).items() if v is not None}


def _limits(name: str, value: Any) -> TenantLimits:
    where = f"tenants[{name!r}]"
    obj = _obj(value, where)
    unknown = set(obj) - {"weight", *_LIMIT_FIELDS}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    weight = obj.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{where}.weight must be a number")
    try:
        return TenantLimits(float(weight), *(obj.get(k) for k in _LIMIT_FIELDS))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _key(index: int, value: Any) -> ApiKey:
    where = f"keys[{index}]"
    obj = _obj(value, where)
    digest = obj.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{where}.sha256 must be 64 lowercase hex digits")
    key_id = obj.get("id")
    if not isinstance(key_id, str) or not key_id:
        raise ValueError(f"{where}.id must be a non-empty string")
    created = obj.get("created_at", "")
    if not isinstance(created, str):
        raise ValueError(f"{where}.created_at must be a string")
    return ApiKey(key_id, _tenant(obj.get("tenant"), f"{where}.tenant"), digest, created)


def _tenant(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TENANT_CHARS:
        raise ValueError(f"{where}: a tenant is a string of 1 to {MAX_TENANT_CHARS} characters")
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list")
    return value
