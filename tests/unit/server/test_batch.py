"""Offline batch jobs: lifecycle, progress, ordered results with ids, resume, cancel."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import AsyncClient, JobState
from server.app import BackfillServer
from server.executor.base import SamplingParams
from server.jobs.sqlite_store import SQLiteJobStore
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import MakeServer, is_idle, tiny_capacity, wait_until

pytestmark = pytest.mark.unit


def item(ids: list[int], max_tokens: int, cid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        client_request_id=cid,
        tier=pb.TIER_ONLINE,  # forced to OFFLINE by the server
    )


async def test_job_runs_to_completion_with_ordered_results(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    # Later items are shorter, so they finish first; results still come in submission order.
    items = [item([i + 1, 7], max_tokens=12 - i, cid=f"q{i}" if i % 2 else "") for i in range(10)]
    job = await stub.SubmitBatch(
        pb.SubmitBatchRequest(requests=items, tenant="eval", labels={"suite": "smoke"})
    )
    assert job.total == 10 and job.tenant == "eval" and job.labels["suite"] == "smoke"
    assert job.state in (pb.BATCH_STATE_QUEUED, pb.BATCH_STATE_RUNNING)
    results = [r async for r in stub.StreamBatchResults(
        pb.StreamBatchResultsRequest(id=job.id, tenant="eval"))]
    assert [r.index for r in results] == list(range(10))
    assert [r.client_request_id for r in results] == [
        f"q{i}" if i % 2 else str(i) for i in range(10)
    ]
    for i, r in enumerate(results):
        expected, _ = executor.expected_output([i + 1, 7], SamplingParams(max_tokens=12 - i))
        assert tuple(r.token_ids) == expected
        assert r.text == "".join(f"<{t}>" for t in expected)
        assert r.finish_reason == pb.FINISH_REASON_LENGTH and not r.HasField("error")
        assert r.usage.completion_tokens == len(expected)
    done = await stub.GetBatch(pb.GetBatchRequest(id=job.id, tenant="eval"))
    assert done.state == pb.BATCH_STATE_COMPLETED
    assert (done.completed, done.failed, done.cancelled) == (10, 0, 0)
    assert done.completion_tokens == sum(12 - i for i in range(10))
    assert done.HasField("finished_at")
    assert len(executor.enqueued) == 10


async def test_results_stream_ends_with_the_job(
    stub: pb_grpc.InferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job's end is recorded after its last result; a slow store must not let a read that
    # follows the stream see FINALIZING.
    finalize = SQLiteJobStore.finalize

    def slow_finalize(store: SQLiteJobStore, job_id: str, at: float) -> None:
        time.sleep(0.3)
        finalize(store, job_id, at)

    monkeypatch.setattr(SQLiteJobStore, "finalize", slow_finalize)
    job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[item([5], 2), item([6], 3)]))
    results = [r async for r in stub.StreamBatchResults(pb.StreamBatchResultsRequest(id=job.id))]
    done = await stub.GetBatch(pb.GetBatchRequest(id=job.id))
    assert len(results) == 2 and done.state == pb.BATCH_STATE_COMPLETED


async def test_results_stream_ends_when_recording_the_end_fails(
    make_server: MakeServer, tiny_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_finalize(store: SQLiteJobStore, job_id: str, at: float) -> None:
        raise OSError("disk full")

    store = str(tmp_path / "shared.db")
    with monkeypatch.context() as patch:
        patch.setattr(SQLiteJobStore, "finalize", broken_finalize)
        first = await make_server(ScriptedExecutor(tiny_capacity(tiny_engine)), job_store=store)
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[item([5], 2)]))
            results = [r async for r in stub.StreamBatchResults(
                pb.StreamBatchResultsRequest(id=job.id), timeout=10)]
            stuck = await stub.GetBatch(pb.GetBatchRequest(id=job.id))
        await first.stop(grace_s=0.0)
    assert len(results) == 1 and stuck.state == pb.BATCH_STATE_FINALIZING

    second = await make_server(ScriptedExecutor(tiny_capacity(tiny_engine)), job_store=store)
    async with AsyncClient(second.address) as client:  # the next start records the end
        final = [s async for s in client.watch(job.id, interval_s=0.05)][-1]
    assert final.state is JobState.COMPLETED


async def test_items_run_on_the_offline_tier(
    server: BackfillServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[item([5], 2), item([6], 2)]))
    _ = [r async for r in stub.StreamBatchResults(pb.StreamBatchResultsRequest(id=job.id))]
    snap = server.scheduler.snapshot()
    assert (snap.offline.finished, snap.online.finished) == (2, 0)


async def test_results_resume_from_start_index(stub: pb_grpc.InferenceServiceStub) -> None:
    job = await stub.SubmitBatch(
        pb.SubmitBatchRequest(requests=[item([i + 1], max_tokens=3) for i in range(6)])
    )
    request = pb.StreamBatchResultsRequest(id=job.id, start_index=4)
    results = [r async for r in stub.StreamBatchResults(request)]
    assert [r.index for r in results] == [4, 5]


async def test_cancel_keeps_finished_results_and_drops_the_rest(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    executor = ScriptedExecutor(
        tiny_capacity(tiny_engine, max_slots=2), step_hook=lambda _: time.sleep(0.003)
    )
    server = await make_server(executor, offline_reserve=0.0)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        items = [item([1, 1], 2), item([2, 2], 2)] + [item([i + 3], 10_000) for i in range(5)]
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=items))
        first_two = stub.StreamBatchResults(pb.StreamBatchResultsRequest(id=job.id))
        assert (await first_two.read()).index == 0
        assert (await first_two.read()).index == 1
        progress = await stub.GetBatch(pb.GetBatchRequest(id=job.id))
        assert progress.state == pb.BATCH_STATE_RUNNING and progress.completed == 2
        cancelled = await stub.CancelBatch(pb.CancelBatchRequest(id=job.id))
        assert cancelled.state == pb.BATCH_STATE_CANCELLED
        assert (cancelled.completed, cancelled.cancelled, cancelled.failed) == (2, 5, 0)
        results = [
            r async for r in stub.StreamBatchResults(pb.StreamBatchResultsRequest(id=job.id))
        ]
        first_two.cancel()
    assert [r.finish_reason for r in results[:2]] == [pb.FINISH_REASON_LENGTH] * 2
    assert [len(r.token_ids) for r in results[:2]] == [2, 2]
    assert all(r.finish_reason == pb.FINISH_REASON_CANCELLED for r in results[2:])
    assert all(r.error.code == grpc.StatusCode.CANCELLED.value[0] for r in results[2:])
    await wait_until(lambda: is_idle(server))


async def test_list_batches_newest_first_and_unknown_ids(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    ids = []
    for n in range(3):
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[item([n + 1], 1)]))
        ids.append(job.id)
    listed = await stub.ListBatches(pb.ListBatchesRequest())
    assert [j.id for j in listed.jobs] == ids[::-1]
    for call in (
        stub.GetBatch(pb.GetBatchRequest(id="nope")),
        stub.CancelBatch(pb.CancelBatchRequest(id="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [r async for r in stub.StreamBatchResults(pb.StreamBatchResultsRequest(id="nope"))]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_job_larger_than_the_offline_queue_is_fed_gradually(
    make_server: MakeServer, executor: ScriptedExecutor
) -> None:
    """The job's requests wait in the store and go to the scheduler a bounded number at a
    time, so a job far larger than the scheduler's offline queue runs to the end."""
    server = await make_server(executor, max_offline_queue=3, offline_reserve=0.0,
                               job_max_in_flight=8)
    most_queued = 0

    def watch() -> None:
        nonlocal most_queued
        most_queued = max(most_queued, server.scheduler.snapshot().offline.queued)

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        total = executor.capacity.max_slots * 10
        items = [item([i % 250 + 1, 7], 5) for i in range(total)]
        job = await stub.SubmitBatch(pb.SubmitBatchRequest(requests=items))
        request = pb.StreamBatchResultsRequest(id=job.id)
        results = []
        async for r in stub.StreamBatchResults(request):
            watch()
            results.append(r)
        done = await stub.GetBatch(pb.GetBatchRequest(id=job.id))
    assert [r.index for r in results] == list(range(total))
    assert all(r.finish_reason == pb.FINISH_REASON_LENGTH for r in results)
    assert done.state == pb.BATCH_STATE_COMPLETED and done.completed == total
    assert most_queued <= 3
    await wait_until(lambda: is_idle(server))


