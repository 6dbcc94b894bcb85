"""Pure pieces of the SDK: JSONL parsing, trace scaling, Poisson arrivals, report arithmetic."""

from __future__ import annotations

import itertools
import json

import pytest

from client.bench.loadgen import LoadResult, LoadSpec, RequestRecord, StatsSample
from client.bench.report import format_table, percentile, summarize
from client.bench.trace import (
    TraceRequest,
    length_pool,
    load_trace,
    poisson_arrivals,
    scale_trace,
    time_scale_for_rate,
)
from client.jobs import load_jsonl, parse_request
from client.types import SamplingParams, Tier

pytestmark = pytest.mark.unit


def test_parse_request_shapes():
    chat = parse_request(
        {"id": "q", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
         "temperature": 0.5, "stop": "END"}
    )
    assert chat.messages is not None and chat.messages[0].content == "hi"
    assert chat.sampling == SamplingParams(max_tokens=7, temperature=0.5, stop=("END",))
    assert parse_request({"prompt": "x"}, index=4).id == "4"


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"prompt": "x", "max_token": 3}, "max_token"),
        ({"prompt": "x", "token_ids": [1]}, "exactly one"),
        ({"id": "a"}, "exactly one"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ],
)
def test_parse_request_rejects(obj, needle):
    with pytest.raises(ValueError, match=needle):
        parse_request(obj)


def test_load_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n# comment\n\n{not json}\n")
    with pytest.raises(ValueError, match=r"r.jsonl:4"):
        load_jsonl(path)


def test_trace_parses_seven_digit_fractions(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    reqs = load_trace(path)
    assert reqs[0] == TraceRequest(0.0, 374, 44)
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-5)


def test_scale_trace_caps_lengths_and_windows_time():
    reqs = [TraceRequest(float(i), 100 * (i + 1), 10 * (i + 1)) for i in range(100)]
    scaled = scale_trace(reqs, time_scale=4, max_prompt_tokens=64, max_output_tokens=8,
                         duration_s=10)
    assert [r.arrival_s for r in scaled] == [i / 4 for i in range(40)]
    assert all(1 <= r.prompt_tokens <= 64 and 1 <= r.output_tokens <= 8 for r in scaled)
    assert scaled[0].prompt_tokens < scaled[-1].prompt_tokens  # the shape is kept


def test_time_scale_for_rate_gives_that_rate():
    reqs = [TraceRequest(i * 2.0, 1, 1) for i in range(101)]  # 0.5 req/s
    scale = time_scale_for_rate(reqs, 5.0)
    scaled = scale_trace(reqs, time_scale=scale, max_prompt_tokens=1, max_output_tokens=1)
    assert len(scaled) / scaled[-1].arrival_s == pytest.approx(5.0, rel=0.02)


def test_poisson_arrivals_rate():
    arrivals = poisson_arrivals(50.0, 20.0, [TraceRequest(0, 3, 2)], seed=1)
    assert 900 < len(arrivals) < 1100
    assert all(0 < a.arrival_s < 20 for a in arrivals)


def test_percentile_interpolates():
    assert percentile([], 0.5) is None
    assert percentile([10.0], 0.99) == 10.0
    assert percentile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_summarize_uses_server_counters_and_counts_unserved():
    records = (
        RequestRecord(Tier.ONLINE, 4, ttft_s=0.010, tpot_s=0.002),
        RequestRecord(Tier.ONLINE, 4, ttft_s=0.030, tpot_s=0.004),
        RequestRecord(Tier.ONLINE, 0, error="cut", waited_s=5.0),
        RequestRecord(Tier.OFFLINE, 9, ttft_s=1.0, tpot_s=0.01),
        RequestRecord(Tier.OFFLINE, 3, error="Internal"),
    )
    samples = (
        StatsSample(0.0, 8, 8, 2, 6, 100, 1000),
        StatsSample(2.0, 8, 4, 1, 3, 300, 2000),
    )
    spec = LoadSpec(duration_s=2.0, vocab_size=10)
    s = summarize("x", LoadResult(spec, 2.0, records, samples), price_per_hour=3.6)
    on, off = s.tier(Tier.ONLINE), s.tier(Tier.OFFLINE)
    assert (on.tokens_per_s, off.tokens_per_s) == (100.0, 500.0)
    assert on.requests == 2 and on.unserved == 1 and off.errors == 1
    assert on.ttft_ms[2] == pytest.approx(4900.6, rel=1e-3)  # the unserved wait dominates p99
    assert s.occupancy == pytest.approx(0.75) and s.offline_occupancy == pytest.approx(9 / 16)
    assert s.cost_per_million_tokens == pytest.approx(3.6 / 3600 / 600 * 1e6)
    table = format_table([s])
    assert "1 unserved" in table and "1 errors" in table


