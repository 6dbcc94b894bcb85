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

from collections import Counter
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
        self._last_key: object = None  # what the last decision was made from
        self._last_lens: dict[int, int] = {}

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
        plan's caps (by scheduler id) and the drafter's record so far.

        The scheduler asks every pass, many times per executor step (each collection window),
        but the answer changes only when a step moved the running requests or the model: the
        last answer is kept with what it was decided from and returned while that holds. On
        a 2-core host a full decision at 32 running requests, made every pass, took CPU and
        the GIL from the engine's own threads: 15% longer decode steps in serving."""
        running = list(running)
        key = (
            tuple((r.id, r.exec_id, r.num_context_tokens, r.run_tokens > 0, caps.get(r.id),
                   r.draft_proposed, r.draft_accepted) for r in running),
            drafter,
            self.cost.observed_steps,
            self.bound_s,
        )
        if key != self._last_key:
            self._last_lens = self._decide(running, caps, drafter)
            self._last_key = key
        return dict(self._last_lens)

    def _decide(
        self,
        running: list[LiveRequest],
        caps: Mapping[int, int],
        drafter: DrafterStats | None,
    ) -> dict[int, int]:
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
            step = _Step(parts)
            for part in candidates:
                others, out = step.without(part)
                k = self._best(others, out, part, _acceptance(part.request, drafter), drafter)
                if k:
                    lens[part.request.exec_id] = k  # type: ignore[index]
                    step.replace(part, _Part(part.request, True, 1 + k))
        return lens

    def _part(self, r: LiveRequest, cap: int | None) -> _Part | None:
        if cap == 0:
            return None  # paused
        if r.run_tokens > 0:
            return _Part(r, True, 1)
        pending = min(r.num_context_tokens, self._capacity.max_tokens_per_step)
        return _Part(r, False, pending if cap is None else min(cap, pending))

    def _best(
        self,
        others: StepShape,
        out: int,
        part: _Part,
        acceptance: float,
        drafter: DrafterStats | None,
    ) -> int:
        """The draft length that maximizes the step's predicted output rate; 0 when none
        beats plain decoding by MIN_GAIN. ``others``: the step without ``part``, whose
        plain decodes yield ``out - 1`` tokens."""
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
        longest = self._capacity.max_draft_len
        ceiling = out - 1 + _expected_tokens(acceptance, longest)  # the most any k yields
        for k in range(1, longest + 1):
            trial = others.copy()
            trial.add_verify(context - 1, k + 1)
            seconds = self.cost.predict(trial) + k * per_token
            if bound is not None and seconds > bound:
                break
            if ceiling / seconds <= best_rate:
                break  # a longer draft costs at least this (the model never falls) for no more
            rate = (out - 1 + _expected_tokens(acceptance, k)) / seconds
            if rate > best_rate:
                best, best_rate = k, rate
        return best


class _Step:
    """The next step's shape with every part in it, kept as parts change, so that the step
    without one part is a subtraction rather than a rebuild over all the others."""

    def __init__(self, parts: list[_Part]) -> None:
        self._shape = _shape(parts)
        self._decodes = Counter(p.request.num_context_tokens for p in parts if _plain(p))
        self._decoding = sum(1 for p in parts if p.decoding)

    def without(self, part: _Part) -> tuple[StepShape, int]:
        """The step less ``part``, and its output tokens with ``part`` as one plain decode
        (every decoding part yields one token in a plain step)."""
        longest = self._shape.decode_context_max
        if _plain(part):
            context = part.request.num_context_tokens
            if context == longest and self._decodes[context] == 1:
                longest = max((c for c, n in self._decodes.items() if n and c != context),
                              default=0)
        others = self._shape.without(_shape((part,)), longest)
        return others, 1 + self._decoding - part.decoding

    def replace(self, old: _Part, new: _Part) -> None:
        self._shape, _ = self.without(old)
        _add(self._shape, new)
        self._decodes[old.request.num_context_tokens] -= _plain(old)
        self._decodes[new.request.num_context_tokens] += _plain(new)
        self._decoding += new.decoding - old.decoding


def _plain(part: _Part) -> bool:
    """A part that is one decode row (not a prefill chunk, not a verify chunk)."""
    return part.decoding and part.tokens == 1


def _shape(parts: Iterable[_Part]) -> StepShape:
    shape = StepShape()
    for p in parts:
        _add(shape, p)
    return shape


def _add(shape: StepShape, p: _Part) -> None:
    context = p.request.num_context_tokens
    if not p.decoding:
        shape.add_prefill(0, p.tokens, p.tokens >= context)
    elif p.tokens == 1:
        shape.add_decode(context)
    else:
        shape.add_verify(context - 1, p.tokens)


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
