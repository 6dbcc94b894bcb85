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
def server(tiny_engine, tmp_path_factory):
    from server.app import serve_in_thread
    from server.config import ServerConfig

    store = tmp_path_factory.mktemp("jobs") / "jobs.db"
    thread = serve_in_thread(ServerConfig(engine=str(tiny_engine), port=0, metrics_port=-1,
                                          job_store=str(store)))
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


def test_batch_submit_fails_bad_lines_alone(server, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "promt": "typo"}\n{"id": "b", "prompt": "fine", '
                    '"max_tokens": 2}\n')
    assert main(["batch", "submit", str(path), "--target", server.address, "--wait",
                 "--interval", "0.05"]) == 0
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0]
    assert "1 of 2 requests failed validation" in err
    assert main(["batch", "results", job_id, "--target", server.address]) == 0
    bad, good = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "line 1: unknown keys ['promt']" in bad["error"]["message"]
    assert good["id"] == "b" and "error" not in good

    path.write_text('{"id": "a", "promt": "typo"}\n')
    assert main(["batch", "submit", str(path), "--target", server.address]) == 1
    assert "the job failed" in capsys.readouterr().err


def test_openai_file_results_to_output_and_error_files_resumably(server, tmp_path, capsys):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "auto", "prompt": f"count {i}", "max_tokens": 2}}
             for i in range(6)]
    lines[3]["body"]["n"] = 3  # fails: one completion per line
    path = tmp_path / "openai.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    target = ["--target", server.address, "--tenant", "team-a"]
    assert main(["batch", "submit", str(path), *target, "--wait", "--interval", "0.05",
                 "--completion-window", "2h"]) == 0
    job_id = capsys.readouterr().out.splitlines()[0]
    assert main(["batch", "status", job_id, "--target", server.address]) == 1  # another tenant
    assert "NOT_FOUND" in capsys.readouterr().err

    output = tmp_path / "out.jsonl"
    assert main(["batch", "results", job_id, *target, "--output", str(output)]) == 0
    errors = tmp_path / "out.errors.jsonl"
    ok = [json.loads(line) for line in output.read_text().splitlines()]
    failed = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [line["custom_id"] for line in ok] == ["c0", "c1", "c2", "c4", "c5"]
    assert all(line["response"]["body"]["object"] == "text_completion" for line in ok)
    assert [line["custom_id"] for line in failed] == ["c3"]
    assert failed[0]["response"]["status_code"] == 400
    assert "body.n" in failed[0]["response"]["body"]["error"]["message"]

    # Interrupted mid-line after c1: the cut line is dropped and the rest fetched again.
    text = output.read_text().splitlines(keepends=True)
    output.write_text("".join(text[:2]) + text[2][:10])
    errors.write_text("")
    assert main(["batch", "results", job_id, *target, "--output", str(output)]) == 0
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == [
        "c0", "c1", "c2", "c4", "c5"]
    assert len(errors.read_text().splitlines()) == 1
    # A file holding another job's results is refused.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "batch_req_someotherjob-0", "custom_id": "x"}) + "\n")
    assert main(["batch", "results", job_id, *target, "--output", str(other)]) == 2
    assert "not the first results of job" in capsys.readouterr().err


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
