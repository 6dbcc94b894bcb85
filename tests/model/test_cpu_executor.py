"""The CPU executor on the real default engine (SmolLM2-135M-Instruct): short and few requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.executor.base import ExecRequest, FinishReason, SamplingParams
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import collect

pytestmark = pytest.mark.model
FRANCE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def executor(default_engine: Path) -> Iterator[CpuExecutor]:
    ex = CpuExecutor.open(default_engine)
    yield ex
    ex.shutdown()


def test_greedy_answers_paris_then_im_end(executor: CpuExecutor) -> None:
    tok = executor.tokenizer
    prompt = tuple(tok.encode(FRANCE))
    got = collect(executor, [ExecRequest(1, prompt, SamplingParams(max_tokens=16))])[1]
    assert got.text == "The capital of France is Paris."
    assert got.finish is FinishReason.STOP
    im_end = tok.token_to_id("<|im_end|>")
    assert got.token_ids[-1] == im_end and im_end in tok.eos_token_ids
    # The streamed text is exactly the decoding of the streamed ids (the stop id has no text).
    assert tok.decode(got.token_ids[:-1]) == got.text
    # A second run, batched with another request, reproduces the same ids.
    other = ExecRequest(3, tuple(tok.encode("<|im_start|>user\nHi<|im_end|>\n")),
                        SamplingParams(max_tokens=8))
    again = collect(executor, [ExecRequest(2, prompt, SamplingParams(max_tokens=16)), other])
    assert again[2].token_ids == got.token_ids
    assert again[2].cached_prompt_tokens == 16 * ((len(prompt) - 1) // 16)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_default_engines_generate(quant: str) -> None:
    from engine_builder.default import ensure_default_engine

    ex = CpuExecutor.open(ensure_default_engine(quant=quant))
    try:
        tok = ex.tokenizer
        request = ExecRequest(1, tuple(tok.encode(FRANCE)), SamplingParams(max_tokens=8))
        got = collect(ex, [request], timeout=120)[1]
        assert got.finish in (FinishReason.STOP, FinishReason.LENGTH)
        assert len(got.token_ids) >= 3
        assert "Paris" in got.text or "capital" in got.text
    finally:
        ex.shutdown()


def test_ngram_speculation_copies_a_passage_with_the_same_tokens(executor: CpuExecutor) -> None:
    """The copy-heavy case speculative decoding is for: the answer repeats the prompt, n-gram
    lookup drafts it, most drafts are kept, and the output is plain greedy decoding's."""
    from benchmarks.copy_prompts import COPY_PROMPTS
    from server.executor.base import StepPlan

    tok = executor.tokenizer
    text = dict(COPY_PROMPTS)["repeat"]
    prompt = tuple(tok.encode_chat([{"role": "user", "content": text}],
                                   add_generation_prompt=True))
    plain = collect(executor, [ExecRequest(11, prompt, SamplingParams(max_tokens=48,
                                                                      num_speculative_tokens=0))])
    executor.set_plan(StepPlan(draft_lens={12: 8}))
    spec = collect(executor, [ExecRequest(12, prompt, SamplingParams(max_tokens=48))])
    executor.set_plan(StepPlan())
    assert spec[12].token_ids == plain[11].token_ids
    assert spec[12].text.startswith("The lighthouse keeper climbed the spiral stairs")
    stats = executor.stats()
    assert stats.draft_tokens_accepted > 0.6 * stats.draft_tokens_proposed > 0
