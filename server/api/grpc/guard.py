"""Server reflection that, with authentication on, answers authenticated callers only (it
describes the whole API to whoever can reach the port). Health stays open: load balancers and
Kubernetes probes call it without credentials. The InferenceService authenticates in its own
methods (server/api/grpc/service.py), where the caller's tenant is needed; no interceptor
runs on every call."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from server.api.errors import UnauthenticatedError
from server.api.identity import grpc_caller
from server.security.auth import Authenticator
from server.tenant_metrics import TenantMetrics


class GuardedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: Iterable[str], auth: Authenticator,
                 tenants: TenantMetrics) -> None:
        super().__init__(tuple(service_names))
        self._auth = auth
        self._tenants = tenants

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: Any,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        try:
            grpc_caller(self._auth, context)
        except UnauthenticatedError as exc:
            self._tenants.auth_failure("grpc", exc.refusal.value)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str], auth: Authenticator,
                   tenants: TenantMetrics) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        GuardedReflection(names, auth, tenants), server)
