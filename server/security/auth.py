"""Credentials → a caller: an API key (``authorization: Bearer <key>``, gRPC metadata or the
HTTP header) or the name on a verified client certificate (mTLS) maps to a tenant through the
keys file. Knows nothing of gRPC or HTTP: the API surfaces hand it what the request carried."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from server.security.keys import UNLIMITED, KeyRing, TenantLimits

BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request acts for. ``tenant`` is None with authentication off: the request's own
    claim (a ``tenant`` field or header) names the tenant, and no limits apply."""

    tenant: str | None
    limits: TenantLimits = UNLIMITED
    via: str = ""  # what authenticated it, for logs: "key key-1f2e3d4c", "certificate NAME"


ANONYMOUS = Caller(None)


class Refusal(enum.Enum):
    """Why credentials were refused (the label of the auth failure counter)."""

    MISSING = "missing"  # no key and no mapped certificate
    MALFORMED = "malformed"  # an authorization header that is not "Bearer <key>"
    UNKNOWN_KEY = "unknown_key"
    UNKNOWN_CERTIFICATE = "unknown_certificate"  # a verified certificate no tenant claims

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Refusal.MISSING: "credentials required: send 'authorization: Bearer <API key>' or a "
                     "client certificate mapped to a tenant",
    Refusal.MALFORMED: "authorization must be 'Bearer <API key>'",
    Refusal.UNKNOWN_KEY: "the API key is not valid",
    Refusal.UNKNOWN_CERTIFICATE: "the client certificate maps to no tenant",
}


class Authenticator:
    """Maps credentials to callers with the current keys file. ``update`` swaps in a
    reloaded file; a lookup uses whichever file was current when it started (one attribute
    read, so no lock)."""

    def __init__(self, ring: KeyRing | None) -> None:
        self._ring = ring

    @property
    def enabled(self) -> bool:
        return self._ring is not None

    @property
    def ring(self) -> KeyRing | None:
        return self._ring

    def update(self, ring: KeyRing) -> None:
        self._ring = ring

    def authenticate(
        self, authorization: str | None, certificate_names: Iterable[str] = ()
    ) -> Caller | Refusal:
        """The caller, or why not. A key, when sent, decides (a wrong key is refused even
        with a good certificate); without one, the first certificate name mapped to a tenant."""
        ring = self._ring
        if ring is None:
            return ANONYMOUS
        if authorization:
            if authorization[: len(BEARER)].lower() != BEARER:
                return Refusal.MALFORMED
            key = ring.key(authorization[len(BEARER):].strip())
            if key is None:
                return Refusal.UNKNOWN_KEY
            return Caller(key.tenant, ring.limits(key.tenant), f"key {key.id}")
        names = list(certificate_names)
        for name in names:
            tenant = ring.clients.get(name)
            if tenant is not None:
                return Caller(tenant, ring.limits(tenant), f"certificate {name}")
        return Refusal.UNKNOWN_CERTIFICATE if names else Refusal.MISSING

    def limits(self, tenant: str) -> TenantLimits:
        """A tenant's limits in the current file (UNLIMITED with authentication off)."""
        ring = self._ring
        return UNLIMITED if ring is None else ring.limits(tenant)
