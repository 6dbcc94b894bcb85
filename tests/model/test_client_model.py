"""The SDK and CLI on the real default engine (SmolLM2-135M-Instruct, CPU)."""

from __future__ import annotations

import pytest

from client import AsyncClient, Client, FinishReason, SamplingParams
from client.cli import main

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def server(default_engine, tmp_path_factory):
    from server.app import serve_in_thread
    from server.config import ServerConfig

    store = tmp_path_factory.mktemp("jobs") / "jobs.db"
    thread = serve_in_thread(ServerConfig(engine=str(default_engine), port=0, metrics_port=-1,
                                          job_store=str(store)))
    yield thread
    thread.stop(grace_s=1.0)


def test_chat_answer_through_the_sync_client(server):
    with Client(server.address) as client:
        done = client.complete(messages=QUESTION, sampling=GREEDY)
    assert done.text.strip() == "The capital of France is Paris."
    assert done.finish_reason is FinishReason.STOP
    assert done.usage.completion_tokens == len(done.token_ids)


async def test_streamed_text_matches_and_never_splits_characters(server):
    async with AsyncClient(server.address) as client:
        chunks = [c async for c in client.generate(messages=QUESTION, sampling=GREEDY)]
        done = await client.complete(messages=QUESTION, sampling=GREEDY)
    assert "".join(c.text for c in chunks) == done.text
    assert all("\ufffd" not in c.text for c in chunks)


def test_cli_generate_answers_a_question_by_default(server, capsys):
    """The instruct model gets its chat template without being asked; raw text, which it
    answers with an immediate end of turn, is still there with --raw."""
    question = "What is the capital of France?"
    args = ["generate", "--target", server.address, "--temperature", "0", "--max-tokens", "24"]
    assert main([*args, question]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and err == ""
    assert main([*args, "--raw", question]) == 0
    out, err = capsys.readouterr()
    assert out == "\n"  # the end-of-turn token has no text
    assert "(no text: finish reason stop" in err and "completion 1 token" in err


def test_cli_generate_chat(server, capsys):
    rc = main(["generate", "--target", server.address, "--chat", "--temperature", "0",
               "--max-tokens", "24", "What is the capital of France?"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out
