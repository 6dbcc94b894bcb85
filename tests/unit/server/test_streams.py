"""Token coalescing: a reader slower than generation gets fewer, larger chunks, losing nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.api.streams import EventBridge, RequestStream, merge_events
from server.scheduler.types import Outcome, SchedEvent, Usage

pytestmark = pytest.mark.unit


def token(i: int) -> SchedEvent:
    return SchedEvent(request_id=1, token_ids=(i,), text=f"<{i}>")


def final(i: int) -> SchedEvent:
    usage = Usage(prompt_tokens=2, completion_tokens=i + 1, cached_prompt_tokens=0)
    return SchedEvent(
        request_id=1, token_ids=(i,), text=f"<{i}>", outcome=Outcome.LENGTH, usage=usage
    )


def test_merge_concatenates_and_keeps_the_final_fields() -> None:
    merged = merge_events([token(0), token(1), final(2)])
    assert merged.token_ids == (0, 1, 2)
    assert merged.text == "<0><1><2>"
    assert merged.outcome is Outcome.LENGTH and merged.usage is not None
    assert merged.usage.completion_tokens == 3


async def test_pending_events_come_out_as_one_chunk() -> None:
    stream = RequestStream(asyncio.get_running_loop())
    for i in range(5):
        stream.push(token(i))
    chunk = await stream.next()
    assert chunk is not None and chunk.token_ids == (0, 1, 2, 3, 4) and not chunk.is_final
    stream.push(final(5))
    last = await stream.next()
    assert last is not None and last.is_final and last.token_ids == (5,)
    assert await stream.next() is None and stream.finished


async def test_slow_reader_gets_coalesced_chunks_from_another_thread() -> None:
    """A producer thread (like the scheduler's) emits 200 tokens quickly; the reader sleeps
    between reads. Every token arrives once, in order, in far fewer chunks."""
    stream = RequestStream(asyncio.get_running_loop())
    n = 200

    def produce() -> None:
        for i in range(n - 1):
            stream.sink(token(i))
            time.sleep(0.0005)
        stream.sink(final(n - 1))

    producer = threading.Thread(target=produce)
    producer.start()
    chunks: list[SchedEvent] = []
    while (chunk := await stream.next()) is not None:
        chunks.append(chunk)
        await asyncio.sleep(0.02)  # the slow reader
    producer.join()
    assert [t for c in chunks for t in c.token_ids] == list(range(n))
    assert "".join(c.text for c in chunks) == "".join(f"<{i}>" for i in range(n))
    assert chunks[-1].is_final and all(not c.is_final for c in chunks[:-1])
    assert len(chunks) < n / 4, f"{len(chunks)} chunks for {n} tokens: nothing was coalesced"


async def test_on_ready_fires_once_per_batch_of_pending_events() -> None:
    ready: list[RequestStream] = []
    stream = RequestStream(asyncio.get_running_loop(), on_ready=ready.append)
    stream.push(token(0))
    stream.push(token(1))
    assert ready == [stream]
    assert stream.take() is not None
    assert stream.take() is None  # nothing pending
    stream.push(token(2))
    assert ready == [stream, stream]


async def test_on_final_runs_on_the_loop_as_the_final_event_arrives() -> None:
    """What a request holds (its quota ticket) is given back on the loop's thread when its
    final event arrives from the scheduler's thread, whether or not a consumer ever takes it
    (a Session that closed with output pending)."""
    loop = asyncio.get_running_loop()
    stream = RequestStream(loop)
    seen: list[tuple[Outcome | None, int]] = []
    stream.on_final = lambda event: seen.append((event.outcome, threading.get_ident()))

    def produce() -> None:
        stream.sink(token(0))
        stream.sink(final(1))

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join()
    assert seen == []  # not on the scheduler's thread
    for _ in range(10):
        if seen:
            break
        await asyncio.sleep(0)
    assert seen == [(Outcome.LENGTH, threading.get_ident())]
    assert not stream.finished  # nobody took the events


async def test_one_wakeup_carries_a_whole_pass_of_events_in_order() -> None:
    """The scheduler thread emits a pass's events for many requests; the loop is woken once
    (one call_soon_threadsafe), and each stream gets its events in order."""
    loop = asyncio.get_running_loop()
    streams = [RequestStream(loop) for _ in range(50)]
    bridge = EventBridge.for_loop(loop)
    before = bridge.wakeups

    def one_pass() -> None:  # the scheduler's thread, while the loop is busy elsewhere
        for i in range(3):
            for stream in streams:
                stream.sink(final(i) if i == 2 else token(i))

    producer = threading.Thread(target=one_pass)
    producer.start()
    producer.join()  # the loop has not run: everything is still in one batch
    assert bridge.wakeups == before + 1
    for stream in streams:
        chunk = await stream.next()
        assert chunk is not None and chunk.is_final and chunk.token_ids == (0, 1, 2)
        assert chunk.text == "<0><1><2>"


async def test_events_posted_after_a_drain_are_delivered_by_the_next_one() -> None:
    loop = asyncio.get_running_loop()
    stream = RequestStream(loop)
    bridge = EventBridge.for_loop(loop)
    before = bridge.wakeups
    stream.sink(token(0))
    assert await stream.next() == token(0)  # the drain ran
    stream.sink(final(1))
    last = await stream.next()
    assert last is not None and last.is_final and bridge.wakeups == before + 2


async def test_streams_of_one_loop_share_its_bridge() -> None:
    loop = asyncio.get_running_loop()
    assert EventBridge.for_loop(loop) is EventBridge.for_loop(loop)
