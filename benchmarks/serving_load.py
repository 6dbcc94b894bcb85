"""A closed-loop chat load for serving comparisons: ``requests`` chat requests of
``max_tokens`` output tokens each (EOS ignored, greedy), ``concurrency`` in flight, against
``python -m server`` (gRPC, the SDK) or llama.cpp's ``llama-server`` (its OpenAI-style HTTP).
Throughput counts the completion tokens each server reports over the whole run's wall time;
latency is each request's end-to-end time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.llama_cpp_peer import LlamaServer

TOPICS = ("the ocean", "a cat", "the moon", "bread", "a river", "winter", "a library", "trains")


@dataclass(frozen=True, slots=True)
class ServingResult:
    tokens_per_s: float
    p50_s: float
    p99_s: float
    completion_tokens: int


def chat_prompts(count: int) -> list[str]:
    """Distinct short chat prompts (no shared prefix beyond the chat template)."""
    return [f"Request {i}: write two sentences about {TOPICS[i % len(TOPICS)]}."
            for i in range(count)]


def _result(tokens: list[int], latencies: list[float], wall_s: float) -> ServingResult:
    return ServingResult(sum(tokens) / wall_s, float(np.percentile(latencies, 50)),
                         float(np.percentile(latencies, 99)), sum(tokens))


def backfill_serving(engine: Path, threads: int, prompts: list[str], max_tokens: int,
                     concurrency: int) -> ServingResult:
    """``python -m server`` with ``threads`` CPU threads, driven through the SDK."""
    from client import AsyncClient, SamplingParams
    from client.bench.local_server import LocalServer

    env_before = os.environ.get("BACKFILL_CPU_THREADS")
    os.environ["BACKFILL_CPU_THREADS"] = str(threads)
    try:
        with LocalServer(engine, "--metrics-port", "-1") as server:  # no port to collide on
            return asyncio.run(_sdk_load(AsyncClient, SamplingParams, server.address, prompts,
                                         max_tokens, concurrency))
    finally:
        if env_before is None:
            os.environ.pop("BACKFILL_CPU_THREADS", None)
        else:
            os.environ["BACKFILL_CPU_THREADS"] = env_before


async def _sdk_load(client_cls: type, sampling_cls: type, address: str, prompts: list[str],
                    max_tokens: int, concurrency: int) -> ServingResult:
    sampling = sampling_cls(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    gate = asyncio.Semaphore(concurrency)
    tokens: list[int] = []
    latencies: list[float] = []
    async with client_cls(address) as client:
        warm = [client.complete(messages=[{"role": "user", "content": p}], sampling=sampling)
                for p in prompts[:concurrency]]
        await asyncio.gather(*warm)  # a full batch first: kernels loaded, pages touched

        async def one(text: str) -> None:
            async with gate:
                t0 = time.perf_counter()
                done = await client.complete(messages=[{"role": "user", "content": text}],
                                             sampling=sampling)
                latencies.append(time.perf_counter() - t0)
                tokens.append(len(done.token_ids))

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return _result(tokens, latencies, time.perf_counter() - start)


def llama_server_serving(binary: str, gguf: Path, threads: int, prompts: list[str],
                         max_tokens: int, concurrency: int, port: int = 18080) -> ServingResult:
    """llama-server with ``concurrency`` slots and continuous batching, over HTTP."""
    with LlamaServer(binary, gguf, threads=threads, parallel=concurrency, port=port) as server:
        chat = lambda text: server.chat(text, max_tokens)  # noqa: E731
        _thread_load(chat, prompts[:concurrency], concurrency)  # the same warm-up batch
        return _thread_load(chat, prompts, concurrency)


def _thread_load(call: Callable[[str], int], prompts: list[str],
                 concurrency: int) -> ServingResult:
    tokens: list[int] = []
    latencies: list[float] = []

    def one(text: str) -> None:
        t0 = time.perf_counter()
        tokens.append(call(text))
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts))
    return _result(tokens, latencies, time.perf_counter() - start)
