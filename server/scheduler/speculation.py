"""When speculative decoding pays: the draft length the scheduler asks of each running request.

Verifying k drafted tokens puts k + 1 positions of a sequence in the step instead of one. A
memory-bound step (small batch) costs about the same either way, so every accepted token is
nearly free; a compute-bound step (large batch) pays for every position, and rejected ones are
throughput lost by every sequence in the step. So the policy weighs the step as a whole:

- a request's own ``num_speculative_tokens`` is what it gets (0: never), up to the executor's
  max draft length;
- otherwise, with ``speculation="auto"``, offline requests never speculate (they are
  throughput work, and every step they ride in is a large one), and an online request that
  decodes speculates with the k in 1..K that maximizes the step's predicted output rate,
  tokens out per second, when that beats not speculating by ``MIN_GAIN`` (decided while it
  still prefills too, so that its first decode already speculates): the step-cost model
  predicts the step with its verify chunk (plus the drafter's time per drafted token), and a
  verify chunk of k drafts yields (1 - a^(k+1)) / (1 - a) tokens when each is accepted with
  probability a. With a TPOT SLO, speculation never takes a step past the step budget (the
  SLO times the SLO planner's margin, what the step plan itself is held to) that was within
  it: a step may accept nothing, and its online tokens then wait the whole step.

The acceptance a of a request is its own record smoothed towards its drafter's (or
``PRIOR_ACCEPTANCE`` before the drafter has one), so a request that copies its prompt earns
long drafts and one that does not loses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine_builder.step_cost import OnlineStepCost, StepShape
from server.executor.base import Capacity, DrafterStats
from server.scheduler.config import SPECULATION_MODES
from server.scheduler.live import LiveRequest
from server.scheduler.slo import SloPlanner
from server.scheduler.types import Tier

# Predicted output rate with speculation over without, at least: a margin over the model's
# error, so that a request whose drafts are mostly rejected does not speculate on a guess.
MIN_GAIN = 1.1
PRIOR_ACCEPTANCE = 0.5  # a drafter's acceptance before it has a record
# Weight of the prior (the drafter's rate) in drafted tokens: one step's drafts of a request
# already outweigh it, since requests differ most (a copy is accepted, a new text is not).
PRIOR_TOKENS = 4.0
MAX_ACCEPTANCE = 0.95  # a record of only acceptances still predicts a rejection now and then


@dataclass(frozen=True, slots=True)
class _Part:
    """What one running request puts in the next step."""

    request: LiveRequest
    decoding: bool
    tokens: int  # prefill: the chunk; decode: 1; verify: k + 1


class SpeculationPolicy:
    """Draft lengths per running request, each scheduling pass."""

    def __init__(
        self,
        cost: OnlineStepCost,
        capacity: Capacity,
        mode: str,
        tpot_slo_s: float | None,
        planner: SloPlanner | None = None,
    ) -> None:
        if mode not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {SPECULATION_MODES}, got {mode!r}")
        self.cost = cost
        self.mode = mode
        self.tpot_slo_s = tpot_slo_s
        self._planner = planner
        self._capacity = capacity

    @property
    def bound_s(self) -> float | None:
        """The longest step speculation may make: the planner's budget, else the SLO."""
        if self._planner is not None:
            return self._planner.budget_s
        return self.tpot_slo_s

    def decide(
        self,
        running: Iterable[LiveRequest],
        caps: Mapping[int, int],
        drafter: DrafterStats | None,
    ) -> dict[int, int]:
        """Draft lengths by executor id (requests left out do not speculate), given the step
        plan's caps (by scheduler id) and the drafter's record so far."""
        limit = self._capacity.max_draft_len
        if limit == 0:
            return {}
        lens: dict[int, int] = {}
        parts: list[_Part] = []
        candidates: list[_Part] = []
        for r in running:
            part = self._part(r, caps.get(r.id))
            if part is None or r.exec_id is None:
                continue
            asked = r.request.sampling.num_speculative_tokens
            if asked is not None:
                if asked:  # set while it prefills too, so its first decode speculates
                    lens[r.exec_id] = min(asked, limit)
                    if part.decoding:
                        part = _Part(r, True, 1 + lens[r.exec_id])
            elif self.mode == "auto" and r.tier is Tier.ONLINE:
                candidates.append(part)  # judged as the decode it is or is about to be
            parts.append(part)
        if candidates and self.cost.calibrated:
            for part in candidates:
                k = self._best(parts, part, _acceptance(part.request, drafter), drafter)
                if k:
                    lens[part.request.exec_id] = k  # type: ignore[index]
                    parts[parts.index(part)] = _Part(part.request, True, 1 + k)
        return lens

    def _part(self, r: LiveRequest, cap: int | None) -> _Part | None:
        if cap == 0:
            return None  # paused
        if r.run_tokens > 0:
            return _Part(r, True, 1)
        pending = min(r.num_context_tokens, self._capacity.max_tokens_per_step)
        return _Part(r, False, pending if cap is None else min(cap, pending))

    def _best(
        self, parts: list[_Part], part: _Part, acceptance: float, drafter: DrafterStats | None
    ) -> int:
        """The draft length that maximizes the step's predicted output rate; 0 when none
        beats plain decoding by MIN_GAIN."""
        others = _shape(p for p in parts if p is not part)
        out = 1 + sum(1 for p in parts if p.decoding and p is not part)  # a plain step's tokens
        context = part.request.num_context_tokens
        plain = others.copy()
        plain.add_decode(context)
        plain_s = self.cost.predict(plain)
        if plain_s <= 0:
            return 0
        limit = self.bound_s
        bound = None if limit is None else max(limit, plain_s)
        per_token = 0.0 if drafter is None else drafter.seconds_per_token
        best, best_rate = 0, MIN_GAIN * out / plain_s
        for k in range(1, self._capacity.max_draft_len + 1):
            trial = others.copy()
            trial.add_verify(context - 1, k + 1)
            seconds = self.cost.predict(trial) + k * per_token
            if bound is not None and seconds > bound:
                break
            rate = (out - 1 + _expected_tokens(acceptance, k)) / seconds
            if rate > best_rate:
                best, best_rate = k, rate
        return best


def _shape(parts: Iterable[_Part]) -> StepShape:
    shape = StepShape()
    for p in parts:
        context = p.request.num_context_tokens
        if not p.decoding:
            shape.add_prefill(0, p.tokens, p.tokens >= context)
        elif p.tokens == 1:
            shape.add_decode(context)
        else:
            shape.add_verify(context - 1, p.tokens)
    return shape


def _acceptance(r: LiveRequest, drafter: DrafterStats | None) -> float:
    """The request's acceptance rate, smoothed towards its drafter's."""
    prior = PRIOR_ACCEPTANCE
    if drafter is not None and drafter.proposed >= PRIOR_TOKENS:
        prior = drafter.acceptance_rate
    rate = (r.draft_accepted + PRIOR_TOKENS * prior) / (r.draft_proposed + PRIOR_TOKENS)
    return min(rate, MAX_ACCEPTANCE)


def _expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step verifying k drafts yields when each is accepted with this probability,
    independently: 1 + a + a^2 + ... + a^k."""
    return sum(acceptance**i for i in range(k + 1))
