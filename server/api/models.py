"""The models a server runs, as the API surfaces see them, and what a request's ``model`` field
resolves to.

A request names a served model, ``""`` (the default model: the first engine), or ``auto`` (the
router, server/routing/, when the server runs several models). Either way the surface
*prepares* the request: the target converts it (validate, tokenize) for the model that will
run it and hands back a ``Prepared`` request with the ``Route`` it runs on: a served model, or a
cascade over two (whose ``name`` and ``spec`` become the serving model's once it has decided,
which is before its first event).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from backfill.v1 import inference_pb2 as pb
from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.api.convert import to_sched_request, to_sched_request_async
from server.api.validation import InvalidArgumentError, check_label
from server.executor.base import Capacity
from server.scheduler.types import SchedRequest, Submitter

if TYPE_CHECKING:
    from server.scheduler import BackfillScheduler


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What converting a request for one model needs: its name, tokenizer and limits."""

    name: str
    manifest: Manifest
    tokenizer: EngineTokenizer
    capacity: Capacity  # the running executor's, which may differ from the manifest's limits


class Route(Protocol):
    """What a prepared request runs on: the model serving it and where to submit it."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def scheduler(self) -> Submitter: ...


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request converted for the route it runs on."""

    route: Route
    request: SchedRequest


class Target(Protocol):
    """What a request's ``model`` field resolves to."""

    def prepare(self, req: pb.GenerateRequest, *, force_offline: bool = False,
                prefix: str = "", tenant: str | None = None, weight: float = 1.0) -> Prepared:
        """Converts on the calling thread (see ``to_sched_request``)."""
        ...

    async def prepare_async(self, req: pb.GenerateRequest, *, prefix: str = "", tenant: str,
                            weight: float = 1.0) -> Prepared:
        """Converts with long prompts tokenized off the event loop."""
        ...


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One engine this server runs: how to convert its requests and where to submit them."""

    spec: ModelSpec
    scheduler: BackfillScheduler

    @property
    def name(self) -> str:
        return self.spec.name

    def prepare(self, req: pb.GenerateRequest, *, force_offline: bool = False,
                prefix: str = "", tenant: str | None = None, weight: float = 1.0) -> Prepared:
        return Prepared(self, to_sched_request(req, self.spec, force_offline=force_offline,
                                               prefix=prefix, tenant=tenant, weight=weight))

    async def prepare_async(self, req: pb.GenerateRequest, *, prefix: str = "", tenant: str,
                            weight: float = 1.0) -> Prepared:
        return Prepared(self, await to_sched_request_async(req, self.spec, prefix=prefix,
                                                           tenant=tenant, weight=weight))


class ModelRegistry:
    """The models a request may name, by name; ``""`` is the default (first) model and
    ``auto`` the router (the default model too when none is set: one model, nothing to
    choose)."""

    AUTO = "auto"

    def __init__(self, models: list[ServedModel], router: Target | None = None) -> None:
        if not models:
            raise ValueError("a server needs at least one model")
        self._models = {m.name: m for m in models}
        if len(self._models) != len(models):
            raise ValueError("two models share a name")
        self.default = models[0]
        self.router = router

    def resolve(self, name: str, prefix: str = "") -> Target:
        check_label(name, prefix + "model")  # before it is echoed in an error
        if name == "":
            return self.default
        if name == self.AUTO:
            return self.router if self.router is not None else self.default
        return self.get(name, prefix)

    def get(self, name: str, prefix: str = "") -> ServedModel:
        """A served model by its name (not ``auto``); InvalidArgumentError if none is."""
        model = self._models.get(name)
        if model is None:
            available = ", ".join([*sorted(self._models), self.AUTO])
            raise InvalidArgumentError(
                f"{prefix}model: unknown model {name!r} (available: {available})"
            )
        return model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)


def model_info(model: ServedModel) -> pb.ModelInfo:
    spec, config = model.spec, model.scheduler.config
    m = spec.manifest
    return pb.ModelInfo(
        name=spec.name,
        backend=m.backend,
        architecture=m.architecture.family,
        weight_quant=m.quantization.quant_algo or m.quantization.weights,
        kv_cache_dtype=m.quantization.kv_cache_dtype,
        max_batch_size=spec.capacity.max_slots,
        max_seq_len=spec.capacity.max_seq_len,
        vocab_size=spec.capacity.vocab_size,
        has_draft=m.draft is not None,
        parameter_count=parameter_count(m),
        tpot_slo_ms=config.tpot_slo_ms or 0.0,
        ttft_slo_ms=config.ttft_slo_ms or 0.0,
        has_chat_template=spec.tokenizer.has_chat_template,
        drafter=spec.capacity.drafter or "",
        max_draft_len=spec.capacity.max_draft_len,
    )


def parameter_count(m: Manifest) -> int:
    """Parameters of the model from its shapes (norms and biases included)."""
    a = m.architecture
    q, kv = a.num_attention_heads * a.head_dim, a.num_kv_heads * a.head_dim
    attn = a.hidden_size * (q + 2 * kv) + q * a.hidden_size
    if a.attention_bias:
        attn += q + 2 * kv
    layer = attn + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size
    if a.family == "gemma3":  # query/key norms, and the norms after attention and the MLP
        layer += 2 * a.head_dim + 2 * a.hidden_size
    embed = a.vocab_size * a.hidden_size
    head = 0 if a.tie_word_embeddings else embed
    return embed + a.num_layers * layer + a.hidden_size + head
