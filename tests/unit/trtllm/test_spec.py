"""Draft-target speculative decoding over two fake engines: exact target output, acceptance
counting, request shapes, cancel, errors."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, FinishReason, SamplingParams, TokenDelta
from server.executor.factory import load_executor
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.spec import SpeculativeExecutor
from tests.unit.trtllm.conftest import make_engine_dir
from tests.unit.trtllm.fake_model import FakeModel
from tests.unit.trtllm.helpers import (
    collect,
    expected_tokens,
    open_fake_engine,
    text_of,
    tokens_of,
)

pytestmark = pytest.mark.unit

PROMPT = (104, 105, 32, 116, 104, 101, 114, 101)
TARGET = FakeModel(vocab_size=257)
K = 4


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture
def spec(bindings: Any, tmp_path: Path) -> Any:
    made: list[SpeculativeExecutor] = []

    def _open(draft_fake: dict[str, Any] | None = None, target_fake: dict[str, Any] | None = None,
              **kw: Any) -> tuple[SpeculativeExecutor, Any, Any]:
        root = make_engine_dir(tmp_path / f"e{len(made)}", fake=target_fake,
                               draft_fake=draft_fake or {}, max_draft_len=K, **kw)
        manifest = Manifest.load(root)
        cfg = TrtllmConfig(await_timeout_s=0.005)
        target = open_fake_engine(bindings, root, cfg, 0.5)
        draft = open_fake_engine(bindings, root / "draft", cfg, 0.5)
        ex = SpeculativeExecutor(target, draft, bindings, EngineTokenizer.load(root, manifest),
                                 manifest, cfg)
        made.append(ex)
        return ex, target, draft

    yield _open
    for ex in made:
        ex.shutdown()


def test_output_is_exactly_the_targets_and_acceptance_is_counted(spec: Any) -> None:
    ex, target, draft = spec(draft_fake={"perturb_every": 3})
    ex.enqueue(ExecRequest(1, PROMPT, greedy(30)))
    deltas = collect(ex, [1])[1]
    want = expected_tokens(TARGET, PROMPT, 30)
    assert tokens_of(deltas) == want
    assert text_of(deltas) == bytes(want).decode()
    assert deltas[-1].finish is FinishReason.LENGTH
    proposed = sum(d.draft_tokens_proposed for d in deltas)
    accepted = sum(d.draft_tokens_accepted for d in deltas)
    assert 0 < accepted < proposed  # the perturbed draft is sometimes wrong
    stats = ex.stats()
    assert (stats.draft_tokens_proposed, stats.draft_tokens_accepted) == (proposed, accepted)
    assert stats.generated_tokens == 30
    for request in target.enqueued:
        cfg = request.external_draft_tokens_config
        n = 0 if cfg is None else len(cfg.tokens)
        assert n <= K and request.max_tokens == n + 1
        assert request.streaming is False
    assert all(not r.streaming and r.max_tokens <= K for r in draft.enqueued)
    # each step's target input is the previous context plus the accepted tokens
    inputs = [r.input_token_ids for r in target.enqueued]
    assert inputs[0] == list(PROMPT)
    assert all(len(b) > len(a) and b[:len(a)] == a for a, b in itertools.pairwise(inputs))


def test_a_perfect_draft_is_always_accepted(spec: Any) -> None:
    ex, target, _ = spec()
    ex.enqueue(ExecRequest(1, PROMPT, greedy(20)))
    deltas = collect(ex, [1])[1]
    assert tokens_of(deltas) == expected_tokens(TARGET, PROMPT, 20)
    proposed = sum(d.draft_tokens_proposed for d in deltas)
    assert sum(d.draft_tokens_accepted for d in deltas) == proposed > 0
    assert len(target.enqueued) == 4  # 20 tokens in steps of K + 1 = 5


def test_eos_and_stop_strings_end_a_speculative_sequence(spec: Any) -> None:
    ex, _, _ = spec(draft_fake={"perturb_every": 4}, target_fake={"eos_every": 23})
    want = expected_tokens(FakeModel(vocab_size=257, eos_every=23), PROMPT, 40)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(40)))
    text = bytes(want).decode()
    ex.enqueue(ExecRequest(2, PROMPT, greedy(40, stop=(text[6:8],))))
    out = collect(ex, [1, 2])
    assert tokens_of(out[1]) == want and out[1][-1].finish is FinishReason.STOP
    assert text_of(out[2]) == text[:text.index(text[6:8])]
    assert out[2][-1].finish is FinishReason.STOP


def test_cancel_ends_once_with_cancelled(spec: Any) -> None:
    ex, _, _ = spec(draft_fake={"perturb_every": 2})
    ex.enqueue(ExecRequest(1, PROMPT, greedy(100)))
    first: list[TokenDelta] = []
    while not first:
        first = [d for d in ex.poll(0.05) if d.request_id == 1]
    ex.cancel(1)
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.CANCELLED
    assert len(tokens_of(first + deltas)) < 100


def test_target_without_draft_support_fails_the_request(spec: Any) -> None:
    ex, _, _ = spec(target_max_draft_len=0)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(10)))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.ERROR
    assert "exceeds maximum draft tokens length (0)" in (deltas[-1].error or "")


def test_factory_opens_the_draft_target_executor(bindings: Any, tmp_path: Path) -> None:
    root = make_engine_dir(tmp_path, draft_fake={"perturb_every": 3}, max_draft_len=K,
                           fake={"num_blocks": 24})
    ex = load_executor(root)
    try:
        assert isinstance(ex, SpeculativeExecutor)
        assert ex.capacity.num_kv_blocks == 24
        ex.enqueue(ExecRequest(7, PROMPT, greedy(9), resume_token_ids=(97,)))
        out = tokens_of(collect(ex, [7])[7])
        assert out == expected_tokens(TARGET, (*PROMPT, 97), 8)
    finally:
        ex.shutdown()


def test_a_cancel_reaches_the_engine_that_holds_the_step(spec: Any) -> None:
    """Both engines number requests from 1: the cancel must pick the engine, not just the id."""
    ex, target, draft = spec()
    target.pause()  # request 1 (one token: the target alone) stays on the target as id 1
    ex.enqueue(ExecRequest(1, PROMPT, greedy(1)))
    draft.pause()  # request 2 starts on the draft, also as id 1
    ex.enqueue(ExecRequest(2, PROMPT, greedy(20)))
    assert [r.max_tokens for r in target.enqueued] == [1] and len(draft.enqueued) == 1
    ex.cancel(2)
    assert (draft.cancel_calls, target.cancel_calls) == ([1], [])
    target.resume()
    draft.resume()
    out = collect(ex, [1, 2])
    assert out[2] == [out[2][-1]] and out[2][-1].finish is FinishReason.CANCELLED
    assert out[1][-1].finish is FinishReason.LENGTH
    assert tokens_of(out[1]) == expected_tokens(TARGET, PROMPT, 1)


def test_the_end_of_the_sequence_never_resubmits_forever(spec: Any) -> None:
    """validate() reserves the built max_draft_len for a request without draft tokens: with
    one token of room left that reservation leaves nothing, so the sequence ends there."""
    ex, target, _ = spec(draft_fake={"perturb_every": 3}, max_seq_len=40)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(100)))
    deltas = collect(ex, [1], timeout=5)[1]
    assert deltas[-1].finish is FinishReason.LENGTH
    assert tokens_of(deltas) == expected_tokens(TARGET, PROMPT, 40 - 1 - len(PROMPT))
    for request in target.enqueued:  # every step fit without the engine clamping it
        cfg = request.external_draft_tokens_config
        drafts = len(cfg.tokens) if cfg is not None else K
        assert len(request.input_token_ids) + request.max_tokens + drafts <= 40
