"""Message size limits, client and server on the same setting: a batch submit over gRPC's 4 MiB
default goes through end to end, and a message over a configured limit gets an error that says
so (never a "queue is full"), without harming the server or other requests."""

from __future__ import annotations

import json

import pytest

from backfill.transport import DEFAULT_MAX_MESSAGE_MB
from client import Client, JobState, MessageTooLarge, ResourceExhausted, SamplingParams
from client.cli import main
from server.config import ServerConfig

pytestmark = pytest.mark.unit

FOUR_MIB = 4 << 20


def serve(engine, **config):  # type: ignore[no-untyped-def]
    from server.app import serve_in_thread

    return serve_in_thread(ServerConfig(engine=str(engine), port=0, metrics_port=-1, **config))


def big_batch(count: int) -> list[dict[str, object]]:
    # ~2 KB each: about 1,450 tokens, within the tiny engine's 2,048-token window.
    return [{"id": f"r{i}", "prompt": "hello world " * 160 + str(i), "max_tokens": 1}
            for i in range(count)]


def test_server_and_sdk_defaults_match() -> None:
    assert ServerConfig().max_message_mb == DEFAULT_MAX_MESSAGE_MB == 64


def test_a_batch_over_four_mib_goes_through_end_to_end(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    requests = big_batch(2200)
    assert len(json.dumps(requests)) > FOUR_MIB
    thread = serve(tiny_engine)
    try:
        with Client(thread.address) as client:
            job = client.submit_batch(requests)
            assert job.total == 2200
            client.cancel_batch(job.id)  # running 3M prompt tokens is not this test's business
            results = list(client.results(job.id))
            assert [r.request_id for r in results] == [f"r{i}" for i in range(2200)]
            assert client.get_batch(job.id).state in (JobState.CANCELLED, JobState.COMPLETED)
    finally:
        thread.stop(grace_s=0.5)


def test_over_the_servers_limit_says_so_and_the_server_carries_on(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    thread = serve(tiny_engine, max_message_mb=1)
    try:
        with Client(thread.address) as client:  # the client's default limit is larger
            with pytest.raises(MessageTooLarge, match="over the server's limit of 1 MiB") as err:
                client.submit_batch(big_batch(600))  # ~1.2 MB
            assert isinstance(err.value, ResourceExhausted)  # still a RESOURCE_EXHAUSTED
            assert "queue" not in str(err.value)
            unary = Client(thread.address, transport="unary")
            with unary, pytest.raises(MessageTooLarge, match="--max-message-mb"):
                unary.complete("x" * (1 << 20))
            done = client.complete("hello", sampling=SamplingParams(max_tokens=2))
            assert len(done.token_ids) == 2
    finally:
        thread.stop(grace_s=0.5)


def test_the_cli_takes_the_limit_and_explains_a_refusal(tiny_engine, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in big_batch(600)))
    thread = serve(tiny_engine, max_message_mb=1)
    try:
        rc = main(["batch", "submit", str(path), "--target", thread.address,
                   "--max-message-mb", "1"])
        assert rc == 1
        err = capsys.readouterr().err
        assert "over this client's limit of 1 MiB" in err and "--max-message-mb" in err
    finally:
        thread.stop(grace_s=0.5)
