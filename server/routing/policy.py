"""Routing policies: given what is known of a request before it runs, where it goes.

A policy is pluggable (``POLICIES`` by name); it sees ``Features`` and answers a ``Decision``:
the small model, the large one, or the cascade (small first, judged, large if unsure).

- ``RulePolicy``: an explicit hint wins; else prompts longer than ``max_prompt_tokens`` and
  requests that may generate more than ``max_new_tokens`` go to the large model (long inputs
  and long answers are the complex ones), the rest to the small one.
- ``CascadePolicy``: an explicit hint wins; requests with several choices follow the rules (a
  cascade judges one answer); everything else goes through the cascade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.routing.config import RouterConfig

SMALL, LARGE, CASCADE = "small", "large", "cascade"
HINTS = (SMALL, LARGE)


@dataclass(frozen=True, slots=True)
class Features:
    """What a policy may look at."""

    prompt_tokens: int  # in the small model's vocabulary
    max_tokens: int  # the most the request may generate
    hint: str  # "" or one of HINTS (GenerateRequest.route_hint)
    choices: int  # n


@dataclass(frozen=True, slots=True)
class Decision:
    route: str  # SMALL, LARGE or CASCADE
    reason: str  # why, for the routed-requests metric: hint, prompt_length, max_tokens, ...


class RoutingPolicy(Protocol):
    def decide(self, features: Features) -> Decision: ...


class RulePolicy:
    def __init__(self, config: RouterConfig) -> None:
        self._max_prompt = config.max_prompt_tokens
        self._max_new = config.max_new_tokens

    def decide(self, features: Features) -> Decision:
        if features.hint:
            return Decision(features.hint, "hint")
        if features.prompt_tokens > self._max_prompt:
            return Decision(LARGE, "prompt_length")
        if features.max_tokens > self._max_new:
            return Decision(LARGE, "max_tokens")
        return Decision(SMALL, "rule")


class CascadePolicy:
    def __init__(self, config: RouterConfig) -> None:
        self._rules = RulePolicy(config)

    def decide(self, features: Features) -> Decision:
        if features.hint or features.choices > 1:
            return self._rules.decide(features)
        return Decision(CASCADE, "cascade")


POLICIES: dict[str, type[RulePolicy] | type[CascadePolicy]] = {
    "rule": RulePolicy, "cascade": CascadePolicy,
}


def make_policy(config: RouterConfig) -> RoutingPolicy:
    return POLICIES[config.policy](config)
