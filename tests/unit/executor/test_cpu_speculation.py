"""Speculative decoding in the CPU engine, on the tiny model: the output is what plain decoding
gives (greedy token for token; sampled with n-gram drafts token for token per seed; sampled
with draft-model drafts in distribution), verification rides in the regular packed step, and
rejected tokens leave nothing behind in the KV cache or its prefix index."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from engine_builder.manifest import Manifest
from server.executor.base import ExecRequest, FinishReason, SamplingParams, StepPlan, TokenDelta
from server.executor.cpu import verify
from server.executor.cpu.drafter import NgramConfig, ngram_lookup
from server.executor.cpu.engine import CpuEngine
from server.executor.cpu.open import build_engine
from server.executor.cpu.speculation import SpeculationConfig
from tests.stats import homogeneity

pytestmark = pytest.mark.unit

PATTERN = (40, 41, 42, 43, 44, 45, 46, 47)


@dataclass
class Output:
    tokens: list[int] = field(default_factory=list)
    deltas: list[TokenDelta] = field(default_factory=list)
    finish: FinishReason | None = None

    @property
    def proposed(self) -> int:
        return sum(d.draft_tokens_proposed for d in self.deltas)

    @property
    def accepted(self) -> int:
        return sum(d.draft_tokens_accepted for d in self.deltas)


def _engine(path: Path, drafter: str = "ngram") -> CpuEngine:
    return build_engine(path, Manifest.load(path), SpeculationConfig(drafter=drafter))[0]


def _run(engine: CpuEngine, requests: list[ExecRequest], draft_len: int,
         each_step: Callable[[CpuEngine], None] | None = None) -> dict[int, Output]:
    engine.set_plan(StepPlan(draft_lens={r.request_id: draft_len for r in requests}))
    for r in requests:
        engine.add(r, seed=r.request_id if r.sampling.seed is None else r.sampling.seed)
    out: dict[int, Output] = {}
    while engine.has_work:
        engine.step()
        for d in engine.drain():
            o = out.setdefault(d.request_id, Output())
            o.tokens += d.token_ids
            o.deltas.append(d)
            o.finish = d.finish or o.finish
        engine.check_integrity()
        if each_step is not None:
            each_step(engine)
    return out


def _requests(**sampling: object) -> list[ExecRequest]:
    """Prompts that repeat themselves, so that n-gram lookup has something to propose."""
    base: dict[str, object] = {"max_tokens": 40, "ignore_eos": True, **sampling}
    return [ExecRequest(rid, tuple((*PATTERN[rid % 3:], *PATTERN) * 3),
                        SamplingParams(**base)) for rid in range(1, 5)]  # type: ignore[arg-type]


def _tokens(out: dict[int, Output]) -> dict[int, list[int]]:
    return {rid: o.tokens for rid, o in out.items()}


# -- n-gram lookup --------------------------------------------------------------------------------


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match() -> None:
    config = NgramConfig(max_ngram=3, min_ngram=2)
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_lookup(context, 3, config) == (7, 8, 5)  # the latest of two matches
    assert ngram_lookup(context, 1, config) == (7,)
    assert ngram_lookup([5, 6, 7, 5, 6], 4, config) == (7, 5, 6)  # runs up to the end
    assert ngram_lookup([1, 2, 3, 4], 2, config) == ()  # no earlier occurrence
    assert ngram_lookup([4, 1, 2, 3, 9, 2, 3], 2, config) == (9, 2)  # falls back to 2 tokens
    assert ngram_lookup([1, 2, 1, 2], 0, config) == ()


# -- exact output ---------------------------------------------------------------------------------


SAMPLINGS = {
    "greedy": {},
    "stops": {"min_tokens": 12, "ignore_eos": False, "stop": ("ab",)},
    "sampled": {"temperature": 0.9, "top_k": 20, "top_p": 0.95},
}
PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2}


@pytest.mark.parametrize("case", sorted(SAMPLINGS))
def test_ngram_drafts_change_no_token(tiny_engine: Path, case: str) -> None:
    """Greedy requests get the same tokens; sampled ones the same tokens per seed, since a
    deterministic draft is kept exactly when plain sampling would have drawn it."""
    sampling = SAMPLINGS[case]
    plain = _run(_engine(tiny_engine), _requests(**sampling), draft_len=0)
    spec = _run(_engine(tiny_engine), _requests(**sampling), draft_len=4)
    assert _tokens(spec) == _tokens(plain)
    assert [o.finish for o in spec.values()] == [o.finish for o in plain.values()]
    proposed = sum(o.proposed for o in spec.values())
    accepted = sum(o.accepted for o in spec.values())
    assert proposed > 0 and sum(o.proposed for o in plain.values()) == 0
    if case == "greedy":
        assert 0 < accepted < proposed  # both the keeping and the rolling back ran


def test_logprobs_are_those_of_plain_decoding(tiny_engine: Path) -> None:
    plain = _run(_engine(tiny_engine), _requests(logprobs=3), draft_len=0)
    spec = _run(_engine(tiny_engine), _requests(logprobs=3), draft_len=4)
    for rid, o in spec.items():
        got = [lp for d in o.deltas for lp in (d.logprobs or [])]
        want = [lp for d in plain[rid].deltas for lp in (d.logprobs or [])]
        assert [lp.token_id for lp in got] == o.tokens
        np.testing.assert_allclose([lp.logprob for lp in got], [lp.logprob for lp in want],
                                   atol=1e-4)
        assert [[t for t, _ in lp.top] for lp in got] == [[t for t, _ in lp.top] for lp in want]


@pytest.mark.parametrize("case", ["greedy", "penalties", "sampled-penalties"])
def test_a_draft_model_changes_no_greedy_token(
    tiny_engine_factory: Callable[..., Path], case: str
) -> None:
    """Greedy, with penalties and min_tokens: the draft applies them over the tokens it
    drafts as the target does over those it keeps, so the target's own weights as the draft
    have every greedy draft kept; any other draft changes no token."""
    sampling: dict[str, object] = {"min_tokens": 30, "ignore_eos": False}
    if case != "greedy":
        sampling.update(PENALTIES)
    if case == "sampled-penalties":
        sampling.update(temperature=0.8)
    plain = _run(_engine(tiny_engine_factory()), _requests(**sampling), draft_len=0)
    same = _run(_engine(tiny_engine_factory(draft_seed=0), "draft"), _requests(**sampling), 4)
    other = _run(_engine(tiny_engine_factory(draft_seed=1), "draft"), _requests(**sampling), 4)
    if case == "sampled-penalties":  # sampled drafts: the same distribution, not the same draws
        assert all(o.accepted == o.proposed > 0 for o in same.values())
        return
    assert _tokens(same) == _tokens(other) == _tokens(plain)
    assert all(o.accepted == o.proposed > 0 for o in same.values())  # 4 + 1 tokens a step
    assert sum(o.proposed for o in other.values()) > sum(o.accepted for o in other.values())


def test_sampled_draft_model_output_has_the_target_distribution(
    tiny_engine_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two-sample chi-square tests of the second and third tokens (the first verified ones)
    of many seeded runs, with a draft model whose distribution is far from the target's,
    against plain sampling; and the same test catches a verifier that keeps every draft."""
    target = tiny_engine_factory(max_batch_size=200, num_kv_blocks=1024)
    drafted = tiny_engine_factory(max_batch_size=200, num_kv_blocks=1024, draft_seed=1)
    n = 1000
    sampling = {"temperature": 1.0, "top_k": 6, "max_tokens": 4, "ignore_eos": True}

    def positions(path: Path, draft_len: int, first_seed: int) -> list[tuple[int, int]]:
        requests = [ExecRequest(i + 1, (5, 17, 33, 9, 21),
                                SamplingParams(seed=first_seed + i, **sampling))  # type: ignore[arg-type]
                    for i in range(n)]
        out = _run(_engine(path, drafter="auto"), requests, draft_len)
        return [(o.tokens[1], o.tokens[2]) for o in out.values()]

    plain = positions(target, 0, first_seed=0)
    spec = positions(drafted, 3, first_seed=10**6)  # independent draws
    assert homogeneity([p[0] for p in plain], [p[0] for p in spec]) > 1e-3
    assert homogeneity([p[1] for p in plain], [p[1] for p in spec]) > 1e-3

    def keep_every_draft(p: np.ndarray, q: np.ndarray, proposed: int, seed: int,
                         index: int) -> tuple[int, bool]:
        return proposed, True

    monkeypatch.setattr(verify, "judge_sampled", keep_every_draft)
    broken = positions(drafted, 3, first_seed=10**6)
    assert homogeneity([p[0] for p in plain], [p[0] for p in broken]) < 1e-4


