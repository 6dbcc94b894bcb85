"""Token sampling and stop handling of the CPU executor, without a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import FinishReason, SamplingParams
from server.executor.cpu.sampling import sample_token
from server.executor.cpu.stops import OutputTracker

pytestmark = pytest.mark.unit
LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def _draws(params: SamplingParams, n: int = 3000, logits: np.ndarray = LOGITS) -> np.ndarray:
    return np.array([sample_token(logits, params, seed=42, index=i) for i in range(n)])


def test_greedy_is_argmax_and_respects_banned_ids() -> None:
    logits = np.array([0.1, 3.0, 2.0, -1.0], dtype=np.float32)
    assert sample_token(logits, SamplingParams(), 0, 0) == 1
    assert sample_token(logits, SamplingParams(), 0, 0, banned={1}) == 2


def test_temperature_sampling_follows_the_softmax() -> None:
    freq = np.bincount(_draws(SamplingParams(temperature=1.0)), minlength=4) / 3000
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)
    sharp = np.bincount(_draws(SamplingParams(temperature=0.5)), minlength=4) / 3000
    assert sharp[0] > freq[0] + 0.1  # lower temperature concentrates mass on the best token


def test_top_k_and_top_p_truncate_the_candidates() -> None:
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2)).tolist()) == {0, 1}
    # 0.5 + 0.3 reaches 0.7: the two best survive, renormalized to 5/8 and 3/8.
    top_p = _draws(SamplingParams(temperature=1.0, top_p=0.7))
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).mean() - 0.625) < 0.04
    assert set(_draws(SamplingParams(temperature=2.0, top_p=0.01), n=200).tolist()) == {0}


def test_draws_depend_only_on_seed_and_index() -> None:
    params = SamplingParams(temperature=1.0)
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    first = [sample_token(logits, params, seed=7, index=i) for i in range(50)]
    again = [sample_token(logits, params, seed=7, index=i) for i in range(50)]
    other = [sample_token(logits, params, seed=8, index=i) for i in range(50)]
    assert first == again and first != other
    assert len(set(first)) > 10


@pytest.fixture(scope="module")
def tokenizer(tiny_engine: Path) -> EngineTokenizer:
    return EngineTokenizer.load(tiny_engine, Manifest.load(tiny_engine))


def _run(tracker: OutputTracker, ids: list[int]) -> tuple[list[str], FinishReason | None, int]:
    """Pushes ids until a finish; returns the text chunks, the finish and ids consumed."""
    chunks = []
    for n, token in enumerate(ids, 1):
        text, finish = tracker.push(token)
        chunks.append(text)
        if finish is not None:
            return chunks, finish, n
    return chunks, None, len(ids)


def test_stop_string_spanning_tokens_is_cut_and_never_leaked(tokenizer: EngineTokenizer) -> None:
    ids = tokenizer.encode("the capital of France is Paris")
    params = SamplingParams(stop=("of Fr",), max_tokens=100)
    chunks, finish, _ = _run(OutputTracker(params, tokenizer, [5], 0), ids)
    assert finish is FinishReason.STOP
    assert "".join(chunks) == "the capital "
    assert all("o" not in c for c in chunks)  # the held-back "o" never went out


def test_partial_stop_match_is_released_when_it_fails(tokenizer: EngineTokenizer) -> None:
    ids = tokenizer.encode("is it this")
    params = SamplingParams(stop=("is x",), max_tokens=len(ids))
    chunks, finish, _ = _run(OutputTracker(params, tokenizer, [5], 0), ids)
    assert finish is FinishReason.LENGTH
    assert "".join(chunks) == "is it this"


def test_min_tokens_ignores_stops_and_max_tokens_counts_resumed(
    tokenizer: EngineTokenizer,
) -> None:
    eos = tokenizer.eos_token_ids[0]
    params = SamplingParams(min_tokens=2, max_tokens=5)
    tracker = OutputTracker(params, tokenizer, [5, 6], num_resumed=1)
    assert eos in tracker.banned_ids()
    assert tracker.push(eos)[1] is None  # generated #2 (one resumed): still below min_tokens
    assert tracker.banned_ids() == frozenset()
    assert tracker.push(eos)[1] is FinishReason.STOP
    resumed = OutputTracker(SamplingParams(max_tokens=5), tokenizer, [5, 6, 7], num_resumed=3)
    _, finish, consumed = _run(resumed, tokenizer.encode("abcdefgh"))
    assert finish is FinishReason.LENGTH and consumed == 2


def test_utf8_split_across_tokens_is_emitted_whole(tokenizer: EngineTokenizer) -> None:
    ids = tokenizer.encode("a你b😀")
    assert len(ids) > 4  # the multi-byte characters really are split over several ids
    chunks, _, _ = _run(OutputTracker(SamplingParams(max_tokens=50), tokenizer, [5], 0), ids)
    assert "".join(chunks) == "a你b😀"
    assert all("\ufffd" not in c for c in chunks)
