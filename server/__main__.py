"""``python -m server``: serve an engine over gRPC (and HTTP with ``--http-port``) until
SIGTERM / SIGINT, then drain. ``python -m server keys ...`` manages the keys file of
``--auth-keys`` (server/security/keys_cli.py).

Prints ``listening on HOST:PORT`` on stdout once the port is bound (a parent that passed
``--port 0`` reads the real port from it); everything else is logged on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from server.app import BackfillServer
from server.config import ServerConfig, add_arguments, from_namespace

log = logging.getLogger("server")


def parse_args(argv: list[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        prog="python -m server", description="Backfill gRPC inference server."
    )
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return from_namespace(ns)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


async def serve(config: ServerConfig) -> int:
    server = await BackfillServer.start(config)
    print(f"listening on {server.address}", flush=True)
    if server.http_address is not None:
        print(f"http on {server.http_address}", flush=True)
    if server.metrics_url is not None:
        log.info("metrics on %s", server.metrics_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (grace %.1fs)", config.drain_grace_s)
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["keys"]:
        from server.security import keys_cli

        return keys_cli.main(args[1:])
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    config = parse_args(args)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
