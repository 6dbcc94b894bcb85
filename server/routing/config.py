"""The router's one configuration object (``python -m server --route-*`` flags come from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("rule", "cascade")
CONFIDENCE_MEASURES = ("mean", "min")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """How ``model=auto`` picks between a small and a large model. Validated at construction."""

    policy: str = "rule"  # one of POLICIES
    small: str = ""  # the small model's name; "" = the served model with the fewest parameters
    large: str = ""  # the large model's name; "" = the one with the most
    # rule: prompts longer than this (in the small model's tokens) go to the large model
    max_prompt_tokens: int = 256
    # rule: requests that may generate more than this go to the large model
    max_new_tokens: int = 64
    # cascade: the small model's answer stands when its confidence (a probability, from its
    # token log-probabilities) is at least this; below, the large model answers instead
    cascade_threshold: float = 0.5
    # cascade: "mean" = the geometric mean probability of the answer's tokens, "min" = the
    # probability of its least likely token
    cascade_confidence: str = "mean"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"route policy must be one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")
        if self.cascade_confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"cascade_confidence must be one of {', '.join(CONFIDENCE_MEASURES)}"
                             f", got {self.cascade_confidence!r}")
        for name in ("max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"route_{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.cascade_threshold) and 0 <= self.cascade_threshold <= 1):
            raise ValueError(f"cascade_threshold must be a probability in [0, 1], got "
                             f"{self.cascade_threshold}")
