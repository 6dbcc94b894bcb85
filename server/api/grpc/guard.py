"""With authentication on, server reflection answers authenticated callers only (it describes
the whole API to whoever can reach the port); health stays open, because load balancers and
Kubernetes probes call it without credentials. The InferenceService authenticates in its own
methods (server/api/grpc/service.py), where the caller's tenant is needed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from server.api.errors import UnauthenticatedError
from server.api.identity import grpc_caller
from server.security.auth import Authenticator
from server.tenant_metrics import TenantMetrics

_REFLECTION_PREFIX = f"/{reflection.SERVICE_NAME}/"


class ReflectionGuard(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, tenants: TenantMetrics) -> None:
        self._auth = auth
        self._tenants = tenants

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(_REFLECTION_PREFIX):
            return handler
        inner = handler.stream_stream
        auth, tenants = self._auth, self._tenants

        async def guarded(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            try:
                grpc_caller(auth, context)
            except UnauthenticatedError as exc:
                tenants.auth_failure("grpc", exc.refusal.value)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            async for response in inner(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
