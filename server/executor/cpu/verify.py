"""The token a sequence emits from one row of logits, and whether a drafted token survives it.

Plain decoding and speculative verification go through the same function, so a token depends
only on the request's own state, seed and index (``sampling.py``), with or without a draft.

Verification of drafted tokens d_1..d_k (rows 0..k of a verify chunk: row i holds the logits
after the sequence's last token and d_1..d_i) walks the rows in order, each with the target's
distribution p_i as plain decoding would sample it (penalties and min_tokens over the tokens
kept so far, then temperature, top-k, top-p):

- A drafted token chosen deterministically (n-gram lookup, a greedy draft model): draw t from
  p_i exactly as plain decoding would (the same uniform for that token index) and keep d_i iff
  t == d_i; otherwise emit t and stop. This *is* rejection sampling for a one-hot draft
  distribution q: d is kept with probability p(d), and a rejected draw is distributed as p
  given "not d", which is norm(max(p - q, 0)). So the tokens are the very ones plain decoding
  gives for the seed (for greedy, the argmax: token for token).
- A drafted token sampled from the draft model's distribution q_i (temperature > 0): keep d
  with probability min(1, p(d) / q(d)); otherwise emit a draw from norm(max(p - q, 0))
  (Leviathan et al. 2023, Chen et al. 2023). The emitted tokens are distributed as p.

When all k survive, row k's logits give one more token, drawn as plain decoding would.
"""

from __future__ import annotations

import numpy as np

from server.executor.base import TokenLogprob
from server.executor.cpu.logprobs import token_logprobs
from server.executor.cpu.sampling import dense, distribution, draw, uniform
from server.executor.cpu.sequence import Sequence

# The independent draw of a token index used to resample after a rejection.
RESAMPLE_STREAM = 1


def pick(
    seq: Sequence, logits: np.ndarray, proposed: int | None = None, q: np.ndarray | None = None
) -> tuple[int, bool]:
    """logits [vocab] -> the token seq emits next, and whether it is ``proposed`` (a drafted
    token, kept). ``q`` [vocab]: the distribution ``proposed`` was drawn from (None: chosen
    deterministically)."""
    params, tracker = seq.request.sampling, seq.tracker
    context = (seq.request.prompt_token_ids, seq.generated_ids) if params.penalized else ((), ())
    candidates, weights = distribution(logits, params, tracker.banned_ids(), context)
    index = tracker.num_generated
    if params.temperature == 0.0:
        token = int(candidates[0])
    elif q is None or proposed is None:
        token = draw(candidates, weights, uniform(seq.seed, index))
    else:
        return judge_sampled(dense(candidates, weights, len(logits)), q, proposed, seq.seed,
                              index)
    return token, token == proposed


def judge_sampled(
    p: np.ndarray, q: np.ndarray, proposed: int, seed: int, index: int
) -> tuple[int, bool]:
    """Rejection sampling of one token drawn from q [vocab] against p [vocab]."""
    if uniform(seed, index) * q[proposed] < p[proposed]:  # u < p(d) / q(d)
        return proposed, True
    residual = np.maximum(p - q, 0.0)  # > 0 somewhere: a rejection means p(d) < q(d)
    ids = np.flatnonzero(residual)
    if ids.size == 0:  # only by rounding, with p == q
        ids, residual = np.flatnonzero(p), p
    return draw(ids, residual[ids], uniform(seed, index, RESAMPLE_STREAM)), False


def logprob_of(seq: Sequence, logits: np.ndarray, token: int) -> TokenLogprob | None:
    """The token's logprob and top alternatives under logits [vocab], when the request asked."""
    k = seq.request.sampling.logprobs
    if k is None:
        return None
    return token_logprobs(logits[None], np.array([token]), k)[0]
