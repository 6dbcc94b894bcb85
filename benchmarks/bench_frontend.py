"""Front-end ceiling: how many requests/s and streamed tokens/s the SDK and the service move
when the executor is not the bottleneck (the tiny random model, few tokens per request, many
slots). Client and server run on one host, in separate processes.

Compares, in one run, the SDK over one multiplexed ``Session`` stream against the same load
over one ``Generate`` call per request (``transport="unary"``) and over the OpenAI-compatible
HTTP surface (``http``: streamed ``/v1/completions``, server-sent events, one keep-alive
connection per in-flight request; see benchmarks/http_flood.py), for a max-tokens-1 flood and
for short streams. Goals: >= 3,000 req/s and >= 50,000 streamed tokens/s over Session;
>= 1,000 req/s and >= 15,000 tokens/s over HTTP.

Two executors behind the same server: ``cpu`` (the tiny random model; at 256 slots its per-step
Python work shares the server's GIL with the front end) and ``scripted`` (``tests.fakes``'
ScriptedExecutor: no model, one token per running sequence per poll), the variant in which the
executor is surely not the bottleneck. CPU columns: process CPU time (user + system) per
request of the server and of the client (this process), so their sum bounds req/s per core.

    python -m benchmarks.bench_frontend                 # builds the tiny engine in a temp dir
    python -m benchmarks.bench_frontend --executor scripted --json-out frontend.json
    python -m benchmarks.bench_frontend --target HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.http_flood import HttpConnection
from client.aio import AsyncClient
from client.bench.local_server import LocalServer
from client.errors import BackfillError
from client.types import SamplingParams

GOAL_REQ_S = 3000.0
GOAL_TOK_S = 50000.0
GOAL_HTTP_REQ_S = 1000.0
GOAL_HTTP_TOK_S = 15000.0


@dataclass(frozen=True, slots=True)
class FloodResult:
    executor: str
    transport: str
    max_tokens: int
    in_flight: int
    requests: int
    seconds: float
    tokens: int
    chunks: int
    errors: int  # requests that failed (counted, not retried)
    server_cpu_s: float  # server process CPU (user + system) during the run; nan if unknown
    client_cpu_s: float  # this process's CPU during the run

    @property
    def server_us_per_req(self) -> float:
        return self.server_cpu_s / self.requests * 1e6

    @property
    def client_us_per_req(self) -> float:
        return self.client_cpu_s / self.requests * 1e6

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc); nan when unknown."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def flood(
    target: str,
    transport: str,
    requests: int,
    max_tokens: int,
    in_flight: int,
    vocab: int,
    *,
    executor: str = "",
    server_pid: int | None = None,
    api_key: str | None = None,
) -> FloodResult:
    """``in_flight`` workers send ``requests`` requests back to back; counts streamed tokens."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    remaining = requests
    tokens = chunks = errors = 0

    async def worker(client: AsyncClient, seed: int) -> None:
        nonlocal remaining, tokens, chunks, errors
        prompt = [1 + (seed * 7 + i) % (vocab - 1) for i in range(4)]
        while remaining > 0:
            remaining -= 1
            try:
                async for chunk in client.generate(token_ids=prompt, sampling=sampling):
                    tokens += len(chunk.token_ids)
                    chunks += 1
            except BackfillError:
                errors += 1

    if transport == "http":
        return await http_flood(target, requests, max_tokens, in_flight, vocab,
                                executor=executor, server_pid=server_pid, api_key=api_key)
    async with AsyncClient(target, transport=transport,  # type: ignore[arg-type]
                           api_key=api_key) as client:
        await client.complete(token_ids=[1, 2], sampling=sampling)  # connect, open the stream
        start = time.perf_counter()
        server_cpu, client_cpu = process_cpu_s(server_pid), time.process_time()
        await asyncio.gather(*(worker(client, i) for i in range(in_flight)))
        seconds = time.perf_counter() - start
        server_cpu = process_cpu_s(server_pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
    return FloodResult(executor, transport, max_tokens, in_flight, requests, seconds, tokens,
                       chunks, errors, server_cpu, client_cpu)


async def http_flood(
    target: str,
    requests: int,
    max_tokens: int,
    in_flight: int,
    vocab: int,
    *,
    executor: str = "",
    server_pid: int | None = None,
    api_key: str | None = None,
) -> FloodResult:
    """The same flood over HTTP: ``target`` is the server's HTTP address."""
    remaining = requests
    tokens = chunks = errors = 0

    async def worker(seed: int) -> None:
        nonlocal remaining, tokens, chunks, errors
        body = {"prompt": [1 + (seed * 7 + i) % (vocab - 1) for i in range(4)],
                "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        connection = await HttpConnection.open(target, api_key)
        try:
            while remaining > 0:
                remaining -= 1
                status, got, events = await connection.stream_completion(body)
                tokens += got
                chunks += events
                errors += status != 200
        finally:
            connection.close()

    warm = await HttpConnection.open(target, api_key)
    await warm.stream_completion({"prompt": [1, 2], "max_tokens": 1, "stream": True})
    warm.close()
    start = time.perf_counter()
    server_cpu, client_cpu = process_cpu_s(server_pid), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(in_flight)))
    seconds = time.perf_counter() - start
    server_cpu = process_cpu_s(server_pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    return FloodResult(executor, "http", max_tokens, in_flight, requests, seconds, tokens,
                       chunks, errors, server_cpu, client_cpu)


def build_engine(slots: int) -> Path:
    from engine_builder.tiny import build_tiny_engine

    out = Path(tempfile.mkdtemp(prefix="bench-frontend-")) / "tiny"
    return build_tiny_engine(out, max_batch_size=slots)


@contextmanager
def scripted_server(engine: Path, queue: int, auth_keys: str = ""
                    ) -> Iterator[tuple[str, str, int]]:
    """A server process whose executor is the ScriptedExecutor; yields (gRPC address, HTTP
    address, pid). ``auth_keys``: a keys file (authentication on)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_frontend", "--serve-scripted", str(engine),
         "--max-online-queue", str(queue), "--auth-keys", auth_keys],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line, http = proc.stdout.readline(), proc.stdout.readline()
        if not line.startswith("listening on ") or not http.startswith("http on "):
            raise RuntimeError("the scripted server exited before listening")
        yield line.split()[-1], http.split()[-1], proc.pid
    finally:
        proc.terminate()
        proc.wait()


def serve_scripted(engine: Path, queue: int, auth_keys: str = "") -> int:
    """The server side of ``scripted_server``: serves until SIGTERM."""
    from engine_builder.manifest import Manifest
    from server.app import BackfillServer
    from server.config import ServerConfig
    from server.executor.base import Capacity
    from tests.fakes import ScriptedExecutor

    manifest = Manifest.load(engine)
    limits = manifest.limits
    capacity = Capacity(
        max_slots=limits.max_batch_size,
        num_kv_blocks=limits.num_kv_blocks,
        tokens_per_block=limits.tokens_per_block,
        max_tokens_per_step=limits.max_num_tokens,
        max_seq_len=limits.max_seq_len,
        vocab_size=manifest.architecture.vocab_size,
    )

    async def serve() -> None:
        config = ServerConfig(engine=str(engine), port=0, metrics_port=-1, http_port=0,
                              max_online_queue=queue, job_store=":memory:",
                              auth_keys=auth_keys)
        server = await BackfillServer.start(config, executor=ScriptedExecutor(capacity))
        print(f"listening on {server.address}", flush=True)
        print(f"http on {server.http_address}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


def table(results: list[FloodResult]) -> str:
    head = (f"{'executor':<8} {'transport':<9} {'max_tok':>7} {'in-flight':>9} {'requests':>8} "
            f"{'seconds':>8} {'req/s':>8} {'tokens/s':>9} {'tok/chunk':>9} {'errors':>6} "
            f"{'srv us/req':>10} {'cli us/req':>10}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.executor:<8} {r.transport:<9} {r.max_tokens:>7} {r.in_flight:>9} "
            f"{r.requests:>8} {r.seconds:>8.2f} {r.req_per_s:>8.0f} {r.tok_per_s:>9.0f} "
            f"{r.tokens / max(1, r.chunks):>9.2f} {r.errors:>6} "
            f"{r.server_us_per_req:>10.0f} {r.client_us_per_req:>10.0f}"
        )
    return "\n".join(rows)


async def run_all(
    target: str, args: argparse.Namespace, executor: str = "", server_pid: int | None = None,
    http_target: str | None = None,
) -> list[FloodResult]:
    async with AsyncClient(target) as client:
        vocab = (await client.list_models())[0].vocab_size
    counts = {"session": args.requests, "unary": args.unary_requests, "http": args.http_requests}
    in_flight = {"session": args.in_flight, "unary": args.in_flight,
                 "http": args.http_in_flight}
    transports = [t for t in args.transports if t != "http" or http_target is not None]
    plans = [(t, max_tokens) for max_tokens in (1, args.max_tokens) for t in transports]
    results = []
    for transport, max_tokens in plans:
        n = counts[transport]
        print(f"{executor} {transport} x{n}, max_tokens {max_tokens} ...", file=sys.stderr,
              flush=True)
        address = http_target if transport == "http" else target
        assert address is not None
        results.append(await flood(address, transport, n, max_tokens, in_flight[transport],
                                   vocab, executor=executor, server_pid=server_pid))
    return results


def ratios(results: list[FloodResult]) -> str:
    """HTTP over Session, same executor and tokens per request, in this run."""
    rows = ["http / session (same run):"]
    for r in results:
        if r.transport != "http":
            continue
        peer = next((s for s in results if s.transport == "session"
                     and (s.executor, s.max_tokens) == (r.executor, r.max_tokens)), None)
        if peer is not None:
            rows.append(f"  {r.executor} max_tokens {r.max_tokens}: req/s "
                        f"{r.req_per_s / peer.req_per_s:.2f}x, tokens/s "
                        f"{r.tok_per_s / peer.tok_per_s:.2f}x")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_frontend", description=__doc__)
    p.add_argument("--target", default=None, help="a running server (default: start one)")
    p.add_argument("--requests", type=int, default=20000, help="requests per Session run")
    p.add_argument("--unary-requests", type=int, default=5000, help="requests per unary run")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per streamed request")
    p.add_argument("--in-flight", type=int, default=1024, help="concurrent requests")
    p.add_argument("--http-requests", type=int, default=5000, help="requests per HTTP run")
    p.add_argument("--http-in-flight", type=int, default=256,
                   help="concurrent HTTP requests (one connection each)")
    p.add_argument("--http-target", default=None, help="the HTTP address of --target")
    p.add_argument("--transports", nargs="+", choices=("session", "unary", "http"),
                   default=["session", "unary", "http"], help="transports to compare")
    p.add_argument("--slots", type=int, default=256, help="batch slots of the tiny engine")
    p.add_argument("--executor", nargs="+", choices=("cpu", "scripted"),
                   default=["cpu", "scripted"], help="executors to compare (default: both)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--serve-scripted", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-online-queue", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--auth-keys", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    queue = max(1024, 2 * args.in_flight)
    if args.serve_scripted:
        return serve_scripted(Path(args.serve_scripted), args.max_online_queue or queue,
                              args.auth_keys)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; client and server in separate processes")
    results: list[FloodResult] = []
    if args.target:
        results = asyncio.run(run_all(args.target, args, http_target=args.http_target))
    else:
        engine = build_engine(args.slots)
        print(f"engine: tiny random Llama, {args.slots} slots ({engine})")
        if "cpu" in args.executor:
            with LocalServer(engine, "--metrics-port", "-1", "--max-online-queue",
                             str(queue)) as server:
                results += asyncio.run(run_all(server.address, args, "cpu", server.proc.pid))
        if "scripted" in args.executor:
            with scripted_server(engine, queue) as (address, http_address, pid):
                results += asyncio.run(run_all(address, args, "scripted", pid, http_address))
    print(table(results))
    for transport, goal_req, goal_tok in (("session", GOAL_REQ_S, GOAL_TOK_S),
                                          ("http", GOAL_HTTP_REQ_S, GOAL_HTTP_TOK_S)):
        best = [r for r in results if r.transport == transport]
        if not best:
            continue
        req_ok = max(r.req_per_s for r in best) >= goal_req
        tok_ok = max(r.tok_per_s for r in best) >= goal_tok
        print(f"goal >= {goal_req:.0f} req/s over {transport}: {'PASS' if req_ok else 'FAIL'}")
        print(f"goal >= {goal_tok:.0f} streamed tokens/s over {transport}: "
              f"{'PASS' if tok_ok else 'FAIL'}")
    print(ratios(results))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump([asdict(r) | {"req_per_s": r.req_per_s, "tok_per_s": r.tok_per_s,
                                    "server_us_per_req": r.server_us_per_req,
                                    "client_us_per_req": r.client_us_per_req}
                       for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
