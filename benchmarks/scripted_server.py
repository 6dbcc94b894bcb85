"""``python -m benchmarks.scripted_server``: ``python -m server`` with the ScriptedExecutor
(``tests.fakes``: no model, one token per running sequence per poll, keeping no records) in
place of the engine, so a benchmark measures everything but the model. Takes every
``python -m server`` flag, plus the fake engine's limits (roomy by default, so they never bind).

    python -m benchmarks.scripted_server --engine /tmp/tiny --port 0 --slots 256
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from engine_builder.manifest import Manifest
from server.app import BackfillServer, split_engine
from server.config import ServerConfig, add_arguments, from_namespace
from server.executor.base import Capacity


def capacity(engine: str, ns: argparse.Namespace) -> Capacity:
    manifest = Manifest.load(engine)
    return Capacity(
        max_slots=ns.slots,
        num_kv_blocks=ns.kv_blocks,
        tokens_per_block=manifest.limits.tokens_per_block,
        max_tokens_per_step=ns.tokens_per_step,
        max_seq_len=manifest.limits.max_seq_len,
        vocab_size=manifest.architecture.vocab_size,
    )


async def serve(config: ServerConfig, cap: Capacity) -> None:
    from tests.fakes import ScriptedExecutor

    server = await BackfillServer.start(config, executor=ScriptedExecutor(cap, record=False))
    print(f"listening on {server.address}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scripted_server")
    add_arguments(parser)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--tokens-per-step", type=int, default=1 << 20)
    # The fake's toy prefix cache keeps up to this many blocks (keyed by whole prefixes).
    parser.add_argument("--kv-blocks", type=int, default=8192)
    ns = parser.parse_args(argv)
    config = from_namespace(ns)
    # the scripted executor stands in for the first engine's (the default model's)
    asyncio.run(serve(config, capacity(split_engine(config.engine[0])[1], ns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
