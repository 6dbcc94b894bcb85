"""The server's one configuration object; the CLI flags of ``python -m server`` are generated
from its fields, so every default exists exactly once (here)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backfill.transport import DEFAULT_MAX_MESSAGE_MB, check_max_message_mb
from server.executor.cpu.speculation import DRAFTER_CHOICES, SpeculationConfig
from server.jobs.config import JobsConfig
from server.routing.config import CONFIDENCE_MEASURES, RouterConfig
from server.routing.config import POLICIES as ROUTE_POLICIES
from server.scheduler.config import (
    POLICIES,
    PREEMPTION_MODES,
    SPECULATION_MODES,
    SchedulerConfig,
)
from server.security.tls import TlsFiles
from server.tenant_metrics import DEFAULT_MAX_TENANTS

# The scheduler's and the job store's knobs are flat fields here (one flag each) whose defaults
# and validation come from their own configs, so they exist once.
_SCHED = SchedulerConfig()
_JOBS = JobsConfig()
_ROUTER = RouterConfig()
_SPEC = SpeculationConfig()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``python -m server`` can be told. Validated at construction (ValueError)."""

    # The engines to serve, each "[NAME=]SOURCE": SOURCE an engine directory, "default" or a
    # published model's name (fetched and built on first use); NAME, the model name requests
    # use (default: the manifest's). The first is the default model. A str is one engine.
    engine: tuple[str, ...] = ("default",)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    metrics_port: int = 9400  # 0 = any free port; -1 = no metrics endpoint
    # The OpenAI-compatible HTTP surface: 0 = any free port; -1 (the default) = none. Off
    # unless asked for, so a server opens no port it was not told to (8000 is vLLM's).
    http_port: int = -1
    window_ms: float = _SCHED.window_ms  # the scheduler's collection window W
    offline_reserve: float = _SCHED.offline_reserve  # fraction of slots kept for OFFLINE work
    preemption: str = _SCHED.preemption  # recompute | off
    policy: str = _SCHED.policy  # backfill | fcfs (the benchmark baseline)
    max_online_queue: int = _SCHED.max_online_queue
    max_offline_queue: int = _SCHED.max_offline_queue
    price_per_hour: float = 0.0  # accelerator price, for the cost per 1M tokens
    drain_grace_s: float = 30.0  # how long a drain waits for running ONLINE requests
    # Online SLOs (server/slo_defaults.py): > 0 in milliseconds, 0 derived from the engine's
    # profile, < 0 none. The TPOT SLO bounds the offline work in each step.
    tpot_slo_ms: float = 0.0
    ttft_slo_ms: float = 0.0
    # A step with ONLINE work costs at most this many times its ONLINE work alone; 0: no bound
    max_online_slowdown: float = _SCHED.max_online_slowdown or 0.0
    speculation: str = _SCHED.speculation  # auto | off: speculative decoding by policy
    drafter: str = _SPEC.drafter  # the CPU engine's drafter: auto | ngram | draft | none
    max_draft_len: int = _SPEC.max_draft_len  # 0: the drafter's default
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB  # largest gRPC message received or sent
    job_store: str = _JOBS.store  # "" = $BACKFILL_HOME/jobs.db; ":memory:" = nothing kept
    job_max_in_flight: int = _JOBS.max_in_flight
    job_completion_window_s: float = _JOBS.completion_window_s
    job_retention_s: float = _JOBS.retention_s
    job_flush_ms: float = _JOBS.flush_ms
    # TLS (both surfaces) from PEM files; with tls_client_ca, clients must present a
    # certificate signed by it (mTLS). All "" = plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # The keys file (server/security/keys.py); set = authentication on: every call but
    # health needs an API key or a mapped client certificate, whose tenant it acts for.
    auth_keys: str = ""
    reload_s: float = 2.0  # how often the keys and certificate files are checked for changes
    metrics_max_tenants: int = DEFAULT_MAX_TENANTS  # tenants with a metrics label of their own
    # model=auto (server/routing/), with two or more engines
    route_policy: str = _ROUTER.policy
    route_small: str = _ROUTER.small
    route_large: str = _ROUTER.large
    route_max_prompt_tokens: int = _ROUTER.max_prompt_tokens
    route_max_new_tokens: int = _ROUTER.max_new_tokens
    cascade_threshold: float = _ROUTER.cascade_threshold
    cascade_confidence: str = _ROUTER.cascade_confidence

    def __post_init__(self) -> None:
        if isinstance(self.engine, str):
            object.__setattr__(self, "engine", (self.engine,))
        if not self.engine or not all(self.engine):
            raise ValueError("engine must name an engine directory, 'default' or a published "
                             "model")
        self.router_config()  # validates the router's fields
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [-1, 65535], got {self.http_port}")
        self.scheduler_config()  # validates the scheduler's fields
        self.jobs_config()  # and the job store's
        self.speculation_config()  # and the CPU engine's drafter
        if self.max_online_queue < 1:
            raise ValueError(f"max_online_queue must be >= 1, got {self.max_online_queue}")
        if self.max_offline_queue < 1:
            raise ValueError(f"max_offline_queue must be >= 1, got {self.max_offline_queue}")
        if not (math.isfinite(self.price_per_hour) and self.price_per_hour >= 0):
            raise ValueError(f"price_per_hour must be >= 0, got {self.price_per_hour}")
        if not (math.isfinite(self.drain_grace_s) and self.drain_grace_s >= 0):
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        for name in ("tpot_slo_ms", "ttft_slo_ms"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a number of milliseconds, 0 or < 0")
        check_max_message_mb(self.max_message_mb)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if not (math.isfinite(self.reload_s) and self.reload_s > 0):
            raise ValueError(f"reload_s must be > 0, got {self.reload_s}")
        if self.metrics_max_tenants < 0:
            raise ValueError(f"metrics_max_tenants must be >= 0, got {self.metrics_max_tenants}")

    def scheduler_config(
        self, tpot_slo_ms: float | None = None, ttft_slo_ms: float | None = None
    ) -> SchedulerConfig:
        """The scheduler's part of this config (ValueError when out of range), with the SLOs
        resolved for the engine (server/slo_defaults.py)."""
        return SchedulerConfig(
            window_ms=self.window_ms,
            offline_reserve=self.offline_reserve,
            preemption=self.preemption,
            policy=self.policy,
            max_online_queue=self.max_online_queue,
            max_offline_queue=self.max_offline_queue,
            tpot_slo_ms=tpot_slo_ms,
            ttft_slo_ms=ttft_slo_ms,
            max_online_slowdown=self.max_online_slowdown or None,
            speculation=self.speculation,
        )

    def router_config(self) -> RouterConfig:
        """The router's part of this config (ValueError when out of range)."""
        return RouterConfig(
            policy=self.route_policy,
            small=self.route_small,
            large=self.route_large,
            max_prompt_tokens=self.route_max_prompt_tokens,
            max_new_tokens=self.route_max_new_tokens,
            cascade_threshold=self.cascade_threshold,
            cascade_confidence=self.cascade_confidence,
        )

    def speculation_config(self) -> SpeculationConfig:
        """The CPU engine's drafter (ValueError when out of range)."""
        return SpeculationConfig(drafter=self.drafter, max_draft_len=self.max_draft_len)

    def jobs_config(self) -> JobsConfig:
        """The job store's part of this config (ValueError when out of range)."""
        return JobsConfig(
            store=self.job_store,
            max_in_flight=self.job_max_in_flight,
            completion_window_s=self.job_completion_window_s,
            retention_s=self.job_retention_s,
            flush_ms=self.job_flush_ms,
        )

    def tls_files(self) -> TlsFiles | None:
        if not self.tls_cert:
            return None
        return TlsFiles(Path(self.tls_cert), Path(self.tls_key),
                        Path(self.tls_client_ca) if self.tls_client_ca else None)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_keys)

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port >= 0

    @property
    def http_enabled(self) -> bool:
        return self.http_port >= 0


