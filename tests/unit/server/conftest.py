"""Servers on localhost for the service tests: the tiny engine's manifest and tokenizer, and by
default a ScriptedExecutor (deterministic, no model) with limits taken from that manifest."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backfill.v1 import inference_pb2_grpc as pb_grpc
from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.app import BackfillServer
from server.config import ServerConfig
from server.executor.base import Capacity
from tests.fakes import ScriptedExecutor

MakeServer = Callable[..., Awaitable[BackfillServer]]


def tiny_capacity(engine: Path, **overrides: int) -> Capacity:
    manifest = Manifest.load(engine)
    tokenizer = EngineTokenizer.load(engine, manifest)
    limits = manifest.limits
    values: dict[str, int] = {
        "max_slots": limits.max_batch_size,
        "num_kv_blocks": limits.num_kv_blocks,
        "tokens_per_block": limits.tokens_per_block,
        "max_tokens_per_step": limits.max_num_tokens,
        "max_seq_len": limits.max_seq_len,
        "vocab_size": tokenizer.vocab_size,
    }
    values.update(overrides)
    return Capacity(**values)


@pytest.fixture
def tokenizer(tiny_engine: Path) -> EngineTokenizer:
    return EngineTokenizer.load(tiny_engine, Manifest.load(tiny_engine))


@pytest.fixture
async def make_server(tiny_engine: Path, tmp_path: Path) -> AsyncIterator[MakeServer]:
    """make_server(executor=None, **config) -> a started server; stopped at teardown. Each
    server gets its own job store in tmp_path unless config names one."""
    servers: list[BackfillServer] = []

    async def make(executor: Any = None, **config: Any) -> BackfillServer:
        if executor is None:
            executor = ScriptedExecutor(tiny_capacity(tiny_engine))
        config.setdefault("job_store", str(tmp_path / f"jobs-{len(servers)}.db"))
        config.setdefault("job_flush_ms", 5.0)
        config.setdefault("port", 0)
        config.setdefault("metrics_port", -1)
        config.setdefault("window_ms", 2.0)
        cfg = ServerConfig(engine=str(tiny_engine), **config)
        server = await BackfillServer.start(cfg, executor=executor)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop(grace_s=0.0)


@pytest.fixture
def executor(tiny_engine: Path) -> ScriptedExecutor:
    return ScriptedExecutor(tiny_capacity(tiny_engine))


@pytest.fixture
async def server(make_server: MakeServer, executor: ScriptedExecutor) -> BackfillServer:
    return await make_server(executor)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls predicate until it holds; fails the test after timeout seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def is_idle(server: BackfillServer) -> bool:
    """Nothing queued or running in the scheduler and no KV block referenced."""
    snap = server.scheduler.snapshot()
    stats = server.scheduler.executor_stats()
    tiers = (snap.online, snap.offline)
    return (
        all(t.running == 0 and t.queued == 0 for t in tiers)
        and stats.active == 0
        and stats.queued == 0
        and stats.kv_blocks_used == 0
    )


@pytest.fixture
async def channel(server: BackfillServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


async def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels: value}, for every sample of the exposition."""
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out
