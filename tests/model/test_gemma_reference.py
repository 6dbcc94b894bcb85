"""Gemma 3 270M against an independent reference: Hugging Face transformers loading the same
GGUF file with its own reader, dequantizer and Gemma 3 implementation. Greedy continuations of
the prompts (two past the sliding window) must be identical token for token, and the prompts
tokenized identically. Skipped where transformers (``pip install 'backfill[reference]'``) is
not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_builder.fetch import GEMMA3_270M
from tests.model.gemma_prompts import MAX_TOKENS, PROMPTS
from tests.model.test_gemma_engine import greedy

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch", reason="the reference needs torch")
transformers = pytest.importorskip("transformers", reason="the reference is transformers")
pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate")


def test_greedy_continuations_match_transformers_on_the_same_gguf(gemma_engine: Path) -> None:
    prompts, _ = greedy(gemma_engine, PROMPTS)
    path = GEMMA3_270M.path()
    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                           gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ex_tokens = _engine_tokens(gemma_engine, prompts)
    for text, ids, ours in zip(PROMPTS, prompts, ex_tokens, strict=True):
        assert tokenizer(text).input_ids == list(ids)
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, do_sample=False)
        assert out[0, len(ids):].tolist() == ours, text[:40]


def _engine_tokens(engine: Path, prompts: list[tuple[int, ...]]) -> list[list[int]]:
    from server.executor.base import ExecRequest, SamplingParams
    from server.executor.cpu import CpuExecutor
    from server.executor.cpu.drive import collect

    ex = CpuExecutor.open(engine)
    try:
        requests = [ExecRequest(i, ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
                    for i, ids in enumerate(prompts)]
        out = collect(ex, requests)
    finally:
        ex.shutdown()
    return [list(out[i].token_ids) for i in range(len(prompts))]
