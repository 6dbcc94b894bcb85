"""Helpers for the authentication, TLS and quota tests: keys files, authenticated stubs, and
plain HTTP(S) requests with headers."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from pathlib import Path
from typing import Any

import grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.security.keys import ApiKey, KeyRing, TenantLimits, key_digest, save_keys

KEY_A, KEY_B = "bfk_tenant-a-key", "bfk_tenant-b-key"


def write_keys(path: Path, limits: dict[str, TenantLimits] | None = None,
               clients: dict[str, str] | None = None,
               keys: tuple[tuple[str, str], ...] = ((KEY_A, "a"), (KEY_B, "b"))) -> Path:
    ring = KeyRing.build(limits or {},
                         tuple(ApiKey(f"key-{i}", t, key_digest(k)) for i, (k, t) in
                               enumerate(keys)),
                         clients or {})
    save_keys(path, ring)
    return path


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def request(ids: list[int] | None = None, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids or [1, 2]), **fields)


async def generate(stub: pb_grpc.InferenceServiceStub, req: pb.GenerateRequest,
                   key: str | None) -> list[pb.GenerateResponse]:
    return [c async for c in stub.Generate(req, metadata=bearer(key) if key else None)]


async def status_of(call: Any) -> grpc.StatusCode:
    """The status code an awaitable RPC ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def http_request(port: int, method: str, path: str, *, headers: dict[str, str] | None = None,
                 body: object = None, context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP(S) request (call it with asyncio.to_thread)."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=30, context=context)
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def http_async(port: int, method: str, path: str, **kw: Any
                     ) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_request, port, method, path, **kw)
