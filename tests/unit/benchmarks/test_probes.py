"""The README's probe table: every probe gets the status it should, and the server still
serves after each (benchmarks/probes.py against a server with TLS, mTLS, keys and quotas)."""

from __future__ import annotations

import pytest

from benchmarks import probes

pytestmark = pytest.mark.unit


async def test_every_probe_gets_its_status_and_the_server_keeps_serving() -> None:
    rows = {name: (got, serving) for name, _, got, serving in await probes.run()}
    assert all(serving in ("yes", "(stopped)") for _, serving in rows.values()), rows
    expect = {
        "plaintext client (no TLS)": "UNAVAILABLE",
        "no credentials": "UNAUTHENTICATED; HTTP 401",
        "tenant B streams tenant A's results": "NOT_FOUND",
        "tenant B lists jobs": "0 of A's jobs listed",
        "tenant B cancels tenant A's job": "NOT_FOUND; A: 200/200 completed",
        "tenant B claims to be tenant A": "PERMISSION_DENIED",
        "ttft_deadline of 2^62 s; nanos out of range": "INVALID_ARGUMENT, INVALID_ARGUMENT",
        "duplicate client_request_id in a Session": "INVALID_ARGUMENT; its last message",
        "wrong API key": "UNAUTHENTICATED; HTTP 401",
        "expired client certificate": "UNAVAILABLE",
        "client without a certificate under mTLS": "UNAVAILABLE",
    }
    for name, got in expect.items():
        assert rows[name][0] == got, (name, rows[name])
    assert rows["three 3.9 MB prompts at once"][0].startswith("INVALID_ARGUMENT;")
    assert rows["labels of 3 MB on a job"][0].startswith("INVALID_ARGUMENT;")
    assert rows["tenant over its online quota (2 in flight)"][0].startswith(
        "RESOURCE_EXHAUSTED (tenant 'b' is at its max_online_requests); HTTP 429")
    drained = rows["SIGTERM drain with an offline backlog queued"][0]
    assert int(drained.split()[0]) <= 8  # at most one pass's admissions, already under way


def test_the_fair_share_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_fairshare

    assert bench_fairshare.main(["--backlog", "300", "--small", "4", "--trials", "1",
                                 "--step-ms", "1", "--queues", "fair"]) == 0
    out = capsys.readouterr().out
    assert "B alone on an idle offline tier" in out and "fair " in out
