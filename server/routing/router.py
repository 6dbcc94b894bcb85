"""The router behind ``model=auto``: it prepares a request for both models, lets the policy
decide, and hands back the route: the small model, the large one, or a ``CascadeRun``.

Which requests it takes: text and chat prompts (token ids belong to one model's vocabulary, so
they must name their model). A model that cannot take the request (a chat request to a base
model without a chat template, a prompt longer than its context) is not a candidate; with one
candidate left, that one serves it. The response names the model that served it.

Metrics: ``backfill_routed_requests_total{model,route,reason}`` (each request once, when it is
decided: by the policy, or for the cascade when the small model's answer is judged) and
``backfill_cascade_discarded_tokens_total{model}`` (the small model's tokens that the large
model's answer replaced).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from backfill.v1 import inference_pb2 as pb
from server.api.models import Prepared, ServedModel, parameter_count
from server.api.validation import InvalidArgumentError
from server.routing.cascade import CascadeRun
from server.routing.config import RouterConfig
from server.routing.policy import CASCADE, HINTS, LARGE, SMALL, Features, make_policy
from server.scheduler.types import SchedRequest


def pick_models(models: Sequence[ServedModel],
                config: RouterConfig) -> tuple[ServedModel, ServedModel]:
    """(small, large): as named in the config, else by parameter count. ValueError naming the
    flag when a name is unknown or both are one model."""
    by_size = sorted(models, key=lambda m: parameter_count(m.spec.manifest))

    def named(name: str, flag: str, fallback: ServedModel) -> ServedModel:
        if not name:
            return fallback
        for model in models:
            if model.name == name:
                return model
        raise ValueError(f"{flag}: no served model is called {name!r} "
                         f"(served: {', '.join(m.name for m in models)})")

    small = named(config.small, "route_small", by_size[0])
    large = named(config.large, "route_large", by_size[-1])
    if small is large:
        raise ValueError(f"route_small and route_large are both {small.name!r}: the router "
                         "needs two models")
    return small, large


class RouterMetrics(Collector):
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._lock = threading.Lock()
        self._routed: Counter[tuple[str, str, str]] = Counter()
        self._discarded: Counter[str] = Counter()
        if registry is not None:
            registry.register(self)

    def routed(self, model: str, route: str, reason: str, discarded: int = 0) -> None:
        with self._lock:
            self._routed[model, route, reason] += 1
            if discarded:
                self._discarded[model] += discarded

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            routed, discarded = dict(self._routed), dict(self._discarded)
        family = CounterMetricFamily("backfill_routed_requests", "Requests to model auto, by "
                                     "the model that served them.",
                                     labels=["model", "route", "reason"])
        for key, value in sorted(routed.items()):
            family.add_metric(list(key), value)
        yield family
        family = CounterMetricFamily("backfill_cascade_discarded_tokens", "Tokens of cascade "
                                     "answers replaced by the large model's.", labels=["model"])
        for model, value in sorted(discarded.items()):
            family.add_metric([model], value)
        yield family


class Router:
    """The ``auto`` target of a ModelRegistry (see server/api/models.py's ``Target``)."""

    def __init__(self, models: Sequence[ServedModel], config: RouterConfig,
                 metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.small, self.large = pick_models(models, config)
        self._policy = make_policy(config)
        self._metrics = metrics if metrics is not None else RouterMetrics(None)

    def prepare(self, req: pb.GenerateRequest, *, force_offline: bool = False,
                prefix: str = "", tenant: str | None = None, weight: float = 1.0) -> Prepared:
        self._check(req, prefix)
        kw = dict(force_offline=force_offline, prefix=prefix, tenant=tenant, weight=weight)
        small = _attempt(lambda: self.small.prepare(req, **kw))  # type: ignore[arg-type]
        large = _attempt(lambda: self.large.prepare(req, **kw))  # type: ignore[arg-type]
        return self._route(req, small, large)

    async def prepare_async(self, req: pb.GenerateRequest, *, prefix: str = "", tenant: str,
                            weight: float = 1.0) -> Prepared:
        self._check(req, prefix)
        small = await _attempt_async(
            lambda: self.small.prepare_async(req, prefix=prefix, tenant=tenant, weight=weight))
        large = await _attempt_async(
            lambda: self.large.prepare_async(req, prefix=prefix, tenant=tenant, weight=weight))
        return self._route(req, small, large)

    def _check(self, req: pb.GenerateRequest, prefix: str) -> None:
        if req.route_hint not in ("", *HINTS):
            raise InvalidArgumentError(f"{prefix}route_hint: must be '', 'small' or 'large', "
                                       f"got {req.route_hint[:32]!r}")
        if req.WhichOneof("prompt") == "token_ids":
            raise InvalidArgumentError(
                f"{prefix}token_ids: token ids belong to one model's vocabulary; with model "
                "auto send text or chat messages, or name the model")

    def _route(self, req: pb.GenerateRequest, small: Prepared | InvalidArgumentError,
               large: Prepared | InvalidArgumentError) -> Prepared:
        if isinstance(small, InvalidArgumentError) and isinstance(large, InvalidArgumentError):
            raise small
        if isinstance(small, InvalidArgumentError) or isinstance(large, InvalidArgumentError):
            only = large if isinstance(small, InvalidArgumentError) else small
            assert isinstance(only, Prepared)
            self._metrics.routed(only.route.name, SMALL if only is small else LARGE,
                                 "only_candidate")
            return only
        features = Features(prompt_tokens=len(small.request.prompt_token_ids),
                            max_tokens=small.request.sampling.max_tokens,
                            hint=req.route_hint, choices=max(req.n, 1))
        decision = self._policy.decide(features)
        if decision.route != CASCADE:
            chosen = small if decision.route == SMALL else large
            self._metrics.routed(chosen.route.name, decision.route, decision.reason)
            return chosen
        return self._cascade(small.request, large.request)

    def _cascade(self, small: SchedRequest, large: SchedRequest) -> Prepared:
        sampling = small.sampling
        caller_logprobs = sampling.logprobs is not None
        judged = dataclasses.replace(small, sampling=dataclasses.replace(
            sampling, logprobs=sampling.logprobs or 0))  # the chosen tokens' logprobs at least
        run = CascadeRun(self.small, self.large, large, threshold=self.config.cascade_threshold,
                         measure=self.config.cascade_confidence,
                         caller_logprobs=caller_logprobs,
                         on_decided=lambda model, reason, discarded: self._metrics.routed(
                             model, CASCADE, reason, discarded))
        return Prepared(run, judged)


def _attempt(convert: Callable[[], Prepared]) -> Prepared | InvalidArgumentError:
    try:
        return convert()
    except InvalidArgumentError as exc:
        return exc


async def _attempt_async(
        convert: Callable[[], Awaitable[Prepared]]) -> Prepared | InvalidArgumentError:
    try:
        return await convert()
    except InvalidArgumentError as exc:
        return exc