def test_the_shipped_trace_loads_without_a_path():
    reqs = load_trace()
    assert len(reqs) == 19366  # the whole Azure conversation trace
    assert reqs[0] == TraceRequest(0.0, 374, 44)
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    assert length_pool(64, 16) == scale_trace(reqs, max_prompt_tokens=64, max_output_tokens=16)


def test_a_trace_path_replaces_the_shipped_one(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2024-01-01 00:00:00,10,2\n2024-01-01 00:00:01,20,4\n")
    assert [r.prompt_tokens for r in length_pool(20, 4, path)] == [10, 20]
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.csv")
    path.write_text("when,prompt\n1,2\n")
    with pytest.raises(ValueError, match="not a trace CSV"):
        load_trace(path)
def test_requests_become_jsonl_pieces_that_parse_back():
    from client.jobs import request_chunks
    from client.types import BatchRequest, ChatMessage

    requests = [
        "plain prompt",
        {"id": "d", "token_ids": [1, 2], "max_tokens": 3},
        BatchRequest(id="b", messages=(ChatMessage("user", "hi"),),
                     sampling=SamplingParams(max_tokens=5, stop=("x",), seed=9)),
    ] * 40
    pieces = list(request_chunks(requests, size=256))
    assert len(pieces) > 1 and all(p.endswith(b"\n") for p in pieces)
    lines = b"".join(pieces).decode().splitlines()
    parsed = [parse_request(json.loads(line), i) for i, line in enumerate(lines)]
    assert len(parsed) == 120
    assert parsed[0].prompt == "plain prompt" and parsed[0].id == "0"
    assert parsed[1].token_ids == (1, 2) and parsed[1].sampling.max_tokens == 3
    assert parsed[2] == requests[2]


def test_completion_windows_and_the_quiet_progress_bar():
    from client.batch_io import parse_window, upload_progress

    assert parse_window("2h") == 7200 and parse_window("1.5d") == 129600
    for bad in ("soon", "-1h", "0"):
        with pytest.raises(ValueError, match="completion window"):
            parse_window(bad)
    on_progress, close = upload_progress(100)  # stderr is not a terminal under pytest
    assert on_progress is None
    close()


def test_openai_lines_for_dropped_and_failed_requests():
    from client.errors import error_from_status
    from client.jobs import openai_line
    from client.types import BatchResult, FinishReason, Timing, Usage

    def result(code, tokens=()):
        return BatchResult(4, "c4", "", tokens, FinishReason.CANCELLED, Usage(), Timing(),
                           error_from_status(code, "why"), url="/v1/completions")

    expired = openai_line("j", result(4))  # DEADLINE_EXCEEDED
    assert expired == {"id": "batch_req_j-4", "custom_id": "c4", "response": None,
                       "error": {"code": "batch_expired", "message": "why"}}
    assert openai_line("j", result(1))["error"]["code"] == "batch_cancelled"
    engine = openai_line("j", result(13))  # INTERNAL
    assert engine["response"]["status_code"] == 500 and engine["error"] is None
    assert engine["response"]["body"]["error"]["type"] == "server_error"
