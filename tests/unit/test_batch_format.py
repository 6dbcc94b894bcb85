"""backfill.batch_format: both JSONL input formats to GenerateRequest, and clear line errors."""

from __future__ import annotations

import pytest

from backfill.batch_format import (
    CHAT_URL,
    COMPLETIONS_URL,
    LineError,
    custom_id_of,
    is_request_line,
    parse_json_line,
    parse_line,
)
from backfill.v1 import inference_pb2 as pb

pytestmark = pytest.mark.unit


def openai(url: str = CHAT_URL, **body: object) -> dict[str, object]:
    return {"custom_id": "r1", "method": "POST", "url": url, "body": body}


def test_backfill_lines() -> None:
    chat = parse_line({"id": "q", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 7, "temperature": 0.5, "stop": "END", "model": "m"})
    req = chat.request
    assert chat.url == "" and chat.custom_id == "q" and req.model == "m"
    assert req.tier == pb.TIER_OFFLINE
    assert [(m.role, m.content) for m in req.chat.messages] == [(pb.ROLE_USER, "hi")]
    assert (req.sampling.max_tokens, req.sampling.temperature) == (7, 0.5)
    assert list(req.sampling.stop) == ["END"]
    ids = parse_line({"token_ids": [1, 2], "seed": 2**40, "ignore_eos": True}).request
    assert list(ids.token_ids.ids) == [1, 2] and ids.sampling.seed == 2**40
    assert ids.client_request_id == "" and ids.sampling.ignore_eos
    assert not parse_line({"prompt": "x"}).request.sampling.HasField("max_tokens")


def test_openai_chat_line() -> None:
    line = openai(model="gpt-4o-mini", max_completion_tokens=5, seed=3, n=1, stream=False,
                  user="u", messages=[
                      {"role": "developer", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}])
    parsed = parse_line(line)
    req = parsed.request
    assert parsed.url == CHAT_URL and parsed.custom_id == "r1" and req.model == "gpt-4o-mini"
    assert [(m.role, m.content) for m in req.chat.messages] == [
        (pb.ROLE_SYSTEM, "Be brief."), (pb.ROLE_USER, "a\nb")]
    assert (req.sampling.max_tokens, req.sampling.seed) == (5, 3)


def test_openai_completions_line() -> None:
    text = parse_line(openai(COMPLETIONS_URL, prompt="Once", max_tokens=4, stop=["\n"]))
    assert text.url == COMPLETIONS_URL and text.request.text == "Once"
    ids = parse_line(openai(COMPLETIONS_URL, prompt=[[5, 6]])).request
    assert list(ids.token_ids.ids) == [5, 6]
    assert parse_line(openai(COMPLETIONS_URL, prompt=["one"])).request.text == "one"


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"prompt": "x", "max_token": 3}, "unknown keys ['max_token']"),
        ({"prompt": "x", "token_ids": [1]}, "exactly one"),
        ({"id": "a"}, "exactly one"),
        ({"prompt": 5}, "prompt must be a string"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens must be a non-negative integer"),
        ({"prompt": "x", "temperature": "hot"}, "temperature must be a number"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"token_ids": [1, "a"]}, "token_ids must be a list"),
        (openai(messages=[{"role": "user", "content": "x"}], n=2), "body.n"),
        (openai(messages=[{"role": "user", "content": "x"}], tools=[{}]), "body.tools"),
        (openai(messages=[{"role": "user", "content": "x"}], logprobs=True),
         "body.logprobs"),
        (openai(messages=[{"role": "user", "content": "x"}], frequency_penalty="a"),
         "body.frequency_penalty must be a number"),
        (openai(messages=[{"role": "user", "content": "x"}], priority="online"),
         "body.priority: batch jobs run offline"),
        (openai(messages=[{"role": "user", "content": "x"}], foo=1), "body.foo: unknown"),
        (openai(messages=[{"role": "tool", "content": "x"}]), "role"),
        (openai(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "text parts"),
        (openai(), "body.messages must be a non-empty list"),
        (openai(COMPLETIONS_URL), "body.prompt is required"),
        (openai(COMPLETIONS_URL, prompt=["a", "b"]), "one prompt per line"),
        (openai(COMPLETIONS_URL, prompt="x", max_tokens=2, max_completion_tokens=2),
         "not both"),
        ({**openai(COMPLETIONS_URL, prompt="x"), "url": "/v1/embeddings"}, "url must be one of"),
        ({**openai(COMPLETIONS_URL, prompt="x"), "method": "GET"}, "method must be 'POST'"),
        ({**openai(COMPLETIONS_URL, prompt="x"), "custom_id": ""}, "custom_id must not be empty"),
        ({"custom_id": "a", "url": COMPLETIONS_URL, "body": {}}, "method is required"),
        ({**openai(COMPLETIONS_URL, prompt="x"), "extra": 1}, "unknown keys ['extra']"),
    ],
)
def test_bad_lines_name_the_problem(obj: dict[str, object], needle: str) -> None:
    with pytest.raises(LineError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_line(obj)


def test_raw_lines() -> None:
    assert parse_json_line(b'{"prompt": "x"}').request.text == "x"
    with pytest.raises(LineError, match="not JSON"):
        parse_json_line(b"{nope")
    with pytest.raises(LineError, match="expected a JSON object"):
        parse_json_line(b"[1]")
    assert not is_request_line(b"  \n") and not is_request_line("# note")
    assert is_request_line(b'{"prompt": "#"}')
    assert custom_id_of({"custom_id": "c"}) == "c" and custom_id_of({"id": 7}) == "7"
    assert custom_id_of([1]) == ""


def test_penalties_are_read_in_both_formats() -> None:
    line = parse_line(openai(messages=[{"role": "user", "content": "x"}], presence_penalty=0.5,
                             frequency_penalty=-1, repetition_penalty=1.2))
    s = line.request.sampling
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -1.0)
    assert s.repetition_penalty == pytest.approx(1.2)
    assert parse_line({"prompt": "x", "presence_penalty": 1}).request.sampling.presence_penalty == 1
