"""``python -m client generate``'s defaults against a scripted server: chat messages when the
model has a chat template (``--raw`` sends text as is), and a word on stderr when a request
ends without text."""

from __future__ import annotations

import pytest

from backfill.v1 import inference_pb2 as pb
from client.cli import main
from tests.unit.client.fake_service import FakeServer, FakeService

pytestmark = pytest.mark.unit

INSTRUCT = pb.ModelInfo(name="instruct", has_chat_template=True)
BASE = pb.ModelInfo(name="base", has_chat_template=False)


@pytest.fixture(scope="module")
def fake():
    server = FakeServer(FakeService(models=(INSTRUCT, BASE)))
    yield server
    server.stop()


def sent(fake: FakeServer, *args: str) -> pb.GenerateRequest:
    before = len(fake.service.requests)
    assert main(["generate", "--target", fake.address, "--max-tokens", "2", *args]) == 0
    (request,) = fake.service.requests[before:]
    return request


def test_a_model_with_a_chat_template_gets_chat_messages_by_default(fake) -> None:
    request = sent(fake, "What is the capital of France?")  # the default model: the first
    assert request.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [
        (pb.ROLE_USER, "What is the capital of France?")]
    assert sent(fake, "--model", "instruct", "hi").WhichOneof("prompt") == "chat"


def test_raw_sends_text_as_is(fake) -> None:
    request = sent(fake, "--raw", "Once upon a time")
    assert request.WhichOneof("prompt") == "text" and request.text == "Once upon a time"


def test_a_model_without_a_chat_template_gets_text(fake) -> None:
    assert sent(fake, "--model", "base", "hi").WhichOneof("prompt") == "text"


def test_chat_and_system_still_ask_for_chat(fake) -> None:
    assert sent(fake, "--model", "base", "--chat", "hi").WhichOneof("prompt") == "chat"
    request = sent(fake, "--model", "base", "--system", "Be brief.", "hi")
    assert [m.role for m in request.chat.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]


def test_raw_and_chat_conflict(fake, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--target", fake.address, "--raw", "--chat", "hi"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_no_text_says_why_on_stderr(fake, capsys) -> None:
    assert main(["generate", "--target", fake.address, "--raw", "empty"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n"
    assert "(no text: finish reason stop" in err and "completion 0 tokens" in err


def test_text_leaves_stderr_quiet(fake, capsys) -> None:
    assert main(["generate", "--target", fake.address, "--raw", "hello"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and err == ""
