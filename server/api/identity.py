"""Who a request acts for: the one place each surface derives a request's caller and tenant.

With authentication off (no ``--auth-keys``), the tenant is what the request names: gRPC's
``tenant`` field, HTTP's ``X-Backfill-Tenant`` header (OpenAI's clients send custom headers
with ``default_headers`` / ``extra_headers``). With it on, credentials name the tenant: an API
key (``authorization: Bearer <key>``, gRPC metadata or HTTP header) or a verified client
certificate mapped in the keys file. A request without valid credentials is UNAUTHENTICATED;
one that names another tenant than its credentials' is PERMISSION_DENIED (naming no other
tenant's data: the claim is compared, nothing is looked up).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from server.api.errors import PermissionDeniedError, UnauthenticatedError
from server.api.validation import check_label
from server.security.auth import ANONYMOUS, Authenticator, Caller, Refusal
from server.security.tls import grpc_client_names, scope_client_names

TENANT_HEADER = "x-backfill-tenant"
AUTHORIZATION = "authorization"


def tenant_for(caller: Caller, claimed: str, field: str) -> str:
    """The tenant a request runs as, given the tenant it names in ``field``."""
    check_label(claimed, field)
    if caller.tenant is None:
        return claimed
    if claimed and claimed != caller.tenant:
        raise PermissionDeniedError(
            f"{field}: {claimed!r} is not the tenant these credentials belong to"
        )
    return caller.tenant


def grpc_caller(auth: Authenticator, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    """The caller of a gRPC call (UnauthenticatedError without valid credentials)."""
    if not auth.enabled:
        return ANONYMOUS
    authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            authorization = value if isinstance(value, str) else value.decode("latin-1")
            break
    names = grpc_client_names(context.auth_context()) if authorization is None else []
    return _caller(auth, authorization, names)


def http_caller(auth: Authenticator, headers: Mapping[str, str],
                scope: Mapping[str, Any]) -> Caller:
    """The caller of an HTTP request (UnauthenticatedError without valid credentials)."""
    if not auth.enabled:
        return ANONYMOUS
    authorization = headers.get(AUTHORIZATION)
    names = scope_client_names(scope) if authorization is None else ()
    return _caller(auth, authorization, names)


def http_tenant(caller: Caller, headers: Mapping[str, str]) -> str:
    """The tenant of an HTTP request; "" (the default tenant) when it names none."""
    return tenant_for(caller, headers.get(TENANT_HEADER, ""), f"header {TENANT_HEADER}")


def _caller(auth: Authenticator, authorization: str | None, names: Iterable[str]) -> Caller:
    result = auth.authenticate(authorization, names)
    if isinstance(result, Refusal):
        raise UnauthenticatedError(result.message, result)
    return result
