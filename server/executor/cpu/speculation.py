"""Speculative decoding in the CPU engine: which sequences speculate in a step, and how much.

The scheduler decides (``StepPlan.draft_lens``, from its policy and the request's
``num_speculative_tokens``); the engine carries it out. A sequence speculates in a step when
it decodes (its context is computed but for the token sampled last), and drafts at most what
the plan allows, what its cap leaves after its own token, what keeps its positions within
the engine's max_seq_len, and one fewer than the tokens it may still generate (the step's own
token is the last one). The drafter may propose less, or nothing.

Drafting runs before the step's forward pass, on the drafter's own time: that time is kept
with the drafter's tallies, not in the target's step samples, whose shapes (a verify chunk of
k + 1 positions per speculating sequence) and durations describe the target alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine_builder.manifest import Manifest
from server.executor.base import DrafterStats, StepPlan
from server.executor.cpu.draft_model import open_draft_model
from server.executor.cpu.drafter import (
    DRAFT_MODEL,
    DRAFTERS,
    NGRAM,
    Draft,
    Drafter,
    DraftRequest,
    NgramDrafter,
)
from server.executor.cpu.sequence import Sequence

AUTO = "auto"
NONE = "none"
DRAFTER_CHOICES = (AUTO, *DRAFTERS, NONE)
# Drafted tokens per step, at most, for the n-gram drafter by default: a copied passage is
# accepted in long runs, and at batch 1 a few more positions in a step cost little, up to 8 of
# them: one-thread matmuls of up to 8 rows run over L2-sized weight tiles (weights.py), and on
# the default engine a step of 8 positions took 1.6x one of 1, of 9 positions 2.5x.
NGRAM_MAX_DRAFT_LEN = 7


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    """Which drafter the CPU engine speculates with."""

    # "auto": the engine's draft model when its manifest has one, else n-gram lookup;
    # "ngram"; "draft" (the manifest must have one); "none": the engine never speculates.
    drafter: str = AUTO
    max_draft_len: int = 0  # 0: the draft's manifest value, or NGRAM_MAX_DRAFT_LEN

    def __post_init__(self) -> None:
        if self.drafter not in DRAFTER_CHOICES:
            raise ValueError(f"drafter must be one of {DRAFTER_CHOICES}, got {self.drafter!r}")
        if self.max_draft_len < 0:
            raise ValueError(f"max_draft_len must be >= 0, got {self.max_draft_len}")


def open_drafter(
    config: SpeculationConfig, engine_dir: Path, manifest: Manifest, max_seq_len: int
) -> tuple[Drafter | None, int]:
    """The drafter the config asks for and its max draft length; (None, 0) for none.
    ValueError when it asks for a draft model the engine does not have."""
    choice = config.drafter
    if choice == AUTO:
        choice = DRAFT_MODEL if manifest.draft is not None else NGRAM
    if choice == NONE:
        return None, 0
    if choice == NGRAM:
        return NgramDrafter(), config.max_draft_len or NGRAM_MAX_DRAFT_LEN
    if manifest.draft is None:
        raise ValueError(f"{engine_dir}: drafter 'draft' needs an engine built with --draft")
    drafter = open_draft_model(engine_dir / manifest.draft.path, manifest, max_seq_len)
    return drafter, config.max_draft_len or manifest.draft.max_draft_len


class Speculator:
    """Drafts for the sequences the plan lets speculate, and tallies the drafter's work."""

    def __init__(self, drafter: Drafter | None, max_draft_len: int) -> None:
        self.drafter = drafter
        self.max_draft_len = max_draft_len if drafter is not None else 0
        self._proposed = self._accepted = self._steps = 0
        self._seconds = 0.0

    @property
    def name(self) -> str | None:
        return None if self.drafter is None else self.drafter.name

    def propose(
        self, candidates: Iterable[Sequence], plan: StepPlan, max_seq_len: int
    ) -> tuple[dict[int, Draft], float]:
        """Drafts by request id, and the seconds drafting took."""
        if self.drafter is None:
            return {}, 0.0
        requests = [DraftRequest(seq, k) for seq in candidates
                    if (k := self._length(seq, plan, max_seq_len)) > 0]
        if not requests:
            return {}, 0.0
        t0 = time.perf_counter()
        drafts = self.drafter.propose(requests)
        seconds = time.perf_counter() - t0
        self._seconds += seconds
        return drafts, seconds

    def retain(self, request_ids: set[int]) -> None:
        if self.drafter is not None:
            self.drafter.retain(request_ids)

    def count(self, proposed: int, accepted: int) -> None:
        """One sequence's step verified ``proposed`` drafted tokens and kept ``accepted``."""
        self._proposed += proposed
        self._accepted += accepted
        self._steps += 1

    def stats(self) -> tuple[DrafterStats, ...]:
        if self.drafter is None:
            return ()
        return (DrafterStats(self.drafter.name, self._proposed, self._accepted, self._steps,
                             self._seconds),)

    def _length(self, seq: Sequence, plan: StepPlan, max_seq_len: int) -> int:
        if seq.prefilling or seq.num_pending != 1:
            return 0
        rid = seq.request_id
        k = min(plan.draft_len(rid), self.max_draft_len)
        cap = plan.cap(rid)
        if cap is not None:
            k = min(k, cap - 1)
        k = min(k, max_seq_len - len(seq.token_ids))
        return min(k, seq.request.sampling.max_tokens - seq.tracker.num_generated - 1)
