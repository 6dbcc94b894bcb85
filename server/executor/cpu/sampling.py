"""Per-request token sampling: penalties, then greedy, temperature, top-k, top-p.

Reproducibility: the random draw for a request's n-th generated token (resumed tokens counted)
comes from `np.random.default_rng([seed, n])`, so a token depends only on the request's own
logits, seed and index: never on batch mates, step boundaries, a preemption and resume, or
speculative decoding (``verify.py`` draws the same way).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from server.executor.base import SamplingParams


def sample_token(
    logits: np.ndarray,
    params: SamplingParams,
    seed: int,
    index: int,
    banned: Iterable[int] = (),
    context: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> int:
    """logits [vocab] (not modified) -> a token id; `banned` ids get probability 0 (min_tokens).
    ``context`` is (prompt ids, generated ids), which penalties look at."""
    candidates, weights = distribution(logits, params, banned, context)
    if params.temperature == 0.0:
        return int(candidates[0])
    return draw(candidates, weights, uniform(seed, index))


def distribution(
    logits: np.ndarray,
    params: SamplingParams,
    banned: Iterable[int] = (),
    context: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> tuple[np.ndarray, np.ndarray]:
    """What a request samples its next token from: (candidate ids in draw order, their
    unnormalized probabilities), after penalties, banned ids, temperature, top-k and top-p.
    Greedy (temperature 0) is the argmax alone."""
    banned_ids = [i for i in banned if 0 <= i < logits.shape[0]]
    if params.temperature == 0.0 and not params.penalized and not banned_ids:
        # Widening to float64 keeps the order, so the argmax needs no copy.
        return np.array([int(np.argmax(logits))]), np.ones(1)
    logits = np.array(logits, dtype=np.float64)  # float64: softmax over 50k ids stays exact
    if params.penalized:
        apply_penalties(logits, params, *context)
    if banned_ids and len(banned_ids) < logits.shape[0]:
        logits[banned_ids] = -np.inf
    if params.temperature == 0.0:
        return np.array([int(np.argmax(logits))]), np.ones(1)
    logits /= params.temperature
    if params.top_k == 0 and params.top_p == 1.0:
        # No truncation: no sort needed, draw over ids in their natural order.
        return np.arange(logits.shape[0]), np.exp(logits - logits.max())
    candidates = _top_k(logits, params.top_k)  # ids, best first
    weights = np.exp(logits[candidates] - logits[candidates[0]])
    if params.top_p < 1.0:
        keep = _top_p_count(weights / weights.sum(), params.top_p)
        candidates, weights = candidates[:keep], weights[:keep]
    return candidates, weights


def draw(candidates: np.ndarray, weights: np.ndarray, u: float) -> int:
    """The candidate at quantile ``u`` in [0, 1) of the weights' distribution, in their order."""
    cdf = np.cumsum(weights)
    pick = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(candidates[min(pick, len(candidates) - 1)])


def dense(candidates: np.ndarray, weights: np.ndarray, vocab_size: int) -> np.ndarray:
    """The distribution as probabilities over every id: [vocab] float64, summing to 1."""
    probs = np.zeros(vocab_size)
    probs[candidates] = weights / weights.sum()
    return probs


def uniform(seed: int, index: int, stream: int | None = None) -> float:
    """The random draw of a request's ``index``-th token: a function of the seed and the index
    alone. ``stream`` names an independent draw for the same token (speculative decoding:
    the draft's proposal, the resample after a rejection)."""
    key = [seed, index] if stream is None else [seed, index, stream]
    return float(np.random.default_rng(key).random())


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Candidate ids sorted by logit, best first (a stable sort: ties keep id order)."""
    ids = np.argpartition(-logits, k - 1)[:k] if 0 < k < logits.shape[0] else None
    if ids is None:
        return np.argsort(-logits, kind="stable")
    ids.sort()
    return ids[np.argsort(-logits[ids], kind="stable")]


def _top_p_count(probs: np.ndarray, top_p: float) -> int:
    """Smallest number of leading (sorted) candidates whose mass reaches top_p."""
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, top_p, side="left") + 1, len(probs)))


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> None:
    """In place, logits [vocab] float64. Repetition (over prompt and output ids): positive logits
    divided by the penalty, negative ones multiplied (Hugging Face / vLLM). Presence and
    frequency (over output ids, OpenAI's): minus presence once, minus frequency per occurrence.
    """
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.fromiter((*prompt, *output), dtype=np.int64))
        values = logits[seen]
        r = params.repetition_penalty
        logits[seen] = np.where(values > 0, values / r, values * r)
    if output and (params.presence_penalty or params.frequency_penalty):
        ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
