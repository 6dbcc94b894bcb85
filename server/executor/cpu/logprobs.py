"""Log-probabilities of chosen tokens and their top alternatives, from a step's logits.

Computed only for the sequences that ask (``SamplingParams.logprobs`` / ``prompt_logprobs``),
from the model's own distribution: the raw logits, before temperature, penalties and top-k/p
(vLLM's default ``raw_logprobs``), so a token's logprob does not depend on how it was sampled.
"""

from __future__ import annotations

import numpy as np

from server.executor.base import TokenLogprob

# Prompt positions scored per LM-head call: bounds the logits held at once to
# [ROWS, vocab] floats whatever the prefill chunk's length.
SCORE_ROWS = 64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits [m, vocab] -> log-probabilities [m, vocab], float64 (exact over 50k+ ids)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def token_logprobs(logits: np.ndarray, targets: np.ndarray, k: int) -> list[TokenLogprob]:
    """logits [m, vocab], targets [m] -> one TokenLogprob per row: targets[i]'s logprob and the
    k most likely ids of row i (ties broken by the lower id)."""
    logp = log_softmax(logits)  # [m, vocab]
    rows = np.arange(logp.shape[0])
    chosen = logp[rows, targets]  # [m]
    top = _top_ids(logp, k)  # [m, k]
    top_values = logp[rows[:, None], top] if k else None  # [m, k]
    out = []
    for i in range(logp.shape[0]):
        alternatives: tuple[tuple[int, float], ...] = ()
        if top_values is not None:
            alternatives = tuple(
                (int(t), float(v)) for t, v in zip(top[i], top_values[i], strict=True)
            )
        out.append(TokenLogprob(int(targets[i]), float(chosen[i]), alternatives))
    return out


def _top_ids(logp: np.ndarray, k: int) -> np.ndarray:
    """[m, vocab] -> the k best ids per row, best first, ties by the lower id: [m, k]."""
    if k == 0:
        return np.empty((logp.shape[0], 0), dtype=np.int64)
    k = min(k, logp.shape[1])
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]  # [m, k], unordered
    part.sort(axis=1)  # ids ascending, so the stable sort below breaks ties by id
    order = np.argsort(-np.take_along_axis(logp, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
