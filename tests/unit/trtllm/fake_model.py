"""The fake engines' "weights" and "GPU": a next-token model with real sampling semantics, and
a device whose memory KV pools take and give back (sources: see fake_bindings.py).

Sampling follows TensorRT-LLM's layers: unset top_k/top_p are topK=0 and topP=0.0
(``layers/defaultDecodingParams.h``), ``regularizeTopKTopP`` turns k=0, p=0 into k=1 (greedy)
and k>0, p=0 into p=1.0; temperature unset is 1.0 and the seed unset is 0. Greedy (k=1) picks
the model's most likely token; otherwise the token is drawn from a ranked distribution with a
generator seeded by (seed, position), so a seeded request is reproducible, different seeds
differ, and sampling is told apart from greedy by its output.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TOP_K = 0  # DefaultDecodingParams::getTopK()
DEFAULT_TOP_P = 0.0  # DefaultDecodingParams::getTopP()
DEFAULT_TEMPERATURE = 1.0
DEFAULT_SEED = 0


def regularize_top_k_top_p(top_k: int | None, top_p: float | None) -> tuple[int, float]:
    """``regularizeTopKTopP`` (kernels/samplingTopKKernels.h) over the unset defaults."""
    k = DEFAULT_TOP_K if top_k is None else top_k
    p = DEFAULT_TOP_P if top_p is None else top_p
    if k == 0 and p == 0.0:
        k = 1
    if k > 0 and p == 0.0:
        p = 1.0
    return k, p


@dataclass(frozen=True)
class Sampling:
    """A request's effective sampling after the engine's defaults and regularization."""

    top_k: int  # 1 = greedy, 0 = no top-k cut
    top_p: float
    temperature: float
    seed: int

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


@dataclass(frozen=True)
class FakeModel:
    """Next token from the context alone (greedy), or drawn around it (sampling)."""

    vocab_size: int
    low: int = 97  # tokens are drawn from [low, high): printable bytes in the tests' tokenizer
    high: int = 123
    salt: int = 0
    eos_every: int | None = None  # emit end_id when the context length is a multiple of this
    perturb_every: int | None = None  # a "draft" model: differs when len % perturb_every == 0

    def token(self, context: Sequence[int], end_id: int | None) -> int:
        """The greedy (most likely) token."""
        n = len(context)
        if self._eos_due(n, end_id):
            assert end_id is not None
            return end_id
        span = self.high - self.low
        t = self.low + (31 * context[-1] + 7 * n + self.salt) % span
        if self.perturb_every and n % self.perturb_every == 0:
            t = self.low + (t - self.low + 1) % span
        return t

    def sample(self, context: Sequence[int], end_id: int | None, sampling: Sampling) -> int:
        best = self.token(context, end_id)
        if sampling.greedy or self._eos_due(len(context), end_id):
            return best
        span = self.high - self.low
        ranked = [self.low + (best - self.low + r) % span for r in range(span)]
        weights = [math.exp(-r / max(sampling.temperature, 1e-6)) for r in range(span)]
        if sampling.top_k > 0:
            ranked, weights = ranked[:sampling.top_k], weights[:sampling.top_k]
        kept, total, mass = 0, sum(weights), 0.0
        while kept < len(weights) and mass < sampling.top_p * total:
            mass += weights[kept]
            kept += 1
        rng = random.Random(sampling.seed * 1_000_003 + len(context))
        return rng.choices(ranked[:kept], weights[:kept])[0]

    def _eos_due(self, n: int, end_id: int | None) -> bool:
        return bool(self.eos_every and end_id is not None and end_id >= 0
                    and n % self.eos_every == 0)


def model_token(model: FakeModel, context: Sequence[int], end_id: int | None) -> int:
    return model.token(context, end_id)


class FakeDevice:
    """One GPU's memory in units of KV blocks. An engine takes its weights plus
    ``free_gpu_memory_fraction`` of what is free after them; the bindings give it back when the
    executor object is destroyed (not at ``shutdown()``), the LLM API at ``LLM.shutdown()``."""

    def __init__(self, total_blocks: int = 1_000_000) -> None:
        self.total = total_blocks
        self.used = 0
        self._lock = threading.Lock()

    def allocate(self, weight_blocks: int, fraction: float, cap: int) -> int:
        """KV blocks for one engine (at most cap); RuntimeError when they do not fit."""
        with self._lock:
            free = self.total - self.used - weight_blocks
            kv_blocks = min(cap, int(fraction * free))
            if free <= 0 or kv_blocks < 1:
                raise RuntimeError("[TensorRT-LLM][ERROR] CUDA runtime error in cudaMalloc: "
                                   "out of memory (no room for the weights and the KV cache)")
            self.used += weight_blocks + kv_blocks
            return kv_blocks

    def release(self, blocks: int) -> None:
        with self._lock:
            self.used -= blocks


DEVICE = FakeDevice()