_HELP: dict[str, str] = {
    "engine": "an engine to serve, [NAME=]SOURCE: an engine directory, 'default' or a "
    "published model (gemma3-270m, smollm2-135m-instruct: fetched and built on first use); "
    "repeat it to serve several (the first is the default model, model=auto routes among "
    "them); NAME is what requests call it (default: the manifest's name)",
    "host": "address to bind (gRPC, HTTP and metrics)",
    "port": "gRPC port; 0 picks a free one (printed as 'listening on HOST:PORT')",
    "metrics_port": "Prometheus /metrics port; 0 picks a free one, -1 turns it off",
    "http_port": "OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions, "
    "/v1/models, /v1/files, /v1/batches, /health), e.g. 8000; 0 picks a free one (printed as "
    "'http on HOST:PORT'), -1 turns it off",
    "window_ms": "scheduler collection window W, in milliseconds",
    "offline_reserve": "fraction of batch slots kept for OFFLINE work",
    "preemption": "preempt OFFLINE sequences for ONLINE ones by recompute, or never",
    "policy": "two-tier backfill, or one FCFS queue (the benchmark baseline)",
    "max_online_queue": "queued ONLINE requests before RESOURCE_EXHAUSTED",
    "max_offline_queue": "queued OFFLINE requests before RESOURCE_EXHAUSTED",
    "price_per_hour": "accelerator price per hour, for the cost per 1M tokens",
    "drain_grace_s": "on SIGTERM, seconds running ONLINE requests get to finish",
    "tpot_slo_ms": "ONLINE time per output token that bounds the OFFLINE work in each step; "
    "0 derives it from the engine's profile, < 0 turns the bound off",
    "ttft_slo_ms": "ONLINE time to first token (attainment metrics); 0 derives it from the "
    "engine's profile, < 0 none",
    "max_online_slowdown": "with the TPOT SLO: a step that carries ONLINE work is planned to "
    "cost at most this many times what its ONLINE work alone would (predicted), e.g. 1.2; 0: "
    "the TPOT SLO alone bounds it",
    "speculation": "speculative decoding for requests that do not set num_speculative_tokens: "
    "'auto' for ONLINE requests when the step-cost model predicts a gain at the current batch "
    "(never OFFLINE), 'off' only where a request asks",
    "drafter": "what proposes the drafted tokens (cpu engines): 'auto' is the engine's draft "
    "model when it was built with --draft, else n-gram prompt lookup; 'none' turns "
    "speculative decoding off",
    "max_draft_len": "drafted tokens per step, at most; 0: the draft engine's max_draft_len, "
    "or 7 for n-gram lookup",
    "max_message_mb": "largest gRPC message, in MiB, received or sent (a batch submit is one "
                      "message); clients should use the same limit",
    "job_store": "SQLite file of the durable batch job store ('' = $BACKFILL_HOME/jobs.db; "
    "':memory:' keeps jobs in memory only)",
    "job_max_in_flight": "batch job requests handed to the scheduler at once (the rest wait "
    "in the store)",
    "job_completion_window_s": "seconds a batch job has to finish before it expires, unless "
    "it sets its own",
    "job_retention_s": "seconds a finished batch job is kept before it is deleted",
    "job_flush_ms": "finished batch results are written to the store at least this often",
    "tls_cert": "PEM certificate chain: serve gRPC and HTTP over TLS (reloaded when it changes)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA certificates: clients must present a certificate signed by one "
    "(mTLS); its name may map to a tenant in --auth-keys",
    "auth_keys": "keys file (create it with 'python -m server keys add'): authentication on, "
    "API keys and client certificates map to tenants with weights and quotas; reloaded when "
    "it changes. Unset: no authentication (the request names its tenant)",
    "reload_s": "seconds between checks of the keys and certificate files for changes",
    "metrics_max_tenants": "tenants that get a metrics label of their own; the rest are "
    "counted as '(other)'",
    "route_policy": "how model=auto picks an engine: 'rule' (hints, prompt length, max "
    "tokens) or 'cascade' (the small model answers; when unsure, the large one instead)",
    "route_small": "the router's small model ('' = the served model with the fewest parameters)",
    "route_large": "the router's large model ('' = the one with the most parameters)",
    "route_max_prompt_tokens": "rule: prompts longer than this go to the large model",
    "route_max_new_tokens": "rule: requests that may generate more tokens than this go to the "
    "large model",
    "cascade_threshold": "cascade: the confidence (a probability) below which the large model "
    "answers instead of the small one",
    "cascade_confidence": "cascade: 'mean' (geometric mean token probability of the answer) or "
    "'min' (its least likely token)",
}
# Choices of the string fields that take one of a fixed set.
_CHOICES: dict[str, tuple[str, ...]] = {
    "preemption": PREEMPTION_MODES,
    "policy": POLICIES,
    "speculation": SPECULATION_MODES,
    "drafter": DRAFTER_CHOICES,
    "route_policy": ROUTE_POLICIES,
    "cascade_confidence": CONFIDENCE_MEASURES,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag-name`` per ServerConfig field, typed and defaulted from the field."""
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is tuple:  # a repeatable flag; its default applies when it is never given
            parser.add_argument(flag, dest=f.name, action=_Repeated, default=f.default,
                                help=f"{_HELP[f.name]} (default: {' '.join(f.default)})")  # type: ignore[arg-type]
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=f.default,
            choices=_CHOICES.get(f.name),
            help=f"{_HELP[f.name]} (default: {f.default})",
        )


def from_namespace(ns: argparse.Namespace) -> ServerConfig:
    """The config a parsed command line describes (ValueError when a value is out of range)."""
    values: dict[str, Any] = {f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerConfig)}
    return ServerConfig(**values)


class _Repeated(argparse.Action):
    """A flag given once per value, collected into a tuple that replaces the default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest)
        given = () if given is self.default else given
        setattr(namespace, self.dest, (*given, values))
