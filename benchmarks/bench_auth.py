"""What authentication costs the front end: the same floods as benchmarks/bench_frontend.py
(scripted executor, so the model is not the bottleneck) against two servers started side by
side, one without ``--auth-keys`` and one with a keys file whose tenant has quotas (set high
enough never to refuse, so the quota bookkeeping is measured too). Rounds alternate which
server goes first; the table gives each round's ratio (auth on / off, requests/s) and their
median, and the same for the server's CPU per request. Goal: auth on costs <= 5% of
throughput.

    python -m benchmarks.bench_auth --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from benchmarks.bench_frontend import FloodResult, build_engine, flood, scripted_server
from client.aio import AsyncClient
from server.security.keys import ApiKey, KeyRing, TenantLimits, key_digest, new_key, save_keys

GOAL_RATIO = 0.95


def write_keys(directory: Path) -> tuple[Path, str]:
    key, key_id = new_key()
    limits = TenantLimits(max_online_requests=1_000_000, max_queued_offline=1_000_000,
                          tokens_per_minute=10**12)
    path = directory / "keys.json"
    save_keys(path, KeyRing.build({"bench": limits}, (ApiKey(key_id, "bench", key_digest(key)),),
                                  {}))
    return path, key


async def one(address: tuple[str, str, int], transport: str, args: argparse.Namespace,
              max_tokens: int, api_key: str | None) -> FloodResult:
    grpc_address, http_address, pid = address
    target = http_address if transport == "http" else grpc_address
    count = {"session": args.requests, "unary": args.unary_requests,
             "http": args.http_requests}[transport]
    in_flight = args.http_in_flight if transport == "http" else args.in_flight
    return await flood(target, transport, count, max_tokens, in_flight, args.vocab,
                       executor="auth" if api_key else "open", server_pid=pid, api_key=api_key)


async def vocab_size(target: str) -> int:
    async with AsyncClient(target) as client:
        return (await client.list_models())[0].vocab_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_auth", description=__doc__)
    p.add_argument("--rounds", type=int, default=4, help="even: each arm goes first as often")
    p.add_argument("--requests", type=int, default=10000, help="requests per Session run")
    p.add_argument("--unary-requests", type=int, default=3000)
    p.add_argument("--http-requests", type=int, default=3000)
    p.add_argument("--in-flight", type=int, default=1024)
    p.add_argument("--http-in-flight", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--transports", nargs="+", choices=("session", "unary", "http"),
                   default=["session", "unary", "http"])
    args = p.parse_args(argv)
    engine = build_engine(args.slots)
    keys, key = write_keys(Path(tempfile.mkdtemp(prefix="bench-auth-")))
    queue = max(1024, 2 * args.in_flight)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; scripted executor, {args.slots} slots; client and "
          "servers in separate processes")
    ratios: dict[tuple[str, int], list[float]] = defaultdict(list)
    cpu: dict[tuple[str, int], list[float]] = defaultdict(list)
    rows = []
    with scripted_server(engine, queue) as plain, scripted_server(engine, queue, str(keys)) as auth:
        args.vocab = asyncio.run(vocab_size(plain[0]))
        warm = argparse.Namespace(**{**vars(args), "requests": 500, "unary_requests": 200,
                                     "http_requests": 200})
        for address, api_key in ((plain, None), (auth, key)):  # both arms warm before round 1
            for transport in args.transports:
                asyncio.run(one(address, transport, warm, args.max_tokens, api_key))
        for round_no in range(args.rounds):
            for transport in args.transports:
                for max_tokens in (1, args.max_tokens):
                    order = [(plain, None), (auth, key)]
                    if round_no % 2:
                        order.reverse()
                    got = {}
                    for address, api_key in order:
                        print(f"round {round_no + 1} {transport} max_tokens {max_tokens} auth "
                              f"{'on' if api_key else 'off'} ...", file=sys.stderr, flush=True)
                        got[api_key is not None] = asyncio.run(
                            one(address, transport, args, max_tokens, api_key))
                    off, on = got[False], got[True]
                    assert off.errors == on.errors == 0, (off.errors, on.errors)
                    ratio = on.req_per_s / off.req_per_s
                    ratios[transport, max_tokens].append(ratio)
                    cpu[transport, max_tokens].append(on.server_us_per_req
                                                      / off.server_us_per_req)
                    rows.append((round_no + 1, transport, max_tokens, off.req_per_s,
                                 on.req_per_s, ratio, off.server_us_per_req,
                                 on.server_us_per_req))
    print(f"{'round':>5} {'transport':<9} {'max_tok':>7} {'off req/s':>10} {'on req/s':>10} "
          f"{'on/off':>7} {'srv us/req off':>14} {'on':>6}")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:<9} {r[2]:>7} {r[3]:>10.0f} {r[4]:>10.0f} {r[5]:>7.3f} "
              f"{r[6]:>14.0f} {r[7]:>6.0f}")
    print("median over rounds, auth on / off: requests/s (goal >= 0.95), and the server's CPU "
          "per request (the steadier figure on a shared host)")
    for (transport, max_tokens), values in ratios.items():
        median = statistics.median(values)
        verdict = "PASS" if median >= GOAL_RATIO else "FAIL"
        print(f"  {transport:<8} max_tokens {max_tokens:>3}: req/s {median:.3f} ({verdict}), "
              f"server CPU/request {statistics.median(cpu[transport, max_tokens]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
