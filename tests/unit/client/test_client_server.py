"""The SDK against the real server (``serve_in_thread`` on the tiny random engine): streaming,
multiplexing without cross-talk, cancellation freeing the server, deadlines, errors, batch jobs,
and sync/async parity."""

from __future__ import annotations

import asyncio
import time

import pytest

from client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    FinishReason,
    InvalidArgument,
    JobState,
    NotFound,
    SamplingParams,
    Tier,
)

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
LONG = SamplingParams(max_tokens=1500, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    from server.app import serve_in_thread
    from server.config import ServerConfig

    config = ServerConfig(
        engine=str(tiny_engine), port=0, metrics_port=-1, max_online_queue=8192,
        job_store=str(tmp_path_factory.mktemp("jobs") / "jobs.db"),
    )
    thread = serve_in_thread(config)
    yield thread
    thread.stop(grace_s=1.0)


def prompts(n: int) -> list[list[int]]:
    return [[3 + (i * 7) % 250, 5 + i % 200, 11 + (i * 13) % 230] for i in range(n)]


async def wait_idle(client: AsyncClient, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await client.stats()
        busy = sum(t.running + t.queued for t in stats.tiers.values())
        if stats.slots_free == stats.slots_total and busy == 0:
            return
        assert time.monotonic() < deadline, f"server not idle: {stats}"
        await asyncio.sleep(0.05)


async def test_streaming_chunks_add_up_to_the_completion(server):
    async with AsyncClient(server.address) as client:
        chunks = [c async for c in client.generate("hello there", sampling=GREEDY)]
        done = await client.complete("hello there", sampling=GREEDY)
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    tokens = tuple(t for c in chunks for t in c.token_ids)
    assert tokens == done.token_ids and "".join(c.text for c in chunks) == done.text
    assert last.usage is not None and last.usage.completion_tokens == len(tokens)
    assert last.timing is not None and last.timing.ttft_s is not None


@pytest.mark.parametrize("transport", ["session", "unary"])
async def test_concurrent_requests_get_their_own_tokens(server, transport):
    distinct = prompts(16)
    async with AsyncClient(server.address, transport=transport) as client:
        solo = [(await client.complete(token_ids=p, sampling=GREEDY)).token_ids for p in distinct]
        together = await asyncio.gather(
            *(client.complete(token_ids=distinct[i % 16], sampling=GREEDY) for i in range(160))
        )
    for i, done in enumerate(together):
        assert done.token_ids == solo[i % 16], f"request {i} got another request's tokens"
    assert len(set(solo)) > 1  # the prompts really differ


async def test_thousands_of_concurrent_requests_on_one_session(server):
    distinct = prompts(20)
    small = SamplingParams(max_tokens=2, temperature=0.0)
    async with AsyncClient(server.address) as client:
        solo = [(await client.complete(token_ids=p, sampling=small)).token_ids for p in distinct]
        together = await asyncio.gather(
            *(client.complete(token_ids=distinct[i % 20], sampling=small) for i in range(2000))
        )
        assert client.num_open_requests == 0
    assert [d.token_ids for d in together] == [solo[i % 20] for i in range(2000)]


async def test_break_cancels_and_frees_the_server(server):
    async with AsyncClient(server.address) as client:
        streams = [client.generate(token_ids=p, sampling=LONG) for p in prompts(8)]
        for stream in streams:
            async for _ in stream:
                break
        stats = await client.stats()
        assert stats.slots_free < stats.slots_total  # they were running
        for stream in streams:
            await stream.aclose()
        await wait_idle(client)


async def test_dropping_a_stream_after_break_frees_the_server(server):
    async with AsyncClient(server.address) as client:
        async for _ in client.generate(token_ids=[4, 4, 4], sampling=LONG):
            break  # no aclose: dropping the stream sends the cancel
        assert await _eventually_closed(client)
        await wait_idle(client)


async def _eventually_closed(client: AsyncClient) -> bool:
    for _ in range(100):
        if client.num_open_requests == 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_task_cancel_frees_the_server(server):
    async with AsyncClient(server.address) as client:
        task = asyncio.ensure_future(client.complete(token_ids=[5, 6, 7], sampling=LONG))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(client)


def test_sync_break_frees_the_server(server):
    with Client(server.address) as client:
        for _ in client.generate(token_ids=[9, 8, 7], sampling=LONG):
            break  # the dropped iterator cancels the request
        deadline = time.monotonic() + 10
        while client.stats().slots_free != client.stats().slots_total:
            assert time.monotonic() < deadline
            time.sleep(0.05)


async def test_ttft_deadline_passes_while_queued(server):
    async with AsyncClient(server.address) as client:
        slots = (await client.stats()).slots_total
        fillers = [client.generate(token_ids=p, sampling=LONG) for p in prompts(slots)]
        for stream in fillers:
            await stream.__anext__()  # every slot now runs a long request
        with pytest.raises(DeadlineExceeded):
            await client.complete(token_ids=[1, 2, 3], sampling=GREEDY, deadline=0.05)
        for stream in fillers:
            await stream.aclose()
        await wait_idle(client)


async def test_server_errors_are_mapped(server):
    async with AsyncClient(server.address) as client:
        vocab = (await client.list_models())[0].vocab_size
        with pytest.raises(InvalidArgument):
            await client.complete(token_ids=[vocab + 5], sampling=GREEDY)
        with pytest.raises(NotFound):
            await client.get_batch("no-such-job")
        # The Session survives a failed request.
        assert (await client.complete(token_ids=[4, 5], sampling=GREEDY)).token_ids


async def test_batch_job_lifecycle(server):
    lines = [
        {"id": "a", "prompt": "hello", "max_tokens": 5},
        {"id": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        {"id": "c", "token_ids": [7, 8, 9], "max_tokens": 3, "temperature": 0.0},
    ]
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(lines, labels={"who": "test"})
        assert job.total == 3 and job.labels == {"who": "test"}
        states = [s async for s in client.watch(job.id, interval_s=0.05)]
        assert states[-1].state is JobState.COMPLETED and states[-1].completed == 3
        results = [r async for r in client.results(job.id)]
        assert [r.request_id for r in results] == ["a", "b", "c"]
        assert [r.index for r in results] == [0, 1, 2]
        online = await client.complete(
            token_ids=[7, 8, 9], sampling=SamplingParams(max_tokens=3, temperature=0.0)
        )
        assert results[2].token_ids == online.token_ids  # same greedy output on either tier
        assert job.id in [j.id for j in await client.list_batches()]


async def test_batch_cancel_keeps_finished_results(server):
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(
            [{"token_ids": p, "max_tokens": 400, "ignore_eos": True} for p in prompts(200)]
        )
        await asyncio.sleep(0.3)
        cancelled = await client.cancel_batch(job.id)
        final = [s async for s in client.watch(job.id, interval_s=0.05)][-1]
        assert final.state is JobState.CANCELLED and final.cancelled > 0
        assert cancelled.id == job.id
        results = [r async for r in client.results(job.id)]
        assert [r.index for r in results] == sorted(r.index for r in results)
        await wait_idle(client)


async def test_offline_tier_runs(server):
    async with AsyncClient(server.address) as client:
        done = await client.complete(token_ids=[3, 4], sampling=GREEDY, tier=Tier.OFFLINE)
        online = await client.complete(token_ids=[3, 4], sampling=GREEDY)
    assert done.token_ids == online.token_ids


def test_sync_and_async_give_the_same_outputs(server):
    sampling = SamplingParams(max_tokens=8, temperature=0.8, seed=1234)
    with Client(server.address) as client:
        sync_out = [client.complete(token_ids=p, sampling=sampling) for p in prompts(5)]
        sync_chunks = list(client.generate("parity", sampling=sampling))

    async def run_async():
        async with AsyncClient(server.address) as client:
            outs = [await client.complete(token_ids=p, sampling=sampling) for p in prompts(5)]
            chunks = [c async for c in client.generate("parity", sampling=sampling)]
            return outs, chunks

    async_out, async_chunks = asyncio.run(run_async())
    assert [(c.text, c.token_ids) for c in sync_out] == [(c.text, c.token_ids) for c in async_out]
    # Chunk boundaries may differ with timing; the streamed tokens and text may not.
    for chunks in (sync_chunks, async_chunks):
        assert chunks[-1].finish_reason is not None
    assert [t for c in sync_chunks for t in c.token_ids] == [
        t for c in async_chunks for t in c.token_ids
    ]
    assert "".join(c.text for c in sync_chunks) == "".join(c.text for c in async_chunks)


async def test_submit_batch_retry_after_a_lost_reply_makes_one_job(server):
    """The first upload reaches the server but its reply is lost (UNAVAILABLE): the SDK sends
    it again with the same idempotency key and gets the same job; only one job exists. A
    one-shot iterator cannot be sent again, so its lost reply is an error."""
    import grpc

    from client import AlreadyExists, Unavailable

    class LostReply(grpc.aio.AioRpcError):
        def __init__(self) -> None:
            super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                             grpc.aio.Metadata(), details="reply lost on purpose")

    async with AsyncClient(server.address, max_retries=2, retry_backoff_s=0.01) as client:
        stub = client._ensure_stub()
        real = stub.UploadBatch
        calls = []

        async def flaky(messages, **kw):
            async def tap():
                async for message in messages:
                    if message.WhichOneof("kind") == "header":
                        calls.append(message.header.idempotency_key)
                    yield message

            reply = await real(tap(), **kw)
            if len(calls) % 2 == 1:
                raise LostReply()
            return reply

        stub.UploadBatch = flaky
        before = {j.id for j in await client.list_batches()}
        job = await client.submit_batch([{"token_ids": [5, 6], "max_tokens": 2}])
        assert len(calls) == 2 and calls[0] == calls[1] and calls[0]  # one key, resent
        after = {j.id for j in await client.list_batches()}
        assert after - before == {job.id}
        one_shot = iter([{"token_ids": [5, 8], "max_tokens": 2}])
        with pytest.raises(Unavailable):
            await client.submit_batch(one_shot)
        stub.UploadBatch = real
        same = await client.submit_batch([{"token_ids": [5, 6], "max_tokens": 2}],
                                         idempotency_key=calls[0])
        assert same.id == job.id
        with pytest.raises(AlreadyExists):
            await client.submit_batch([{"token_ids": [5, 7], "max_tokens": 2}],
                                      idempotency_key=calls[0])


async def test_speculative_decoding_per_request(server):
    """The n-gram drafter of the tiny engine: the same tokens, and the usage says so."""
    prompt = [40, 41, 42, 43, 44, 45, 46, 47] * 3
    async with AsyncClient(server.address) as client:
        [model] = await client.list_models()
        plain = await client.complete(token_ids=prompt, sampling=SamplingParams(
            max_tokens=40, ignore_eos=True, num_speculative_tokens=0))
        spec = await client.complete(token_ids=prompt, sampling=SamplingParams(
            max_tokens=40, ignore_eos=True, num_speculative_tokens=4))
    assert (model.drafter, model.max_draft_len) == ("ngram", 7)
    assert spec.token_ids == plain.token_ids
    assert spec.usage.drafter == "ngram" and spec.usage.speculative_steps > 0
    assert spec.usage.draft_tokens_proposed >= spec.usage.draft_tokens_accepted
    assert plain.usage.draft_tokens_proposed == 0
