"""Rejection sampling of drafted tokens (server/executor/cpu/verify.py), without a model: the
kept or resampled token is distributed as the target's distribution, whatever the draft's."""

from __future__ import annotations

import numpy as np
import pytest

from server.executor.cpu.draft_model import DRAFT_STREAM
from server.executor.cpu.sampling import draw, uniform
from server.executor.cpu.verify import judge_sampled
from tests.stats import chi2_sf, goodness_of_fit

pytestmark = pytest.mark.unit

P = np.array([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])  # the target's distribution
Q_CASES = {
    "close": np.array([0.35, 0.30, 0.15, 0.10, 0.05, 0.05]),
    "far": np.array([0.02, 0.03, 0.05, 0.10, 0.30, 0.50]),  # the draft favours p's tail
    "narrow": np.array([0.0, 0.0, 0.5, 0.5, 0.0, 0.0]),  # the draft never proposes 0 or 1
}
N = 4000


def _verify(p: np.ndarray, q: np.ndarray, n: int = N) -> tuple[list[int], float]:
    """n independent (proposal, verification) rounds: the emitted tokens, the kept share."""
    ids = np.arange(len(q))
    tokens, kept = [], 0
    for seed in range(n):
        proposed = draw(ids, q, uniform(seed, 7, DRAFT_STREAM))
        token, accepted = judge_sampled(p, q, proposed, seed, 7)
        assert not accepted or token == proposed
        tokens.append(token)
        kept += accepted
    return tokens, kept / n


@pytest.mark.parametrize("case", sorted(Q_CASES))
def test_emitted_tokens_follow_the_target_distribution(case: str) -> None:
    q = Q_CASES[case]
    tokens, kept = _verify(P, q)
    assert goodness_of_fit(tokens, dict(enumerate(P))) > 1e-3
    # Leviathan et al.: a drafted token survives with probability sum(min(p, q)).
    assert kept == pytest.approx(np.minimum(P, q).sum(), abs=0.03)


def test_the_check_rejects_the_draft_distribution() -> None:
    """The goodness-of-fit check has the power to catch a verifier that keeps every draft."""
    q = Q_CASES["far"]
    ids = np.arange(len(q))
    drafts = [draw(ids, q, uniform(seed, 7, DRAFT_STREAM)) for seed in range(N)]
    assert goodness_of_fit(drafts, dict(enumerate(P))) < 1e-6


def test_a_draft_equal_to_the_target_is_always_kept() -> None:
    _, kept = _verify(P, P, n=500)
    assert kept == 1.0


def test_chi2_tail_approximation() -> None:
    # Known quantiles: chi-square(10) at 18.307 is the 5% tail, chi-square(4) at 13.277 is 1%.
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, rel=0.1)
    assert chi2_sf(13.277, 4) == pytest.approx(0.01, rel=0.2)
