"""The OpenAI-compatible HTTP surface: routes, and the uvicorn server that runs them on the
gRPC server's event loop, so both surfaces submit to the same scheduler.

Starlette (not FastAPI): requests are checked by the one validation the gRPC surface uses
(server/api/validation.py, after backfill/openai_body.py reads the body), so a schema layer
would be a second, diverging copy of those rules, and each request skips its cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.http.auth import AuthGate
from server.api.http.batches import Batches
from server.api.http.completions import Generation
from server.api.http.errors import not_found
from server.api.http.files import FileStore
from server.api.models import ModelRegistry, ServedModel
from server.jobs import Jobs
from server.metrics import RequestMetrics
from server.quotas import TenantQuotas
from server.security.auth import Authenticator
from server.security.tls import CLIENT_NAMES, TLS_EXTENSION, certificate_names
from server.tenant_metrics import TenantMetrics

log = logging.getLogger(__name__)


def build_app(
    models: ModelRegistry,
    jobs: Jobs,
    files: FileStore,
    metrics: RequestMetrics,
    serving: Callable[[], bool],
    *,
    auth: Authenticator,
    quotas: TenantQuotas,
    tenants: TenantMetrics,
    max_body_bytes: int,
) -> ASGIApp:
    generation = Generation(models, metrics, serving, quotas=quotas, tenants=tenants,
                            max_body_bytes=max_body_bytes)
    batches = Batches(jobs, files, max_body_bytes)

    async def health(request: Request) -> Response:
        # 503 while draining, so a load balancer stops sending work before the port closes.
        return Response(status_code=200 if serving() else 503)

    async def list_models(request: Request) -> Response:
        data = [_model_json(m) for m in models]
        if models.router is not None:  # what "model": "auto" routes among
            data.append({"id": models.AUTO, "object": "model", "created": 0,
                         "owned_by": "backfill"})
        return _json({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        found = [m for m in models if m.name == name]
        if not found:
            return not_found(f"model: unknown model {name!r}")
        return _json(_model_json(found[0]))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", generation.completions, methods=["POST"]),
        Route("/v1/chat/completions", generation.chat, methods=["POST"]),
        Route("/v1/files", batches.upload_file, methods=["POST"]),
        Route("/v1/files", batches.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", batches.get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", batches.delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", batches.file_content, methods=["GET"]),
        Route("/v1/batches", batches.create_batch, methods=["POST"]),
        Route("/v1/batches", batches.list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", batches.get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", batches.cancel_batch, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    return AuthGate(app, auth, tenants) if auth.enabled else app


def _model_json(model: ServedModel) -> dict[str, object]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "backfill",
            "max_model_len": model.spec.capacity.max_seq_len}


def _json(obj: dict[str, object]) -> Response:
    return Response(json.dumps(obj), media_type="application/json")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the process's drain
    (server/__main__.py), which stops this server in its turn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ClientCertProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, adding the verified client certificate's names to each
    request's scope (ASGI's TLS extension, under ``client_cert_names``), read once per
    connection, so the HTTP surface can map a certificate to a tenant as gRPC does."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        self._client_names = certificate_names(cert) if cert else []

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
        extensions[TLS_EXTENSION] = {CLIENT_NAMES: self._client_names}



class HttpServer:
    """uvicorn serving ``app`` on the running loop; ``port`` is the one bound. With
    ``ssl_context``, HTTPS (the context's certificate is reloaded in place by ServerTls)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    async def start(cls, app: ASGIApp, host: str, port: int,
                    ssl_context: ssl.SSLContext | None = None) -> HttpServer:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        client_certs = ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                http=ClientCertProtocol if client_certs else "httptools",
                                lifespan="off", timeout_graceful_shutdown=1)
        config.load()
        config.ssl = ssl_context  # ours, not one uvicorn builds: reloads update it in place
        server = _Uvicorn(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {host}:{port} did not start")
            await asyncio.sleep(0.01)
        return cls(server, task, sock.getsockname()[1])

    async def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
