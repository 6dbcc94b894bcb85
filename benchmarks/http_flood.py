"""The HTTP side of bench_frontend: streamed ``/v1/completions`` requests (SSE, with
``stream_options.include_usage``) over keep-alive HTTP/1.1 connections, one per worker.

The client is a few lines of asyncio streams rather than an HTTP library, so that the client
process spends little per request and the server is what the flood measures (the ``openai``
client, built on an HTTP library, costs several times the server's time per request).
"""

from __future__ import annotations

import asyncio
import json


class HttpConnection:
    """One keep-alive connection; ``stream_completion`` sends a request and reads its SSE."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str, api_key: str | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host
        self._auth = b"" if not api_key else f"Authorization: Bearer {api_key}\r\n".encode()

    @classmethod
    async def open(cls, address: str, api_key: str | None = None) -> HttpConnection:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, host, api_key)

    async def stream_completion(self, body: dict[str, object]) -> tuple[int, int, int]:
        """(HTTP status, completion tokens per the usage event, SSE events with choices)."""
        data = json.dumps(body).encode()
        self._writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: " + self._host.encode() + b"\r\n"
            + self._auth + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(data)).encode() + b"\r\n\r\n" + data
        )
        status, payload = await self._response()
        if status != 200:
            return status, 0, 0
        events = payload.split(b"\n\n")
        usage = next((e for e in reversed(events) if b'"usage"' in e), None)
        tokens = 0 if usage is None else json.loads(usage[6:])["usage"]["completion_tokens"]
        chunks = sum(1 for e in events if e.startswith(b'data: {"id"') and b'"usage"' not in e)
        return status, tokens, chunks

    async def _response(self) -> tuple[int, bytes]:
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(b":") for line in lines[1:] if line)}
        if headers.get(b"transfer-encoding") == b"chunked":
            return status, await self._chunked()
        return status, await self._reader.readexactly(int(headers.get(b"content-length", 0)))

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self._reader.readline()).strip(), 16)
            if size == 0:
                await self._reader.readline()
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    def close(self) -> None:
        self._writer.close()
