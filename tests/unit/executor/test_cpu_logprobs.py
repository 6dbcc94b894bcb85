"""Logprobs, prompt logprobs, penalties and same-prompt KV sharing in the CPU executor (tiny
engine), checked against a textbook forward of the same weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from server.executor.base import ExecRequest, SamplingParams
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import collect
from server.executor.cpu.sampling import apply_penalties
from tests.unit.executor.test_cpu_model import _reference_logits

pytestmark = pytest.mark.unit
PROMPT = tuple(int(t) for t in np.random.default_rng(3).integers(3, 290, size=37))


@pytest.fixture
def executor(tiny_engine: Path) -> Iterator[CpuExecutor]:
    ex = CpuExecutor.open(tiny_engine)
    yield ex
    ex.shutdown()


def _reference_logprobs(engine: Path, tokens: list[int]) -> np.ndarray:
    logits = _reference_logits(engine, tokens)  # [n, vocab] float64
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _req(rid: int, prompt: tuple[int, ...] = PROMPT, **sampling: object) -> ExecRequest:
    params = {"max_tokens": 6, "ignore_eos": True, **sampling}
    return ExecRequest(rid, prompt, SamplingParams(**params))  # type: ignore[arg-type]


def test_generated_logprobs_match_a_reference_forward(
    tiny_engine: Path, executor: CpuExecutor
) -> None:
    out = collect(executor, [_req(1, logprobs=5, temperature=0.8, seed=4)])[1]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    ref = _reference_logprobs(tiny_engine, [*PROMPT, *out.token_ids])
    for i, lp in enumerate(out.logprobs):
        row = ref[len(PROMPT) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id], abs=1e-4)
        best = np.argsort(-row, kind="stable")[:5]
        assert [t for t, _ in lp.top] == list(best)
        np.testing.assert_allclose([v for _, v in lp.top], row[best], atol=1e-4)


def test_prompt_logprobs_cover_every_prompt_token_even_when_cached(
    tiny_engine: Path, executor: CpuExecutor
) -> None:
    warm = collect(executor, [_req(1)])[1]  # puts the prompt's blocks in the prefix cache
    scored = collect(executor, [_req(2, prompt_logprobs=3, logprobs=0)])[2]
    assert warm.token_ids == scored.token_ids  # scoring changes nothing about the output
    assert scored.cached_prompt_tokens == 0  # computed whole, not from the cache
    ref = _reference_logprobs(tiny_engine, list(PROMPT))
    assert scored.prompt_logprobs is not None and len(scored.prompt_logprobs) == len(PROMPT) - 1
    for p, lp in enumerate(scored.prompt_logprobs):
        assert lp.token_id == PROMPT[p + 1]
        assert lp.logprob == pytest.approx(ref[p, PROMPT[p + 1]], abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[2][1]
    again = collect(executor, [_req(3)])[3]  # the scored prompt was registered for reuse
    assert again.cached_prompt_tokens == 32


def test_prompt_logprobs_survive_chunked_prefill(tiny_engine_factory: Callable[..., Path]) -> None:
    engine = tiny_engine_factory(max_num_tokens=16)  # the prompt takes three steps
    ex = CpuExecutor.open(engine)
    try:
        out = collect(ex, [_req(1, prompt_logprobs=0)])[1]
    finally:
        ex.shutdown()
    ref = _reference_logprobs(engine, list(PROMPT))
    assert out.prompt_logprobs is not None
    got = [lp.logprob for lp in out.prompt_logprobs]
    np.testing.assert_allclose(got, ref[np.arange(len(PROMPT) - 1), PROMPT[1:]], atol=1e-4)


def test_no_logprobs_unless_asked(executor: CpuExecutor) -> None:
    out = collect(executor, [_req(1)])[1]
    assert out.logprobs is None and out.prompt_logprobs is None


def test_penalties_follow_openai_and_hf_semantics() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    plain = SamplingParams()
    same = logits.copy()
    apply_penalties(same, plain, (0,), (3, 3))
    np.testing.assert_array_equal(same, logits)
    freq = logits.copy()
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(freq, params, (0,), (3, 3, 2))
    np.testing.assert_allclose(freq, [2.0, -1.0, 0.5 - 0.75, 3.0 - 1.0])
    rep = logits.copy()
    apply_penalties(rep, SamplingParams(repetition_penalty=2.0), (0, 1), (3,))
    np.testing.assert_allclose(rep, [1.0, -2.0, 0.5, 1.5])


def test_a_repetition_penalty_changes_greedy_output(executor: CpuExecutor) -> None:
    plain = collect(executor, [_req(1, max_tokens=24)])[1]
    penalized = collect(executor, [_req(2, max_tokens=24, repetition_penalty=1.8,
                                        frequency_penalty=1.0)])[2]
    assert plain.token_ids != penalized.token_ids
    repeats = len(penalized.token_ids) - len(set(penalized.token_ids))
    assert repeats <= len(plain.token_ids) - len(set(plain.token_ids))


def test_same_prompt_choices_compute_the_prompt_once(executor: CpuExecutor) -> None:
    requests = [_req(i, seed=i, temperature=1.0) for i in range(1, 5)]
    before = executor.counters.computed_tokens
    out = collect(executor, requests)
    computed = executor.counters.computed_tokens - before
    assert sorted(o.cached_prompt_tokens or 0 for o in out.values()) == [0, 32, 32, 32]
    # The prompt once, then the uncached tail of each sibling, plus each one's decode steps.
    assert computed == len(PROMPT) + 3 * (len(PROMPT) - 32) + 4 * 5
    executor.check_integrity()
