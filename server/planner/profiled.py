"""A real engine as the planner sees it: its manifest's limits and its profile's step-cost fit
(``python -m engine_builder profile``), for predicting what that engine does on this host."""

from __future__ import annotations

import math
from pathlib import Path

from engine_builder.manifest import Architecture, Manifest
from server.executor.base import Capacity
from server.planner.simulate import Engine
from server.slo_defaults import engine_step_cost


def profiled_engine(engine_dir: str | Path, *, jitter: float | None = None) -> Engine:
    """The engine in ``engine_dir`` as a planner ``Engine``. Its step durations and the
    scheduler's prior are both the profile's fit; ``jitter`` (log-normal sigma) defaults to
    the spread the fit left (its median relative error, as a sigma). ValueError for an engine
    without a profile."""
    path = Path(engine_dir)
    manifest = Manifest.load(path)
    cost = engine_step_cost(manifest)
    profile = manifest.profile
    if cost is None or profile is None:
        raise ValueError(
            f"{path}: the engine has no profile; run `python -m engine_builder profile {path}`"
        )
    arch, limits = manifest.architecture, manifest.limits
    capacity = Capacity(
        max_slots=limits.max_batch_size,
        num_kv_blocks=limits.num_kv_blocks,
        tokens_per_block=limits.tokens_per_block,
        max_tokens_per_step=limits.max_num_tokens,
        max_seq_len=min(limits.max_seq_len, arch.max_position_embeddings),
        vocab_size=arch.vocab_size,
    )
    if jitter is None:
        error = profile.step_cost.median_error if profile.step_cost is not None else 0.0
        # The median of |N(0, s)| is 0.674 s; relative errors are close to log errors here.
        jitter = error / 0.6745 if math.isfinite(error) else 0.0
    return Engine(
        label=f"{manifest.name} ({manifest.backend}, profiled on {profile.host})",
        capacity=capacity,
        model=cost,
        peak_tokens_per_s=profile.peak_tokens_per_s,
        gpus=1,
        follows_plans=manifest.backend == "cpu",
        prior=cost,
        jitter=jitter,
        layers=arch.num_layers,
        head_share=head_share(arch),
    )


def head_share(arch: Architecture) -> float:
    """The LM head's share of a decoder's matrix weights: what of a decode step is left when
    its last layer ends (measured on the default engine: 18-24% at 1-32 rows; this gives
    21%)."""
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    layer = arch.hidden_size * (2 * q + 2 * kv + 3 * arch.intermediate_size)
    head = arch.vocab_size * arch.hidden_size
    return head / (head + arch.num_layers * layer)
