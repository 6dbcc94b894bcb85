"""Drafters for speculative decoding: what proposes the tokens a step then verifies.

Two behind one interface: ``NgramDrafter`` (prompt lookup, no model) here, and
``DraftModelDrafter`` (a smaller model run in the same process, ``draft_model.py``). A drafter
sees the sequences that speculate this step (their tokens so far: prompt, resumed and
generated, all verified) and returns a ``Draft`` for each that it has something to propose
for; a sequence with no draft decodes as usual. What to do with the drafts (verification,
rejection sampling, KV rollback) is the engine's: a drafter never touches the target's state.
"""

from __future__ import annotations

from collections.abc import Sequence as PySequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from server.executor.cpu.sequence import Sequence

NGRAM = "ngram"
DRAFT_MODEL = "draft"
DRAFTERS = (NGRAM, DRAFT_MODEL)


@dataclass(frozen=True, slots=True)
class Draft:
    """Tokens proposed to follow a sequence, in order."""

    tokens: tuple[int, ...]
    # [len(tokens), vocab]: the distribution each token was drawn from (a draft model sampling
    # at temperature > 0), which rejection sampling needs; None: chosen deterministically
    # (n-gram lookup, or a greedy draft), i.e. a one-hot distribution.
    probs: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """A sequence that speculates this step, and the most tokens to propose for it."""

    seq: Sequence
    max_tokens: int


class Drafter(Protocol):
    """Proposes tokens for sequences; single-threaded (the engine's)."""

    @property
    def name(self) -> str:
        """``ngram`` or ``draft``: how metrics and usage name it."""

    def propose(self, requests: list[DraftRequest]) -> dict[int, Draft]:
        """Drafts by request id; a sequence with nothing to propose is left out."""

    def retain(self, request_ids: set[int]) -> None:
        """Forgets every sequence but these (the running ones): what it kept for the others
        (a draft model's KV blocks) is freed."""


@dataclass(frozen=True, slots=True)
class NgramConfig:
    max_ngram: int = 4  # the longest suffix looked up
    min_ngram: int = 2  # the shortest: one-token matches propose too often to be right

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")


class NgramDrafter:
    """Prompt lookup: the continuation of the longest recent match of the sequence's last
    tokens in its own prompt and output. Free to run, and right whenever the output copies
    its input (extraction, rewriting, summaries that quote, code edits)."""

    name = NGRAM

    def __init__(self, config: NgramConfig | None = None) -> None:
        self.config = config or NgramConfig()

    def propose(self, requests: list[DraftRequest]) -> dict[int, Draft]:
        drafts: dict[int, Draft] = {}
        for r in requests:
            tokens = ngram_lookup(r.seq.token_ids, r.max_tokens, self.config)
            if tokens:
                drafts[r.seq.request_id] = Draft(tokens)
        return drafts

    def retain(self, request_ids: set[int]) -> None:
        """Keeps nothing per sequence."""


def ngram_lookup(context: PySequence[int], k: int, config: NgramConfig) -> tuple[int, ...]:
    """Up to k tokens that followed the most recent earlier occurrence of the context's
    longest suffix of ``min_ngram``..``max_ngram`` tokens; () when none occurs."""
    tokens = np.asarray(context, dtype=np.int64)
    length = len(tokens)
    if k < 1:
        return ()
    for n in range(min(config.max_ngram, length - 1), config.min_ngram - 1, -1):
        suffix = tokens[length - n :]
        # Windows starting at 0 .. length - 1 - n: each is followed by at least one token.
        windows = sliding_window_view(tokens[: length - 1], n)  # [length - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tuple(int(t) for t in tokens[start : start + k])
    return ()
