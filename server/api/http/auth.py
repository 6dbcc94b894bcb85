"""Authentication on the HTTP surface: every request but ``/health`` (load balancers and
Kubernetes probes call it without credentials) is authenticated before it reaches a route, and
its caller is kept in the request's state for the routes (``caller_of``, ``request_tenant``).
A request without valid credentials gets 401 in OpenAI's error shape, with
``WWW-Authenticate: Bearer``."""

from __future__ import annotations

import grpc
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import UnauthenticatedError
from server.api.http.errors import error_response
from server.api.identity import http_caller, http_tenant
from server.security.auth import ANONYMOUS, Authenticator, Caller
from server.tenant_metrics import TenantMetrics

OPEN_PATHS = frozenset({"/health"})
CALLER = "caller"  # the request state's key


class AuthGate:
    """ASGI middleware in front of the routes; installed only with authentication on."""

    def __init__(self, app: ASGIApp, auth: Authenticator, tenants: TenantMetrics) -> None:
        self._app = app
        self._auth = auth
        self._tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        try:
            caller = http_caller(self._auth, Headers(scope=scope), scope)
        except UnauthenticatedError as exc:
            self._tenants.auth_failure("http", exc.refusal.value)
            response = error_response((grpc.StatusCode.UNAUTHENTICATED, str(exc)))
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[CALLER] = caller
        await self._app(scope, receive, send)


def caller_of(request: Request) -> Caller:
    """The request's caller (ANONYMOUS with authentication off)."""
    caller: Caller = request.scope.get("state", {}).get(CALLER, ANONYMOUS)
    return caller


def request_tenant(request: Request) -> str:
    """The tenant an HTTP request acts for (its header's claim, checked against its caller)."""
    return http_tenant(caller_of(request), request.headers)
