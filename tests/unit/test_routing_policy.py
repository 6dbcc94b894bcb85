"""Routing policies and the cascade's confidence measure, alone."""

from __future__ import annotations

import math

import pytest

from server.executor.base import TokenLogprob
from server.routing.cascade import confidence
from server.routing.config import RouterConfig
from server.routing.policy import CASCADE, LARGE, SMALL, Features, make_policy

pytestmark = pytest.mark.unit


def features(prompt: int = 10, max_tokens: int = 10, hint: str = "", n: int = 1) -> Features:
    return Features(prompt_tokens=prompt, max_tokens=max_tokens, hint=hint, choices=n)


def test_rule_policy() -> None:
    rule = make_policy(RouterConfig(max_prompt_tokens=100, max_new_tokens=32))
    assert rule.decide(features()).route == SMALL
    assert rule.decide(features(prompt=101)).reason == "prompt_length"
    assert rule.decide(features(max_tokens=33)).route == LARGE
    assert rule.decide(features(prompt=101, hint="small")).route == SMALL  # hints win


def test_cascade_policy_falls_back_to_rules_where_it_cannot_judge() -> None:
    cascade = make_policy(RouterConfig(policy="cascade", max_new_tokens=32))
    assert cascade.decide(features(prompt=10_000)).route == CASCADE
    assert cascade.decide(features(hint="large")).route == LARGE
    assert cascade.decide(features(n=2, max_tokens=64)).route == LARGE
    assert cascade.decide(features(n=2)).route == SMALL


def test_confidence_measures() -> None:
    lps = [TokenLogprob(1, math.log(0.9)), TokenLogprob(2, math.log(0.4))]
    assert confidence(lps, "mean") == pytest.approx(math.sqrt(0.9 * 0.4))
    assert confidence(lps, "min") == pytest.approx(0.4)
    assert confidence([], "mean") == 0.0  # an empty answer is never trusted


def test_router_config_is_checked() -> None:
    with pytest.raises(ValueError, match="route policy"):
        RouterConfig(policy="random")
    with pytest.raises(ValueError, match="cascade_confidence"):
        RouterConfig(cascade_confidence="median")