# -- the step -------------------------------------------------------------------------------------


def test_verification_rides_in_the_step_and_is_reported_as_it_ran(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    """A speculating sequence's k + 1 positions are one chunk of the packed step, beside a
    sequence that decodes plainly, and the step sample says so."""
    engine = _engine(tiny_engine_factory(draft_seed=0), "draft")
    spec, plain = _requests()[:2]
    engine.add(spec, seed=1)
    engine.add(plain, seed=2)
    engine.step()  # both prefill
    engine.set_plan(StepPlan(draft_lens={spec.request_id: 3}))
    engine.take_step_samples()
    run = engine.begin_step()
    assert run is not None
    sizes = {c.seq.request_id: (c.num_tokens, len(c.draft)) for c in run.chunks}
    assert sizes == {spec.request_id: (4, 3), plain.request_id: (1, 0)}
    engine.finish_step(run)
    [sample] = engine.take_step_samples()
    assert sample.shape.tokens == 5
    assert sample.shape.samples == 5  # every verify row goes through the LM head
    assert sample.shape.decode_rows == 1 and sample.shape.prefill_segments == 1


def test_the_plan_caps_a_speculating_sequence(tiny_engine_factory: Callable[..., Path]) -> None:
    engine = _engine(tiny_engine_factory(draft_seed=0), "draft")
    request = _requests()[0]
    sizes: list[int] = []

    def record(e: CpuEngine) -> None:
        sizes.append(e.counters.last_step_tokens)

    engine.add(request, seed=1)
    engine.step()
    engine.set_plan(StepPlan({request.request_id: 3}, {request.request_id: 8}))
    while engine.has_work:
        engine.step()
        record(engine)
        engine.drain()
    assert sizes and max(sizes) == 3  # its own token and 2 drafted ones


def test_rejected_tokens_never_reach_the_prefix_cache(tiny_engine: Path) -> None:
    """After a speculating run, the blocks left in the prefix cache are exactly the full
    blocks of the tokens it kept: a later prompt of those tokens finds every one of them."""
    engine = _engine(tiny_engine)
    request = _requests(max_tokens=60)[0]
    out = _run(engine, [request], draft_len=6)[request.request_id]
    assert out.proposed > out.accepted > 0
    blocks = engine.batcher.blocks
    kept = [*request.prompt_token_ids, *out.tokens]
    computed = len(kept) - 1  # the last token was sampled, never computed
    assert blocks.num_cached_blocks == computed // blocks.tokens_per_block
    assert blocks.num_used_blocks == 0
    assert blocks.allocate(99, [*kept, 1]) == computed // blocks.tokens_per_block \
        * blocks.tokens_per_block


def test_drafts_stay_within_max_tokens_and_max_seq_len(
    tiny_engine_factory: Callable[..., Path],
) -> None:
    engine = _engine(tiny_engine_factory(max_seq_len=64))
    prompt = (*PATTERN, *PATTERN, *PATTERN)
    short = ExecRequest(1, prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    long = ExecRequest(2, prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    out = _run(engine, [short, long], draft_len=8)
    assert len(out[1].tokens) == 5 and out[1].finish is FinishReason.LENGTH
    assert len(prompt) + len(out[2].tokens) == 64 and out[2].finish is FinishReason.LENGTH


def test_deltas_and_stats_count_the_drafts(tiny_engine: Path) -> None:
    engine = _engine(tiny_engine)
    out = _run(engine, _requests(), draft_len=4)
    [stats] = engine.speculator.stats()
    assert stats.drafter == "ngram"
    assert stats.proposed == sum(o.proposed for o in out.values()) > 0
    assert stats.accepted == sum(o.accepted for o in out.values())
    steps = sum(d.speculative_steps for o in out.values() for d in o.deltas)
    assert stats.steps == steps > 0
    assert all(d.drafter == "ngram" for o in out.values() for d in o.deltas
               if d.speculative_steps)
    assert stats.mean_accepted_length == stats.accepted / steps


def test_a_sequence_left_out_of_the_plan_decodes_plainly(tiny_engine: Path) -> None:
    engine = _engine(tiny_engine)
    requests = _requests()
    engine.set_plan(StepPlan(draft_lens={1: 4}))
    out = _run(engine, requests, draft_len=0)
    assert all(o.proposed == 0 for o in out.values())
    engine = _engine(tiny_engine, drafter="none")
    out = _run(engine, requests, draft_len=4)  # an engine without a drafter ignores the plan
    assert all(o.proposed == 0 for o in out.values())
