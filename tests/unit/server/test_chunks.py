"""Chunks written in place (the Session hot path) equal chunks built field by field."""

from __future__ import annotations

import pytest

from backfill.v1 import inference_pb2 as pb
from server.api.convert import (
    fill_generate_response,
    to_generate_response,
    to_pb_timing,
    to_pb_usage,
)
from server.scheduler.types import Outcome, SchedEvent, Timing, Usage

pytestmark = pytest.mark.unit

USAGE = Usage(prompt_tokens=4, completion_tokens=3, cached_prompt_tokens=2,
              draft_tokens_proposed=5, draft_tokens_accepted=1)
EVENTS = [
    SchedEvent(request_id=1, token_ids=(7, 8), text="ab"),
    SchedEvent(request_id=1, token_ids=(), text="", outcome=Outcome.CANCELLED,
               usage=Usage(0, 0, 0), timing=Timing(0.0, None, 0.0, 0)),
    SchedEvent(request_id=1, token_ids=(9,), text="c", outcome=Outcome.LENGTH, usage=USAGE,
               timing=Timing(0.0015, 0.25, 1.5, 2)),
]


def reference(event: SchedEvent, cid: str, model: str) -> pb.GenerateResponse:
    """The message as built before in-place filling (sub-messages made, then copied)."""
    out = pb.GenerateResponse(token_ids=event.token_ids, text=event.text, model=model,
                              client_request_id=cid)
    if event.outcome is not None:
        out.finish_reason = {Outcome.CANCELLED: pb.FINISH_REASON_CANCELLED,
                             Outcome.LENGTH: pb.FINISH_REASON_LENGTH}[event.outcome]
    if event.usage is not None:
        out.usage.CopyFrom(to_pb_usage(event.usage))
    if event.timing is not None:
        out.timing.CopyFrom(to_pb_timing(event.timing))
    return out


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(("cid", "model"), [("r1", "tiny"), ("", "")])
def test_in_place_chunk_equals_the_reference(event: SchedEvent, cid: str, model: str) -> None:
    expected = reference(event, cid, model)
    session = pb.SessionResponse(client_request_id=cid)
    fill_generate_response(session.chunk, event, client_request_id=cid, model=model)
    assert session.chunk == expected
    assert session.chunk.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True)
    assert to_generate_response(event, client_request_id=cid, model=model) == expected


def test_zero_timing_and_usage_are_still_present() -> None:
    """A request cancelled while queued has all-zero usage and timing; the client reads
    presence (HasField) to tell 'zero' from 'not reported'."""
    chunk = to_generate_response(EVENTS[1], client_request_id="r")
    assert chunk.HasField("usage") and chunk.HasField("timing")
    assert chunk.timing.HasField("queue_time") and chunk.timing.HasField("total_time")
    assert not chunk.timing.HasField("ttft")
