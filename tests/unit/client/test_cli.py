"""``python -m client`` commands run against a live server through ``main([...])``."""

from __future__ import annotations

import json

import pytest

from client import Client, SamplingParams
from client.bench.command import TraceLoad
from client.cli import main
from tests.terminal import on_terminal

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def server(tiny_engine):
    from server.app import serve_in_thread
    from server.config import ServerConfig

    thread = serve_in_thread(ServerConfig(engine=str(tiny_engine), port=0, metrics_port=-1))
    yield thread
    thread.stop(grace_s=1.0)


def test_generate_streams_the_completion(server, capsys):
    rc = main(["generate", "--target", server.address, "hello", "--raw", "--max-tokens", "6",
               "--temperature", "0", "--usage"])
    out, err = capsys.readouterr()
    assert rc == 0
    with Client(server.address) as client:
        expected = client.complete("hello", sampling=SamplingParams(max_tokens=6, temperature=0))
    assert out == expected.text + "\n"
    assert f"completion {len(expected.token_ids)} tokens" in err


def test_generate_applies_the_chat_template_by_default(server, capsys):
    assert main(["generate", "--target", server.address, "hello", "--max-tokens", "6",
                 "--temperature", "0"]) == 0
    greedy = SamplingParams(max_tokens=6, temperature=0)
    with Client(server.address) as client:
        assert client.list_models()[0].has_chat_template  # the tiny engine has ChatML
        chat = client.complete(messages=[{"role": "user", "content": "hello"}], sampling=greedy)
    out = capsys.readouterr().out
    assert out == chat.text + "\n"


def test_generate_chat_and_bad_input(server, capsys):
    assert main(["generate", "--target", server.address, "hi", "--chat", "--max-tokens", "3"]) == 0
    assert main(["generate", "--target", server.address, "hi", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_batch_submit_status_results(server, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(line)
            for line in [
                {"id": "x", "prompt": "one", "max_tokens": 4},
                {"id": "y", "token_ids": [4, 5, 6], "max_tokens": 3},
            ]
        )
        + "\n"
    )
    assert main(["batch", "submit", str(path), "--target", server.address, "--wait",
                 "--interval", "0.05"]) == 0
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0]
    assert json.loads(out.splitlines()[-1])["state"] == "completed"
    assert err == ""  # no progress bar when stderr is not a terminal

    assert main(["batch", "status", job_id, "--target", server.address]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["id"] == job_id and status["completed"] == 2

    assert main(["batch", "results", job_id, "--target", server.address]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in results] == ["x", "y"]
    assert [len(r["token_ids"]) for r in results] == [
        r["usage"]["completion_tokens"] for r in results
    ]

    assert main(["batch", "status", "nope", "--target", server.address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_batch_wait_draws_a_progress_bar_on_a_terminal(server, tmp_path, capsys, monkeypatch):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "max_tokens": 2}) + "\n"
                            for i in range(3)))
    terminal = on_terminal(monkeypatch)
    assert main(["batch", "submit", str(path), "--target", server.address, "--wait",
                 "--interval", "0.05"]) == 0
    bar = terminal.getvalue()
    assert "3/3" in bar and "completed" in bar and "tokens" in bar
    job_id = capsys.readouterr().out.splitlines()[0]
    assert main(["batch", "results", job_id, "--target", server.address]) == 0
    assert "3/3" in terminal.getvalue()[len(bar):]
    assert len(capsys.readouterr().out.splitlines()) == 3  # results stay on stdout


def test_batch_submit_rejects_a_malformed_file(server, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "promt": "typo"}\n')
    assert main(["batch", "submit", str(path), "--target", server.address]) == 2
    assert "promt" in capsys.readouterr().err


def test_tiny_bench_writes_figures(server, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--target", server.address, "--duration", "2", "--trace-rate", "20",
               "--max-prompt-tokens", "16", "--max-output-tokens", "4", "--offline-backlog", "64",
               "--offline-output-tokens", "400",
               "--json-out", str(out_json)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "online" in table and "offline" in table
    run = json.loads(out_json.read_text())["runs"][0]
    arrivals = TraceLoad(duration_s=2, max_prompt_tokens=16, max_output_tokens=4, rate=20)
    assert run["tiers"]["online"]["requests"] == len(arrivals.arrivals()) > 0
    assert run["tiers"]["online"]["errors"] == 0
    assert run["tiers"]["offline"]["tokens"] > 0
    assert run["occupancy"] is not None and 0 < run["occupancy"] <= 1
    assert run["cost_per_million_tokens"] > 0


def test_bench_replays_the_trace_given(server, tmp_path, capsys):
    path = tmp_path / "mine.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2024-01-01 00:00:{i:02d}.25,{5 + i},2\n" for i in range(30)))
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--target", server.address, "--trace", str(path), "--duration", "1",
                 "--time-scale", "10", "--max-prompt-tokens", "16", "--max-output-tokens", "2",
                 "--json-out", str(out_json)]) == 0
    run = json.loads(out_json.read_text())["runs"][0]
    assert run["tiers"]["online"]["requests"] == 10  # 30 rows a second apart, 10x, for 1 s
    assert main(["bench", "--target", server.address, "--trace", str(tmp_path / "nope.csv"),
                 "--duration", "1"]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_bench_concurrency_sweep(server, capsys):
    rc = main(["bench", "--target", server.address, "--duration", "1", "--concurrency", "1,4",
               "--max-prompt-tokens", "8", "--max-output-tokens", "2"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "concurrency=1" in table and "concurrency=4" in table


def test_models_and_stats(server, capsys):
    assert main(["models", "--target", server.address]) == 0
    out = capsys.readouterr().out
    assert "backend=cpu" in out and "chat_template=yes" in out
    assert main(["stats", "--target", server.address]) == 0
    assert "slots" in capsys.readouterr().out
