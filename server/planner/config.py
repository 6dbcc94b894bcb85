"""The planner's configuration: what is simulated (an engine: a GPU preset or a profiled
engine directory), how it is scheduled, and the load. One frozen dataclass; the command-line
flags of ``python -m server.planner`` are generated from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from server.planner.presets import ACCELERATORS, KV_BYTES, MODELS, WEIGHT_FORMATS
from server.scheduler.config import SchedulerConfig

_SCHED = SchedulerConfig()
EXECUTORS = ("auto", "admission", "plans")


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """Everything the planner's commands share. Validated at construction (ValueError)."""

    # a profiled engine directory, "default" or a published model's name; "" = the GPU preset
    engine: str = ""
    accelerator: str = "H100-SXM"
    model: str = "Llama-3-70B"
    weights: str = "fp16"
    kv_cache: str = "fp16"
    tp: int = 0  # 0: the smallest of 1, 2, 4, 8 whose KV pool holds 32 sequences of 4K
    bandwidth_efficiency: float = 0.75
    compute_efficiency: float = 0.55
    step_overhead_ms: float = 1.5
    allreduce_us: float = 8.0
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    executor: str = "auto"
    price_per_gpu_hour: float = 2.0
    tpot_slo_ms: float = 0.0
    ttft_slo_ms: float = 0.0
    # 0: the TPOT SLO alone bounds a step with online work
    max_online_slowdown: float = _SCHED.max_online_slowdown or 0.0
    offline_reserve: float = _SCHED.offline_reserve
    window_ms: float = _SCHED.window_ms
    rate: float = 0.0  # online requests/s; 0: the trace's own rate
    duration_s: float = 0.0  # seconds of (scaled) trace; 0: all of it
    max_prompt_tokens: int = 0  # 0: the trace's lengths (clipped to the engine)
    max_output_tokens: int = 0
    offline_backlog: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.tp not in (0, 1, 2, 4, 8, 16):
            raise ValueError(f"tp must be 1, 2, 4, 8 or 16 (0: auto), got {self.tp}")
        for name in ("rate", "duration_s", "price_per_gpu_hour"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("max_prompt_tokens", "max_output_tokens", "offline_backlog"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_batch_size < 1 or self.max_num_tokens < 1:
            raise ValueError("max_batch_size and max_num_tokens must be >= 1")
        self.scheduler_config(None, None)  # validates the scheduler's fields

    def scheduler_config(self, tpot_ms: float | None, ttft_ms: float | None) -> SchedulerConfig:
        """The server's scheduler, with queue bounds no simulated load reaches (a planner
        measures overload as waiting, not as refusals)."""
        return SchedulerConfig(
            window_ms=self.window_ms,
            offline_reserve=self.offline_reserve,
            max_online_queue=10**7,
            max_offline_queue=10**8,
            tpot_slo_ms=tpot_ms,
            ttft_slo_ms=ttft_ms,
            max_online_slowdown=self.max_online_slowdown or None,
        )


_HELP: dict[str, str] = {
    "engine": "a profiled engine directory (or 'default', or a published model: "
    "gemma3-270m) to simulate instead of a GPU preset",
    "accelerator": "GPU preset",
    "model": "model preset",
    "weights": "weight format: fp16, weight-only int8/int4, w8a8 (INT8 math), fp8 (Hopper)",
    "kv_cache": "KV-cache format",
    "tp": "GPUs per replica (tensor parallel); 0 picks the smallest of 1/2/4/8 whose KV "
          "pool holds 32 sequences of 4K tokens",
    "bandwidth_efficiency": "achieved share of peak HBM bandwidth when memory-bound",
    "compute_efficiency": "achieved share of peak tensor-core FLOP/s when compute-bound",
    "step_overhead_ms": "fixed cost of every step (launches, scheduling, sampling)",
    "allreduce_us": "latency of one tensor-parallel all-reduce (two per layer)",
    "max_batch_size": "sequences per replica (the engine's slots)",
    "max_num_tokens": "tokens per step (prefill chunks and decodes)",
    "executor": "admission: the scheduler bounds offline work by admission (TensorRT-LLM); "
                "plans: the engine follows step plans (the CPU executor); auto: by engine",
    "price_per_gpu_hour": "price of one accelerator-hour, for cost per 1M tokens",
    "tpot_slo_ms": "online TPOT SLO that bounds offline work per step; 0 derives it like the "
                   "server (3x a lone decode step), < 0 none",
    "ttft_slo_ms": "online TTFT SLO (judged only); 0 derives it like the server, < 0 none",
    "max_online_slowdown": "a step that carries online work costs at most this many times "
                           "its online work alone (predicted); 0: the TPOT SLO alone",
    "offline_reserve": "fraction of slots kept for offline work",
    "window_ms": "the scheduler's collection window",
    "rate": "online requests/s (the trace sped up or slowed down); 0: the trace's own rate",
    "duration_s": "seconds of trace to replay (after rate scaling); 0: all of it",
    "max_prompt_tokens": "scale prompt lengths so the trace's p99 maps to this; 0: as given",
    "max_output_tokens": "scale output lengths so the trace's p99 maps to this; 0: as given",
    "offline_backlog": "offline requests waiting at the start (lengths drawn from the trace)",
    "seed": "random seed (prompts, offline lengths, jitter)",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "accelerator": tuple(ACCELERATORS), "model": tuple(MODELS),
    "weights": tuple(WEIGHT_FORMATS), "kv_cache": tuple(KV_BYTES), "executor": EXECUTORS,
}


def add_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """One ``--flag-name`` per PlanConfig field; ``defaults`` overrides a field's default
    for one command."""
    for f in dataclasses.fields(PlanConfig):
        default = defaults.get(f.name, f.default)
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
            default=default, choices=_CHOICES.get(f.name),
            help=f"{_HELP[f.name]} (default: {default if default != '' else 'none'})",
        )


def from_namespace(ns: argparse.Namespace) -> PlanConfig:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(PlanConfig)}
    return PlanConfig(**values)