async def test_idempotency_key_returns_the_first_job(
    executor: ScriptedExecutor, stub: pb_grpc.InferenceServiceStub
) -> None:
    """A repeated submit (a retry after a lost reply) with the same key and body gets the first
    job back and runs nothing twice; the key is scoped by tenant; another body is refused."""
    body = dict(requests=[item([1, 2], 3), item([4], 2)], tenant="t", labels={"a": "b"})
    first = await stub.SubmitBatch(pb.SubmitBatchRequest(idempotency_key="k1", **body))
    again = await stub.SubmitBatch(pb.SubmitBatchRequest(idempotency_key="k1", **body))
    assert again.id == first.id
    other_tenant = await stub.SubmitBatch(
        pb.SubmitBatchRequest(idempotency_key="k1", **{**body, "tenant": "u"}))
    assert other_tenant.id != first.id
    no_key = [await stub.SubmitBatch(pb.SubmitBatchRequest(**body)) for _ in range(2)]
    assert no_key[0].id != no_key[1].id
    listed = await stub.ListBatches(pb.ListBatchesRequest(tenant="t"))
    assert len(listed.jobs) == 3
    listed = await stub.ListBatches(pb.ListBatchesRequest(tenant="u"))
    assert [j.id for j in listed.jobs] == [other_tenant.id]
    for changed in ({"requests": [item([1, 2], 4), item([4], 2)]}, {"labels": {"a": "c"}}):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitBatch(pb.SubmitBatchRequest(idempotency_key="k1",
                                                         **{**body, **changed}))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "idempotency_key 'k1'" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitBatch(pb.SubmitBatchRequest(idempotency_key="x" * 257, **body))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (info.value.details() or "")
