"""Wiring: engines → executors → schedulers → the API surfaces (the gRPC servicer with health
and reflection, and the OpenAI-compatible HTTP app), /metrics, plus a graceful drain. Each
engine is served with an executor, KV pool, scheduler (step-cost model, SLOs) and figures of its
own; with several, ``model=auto`` goes through the router (server/routing/).
``BackfillServer`` runs on the caller's event loop; ``serve_in_thread`` gives sync code (tests,
CLIs, benchmarks) a server on its own loop in a daemon thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry

from backfill.transport import check_max_message_mb, message_options
from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from engine_builder.manifest import Manifest
from engine_builder.step_cost import OnlineStepCost
from engine_builder.tokenizer import EngineTokenizer
from server.api.grpc.guard import add_reflection
from server.api.grpc.service import InferenceServicer
from server.api.http.app import HttpServer, build_app
from server.api.http.files import FileStore
from server.api.models import ModelRegistry, ModelSpec, ServedModel
from server.config import ServerConfig
from server.executor.base import Executor
from server.jobs import JobRunner, Jobs, files_path, open_store
from server.metrics import MetricsEndpoint, ModelState, RequestMetrics, StateCollector
from server.quotas import TenantQuotas
from server.routing.router import Router, RouterMetrics
from server.scheduler import BackfillScheduler
from server.security.setup import Security, load_security
from server.slo_defaults import Slos, engine_step_cost, resolve_slos
from server.stats import BusyShares, ServerStatsCollector
from server.step_metrics import StepMetrics
from server.tenant_metrics import TenantMetrics

log = logging.getLogger("server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
SAMPLE_INTERVAL_S = 0.5  # how often the rolling windows sample the scheduler
FLUSH_GRACE_S = 1.0  # after the scheduler stops: time for final responses to reach clients
# grpc core parks calls that arrive before the aio server asks for the next one (it asks one at a
# time) and, past 1,000 parked calls (its default), drops new ones at random with a bare
# CANCELLED "CANCELLED" that the servicer never sees and nothing logs: a burst of ~1,000 unary
# Generate calls lost a few. Admission control belongs to the scheduler's queue bounds
# (RESOURCE_EXHAUSTED with a reason), so the parking lot only guards memory here.
MAX_PENDING_CALLS = 65_536
GRPC_SERVER_OPTIONS = (
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
)


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What a graceful stop left undone."""

    elapsed_seconds: float
    unfinished_offline: int  # OFFLINE requests that ended with outcome SHUTDOWN
    # (job id, requests of it left in the job store): they run after the next start
    unfinished_by_job: tuple[tuple[str, int], ...]


def _make_scheduler(
    config: ServerConfig, manifest: Manifest, executor: Executor, name: str
) -> BackfillScheduler:
    """The scheduler with the engine's step-cost model and the SLOs resolved for it."""
    prior = engine_step_cost(manifest)
    slos = resolve_slos(config.tpot_slo_ms, config.ttft_slo_ms, prior, executor.capacity)
    sched_config = config.scheduler_config(slos.tpot_ms, slos.ttft_ms)
    scheduler = BackfillScheduler(executor, sched_config, step_cost=OnlineStepCost(prior))
    _log_slos(scheduler, slos, name)
    return scheduler


def _log_slos(scheduler: BackfillScheduler, slos: Slos, name: str) -> None:
    config = scheduler.config
    slowdown = config.max_online_slowdown
    log.info(
        "%s: online SLOs: TPOT %s, TTFT %s (%s); offline work may slow a step with online "
        "work %s",
        name,
        "none" if config.tpot_slo_ms is None else f"{config.tpot_slo_ms:g} ms",
        "none" if config.ttft_slo_ms is None else f"{config.ttft_slo_ms:g} ms",
        slos.how,
        "without bound" if config.tpot_slo_ms is None else "up to the TPOT SLO"
        if slowdown is None else f"to {slowdown:g}x, within the TPOT SLO",
    )
    planner = scheduler.planner
    reserve = config.reserve_slots(scheduler.capacity.max_slots)
    if planner is None or config.policy != "backfill":
        return
    if not planner.cost.calibrated:
        log.info("the step budget starts once the step-cost model has seen a few steps")
        return
    log.info(
        "offline reserve: %d slots; each computes whenever the step budget has room and at "
        "least every %.0f ms, the TPOT SLO notwithstanding (up to %.1f ms more in such a "
        "step, predicted)",
        reserve,
        1000 * planner.reserve_period_s,
        1000 * planner.reserve_cost_s(reserve, 128),
    )


def split_engine(entry: str) -> tuple[str | None, str]:
    """``[NAME=]SOURCE`` -> (NAME or None, SOURCE)."""
    name, sep, source = entry.partition("=")
    return (name, source) if sep and name and "/" not in name else (None, entry)


class BackfillServer:
    """A running server. Build it with ``await BackfillServer.start(config)``."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        models: ModelRegistry,
        servicer: InferenceServicer,
        jobs: Jobs,
        runner: JobRunner,
        health: HealthServicer,
        stats: dict[str, ServerStatsCollector],
        port: int,
        metrics: MetricsEndpoint | None,
        http: HttpServer | None = None,
        files: FileStore | None = None,
        security: Security | None = None,
    ) -> None:
        self.config = config
        self.models = models
        self.scheduler = models.default.scheduler  # the default model's
        self.model_stats = stats  # by model name
        self.stats = stats[models.default.name]  # the default model's
        self._grpc = grpc_server
        self._servicer = servicer
        self._jobs = jobs
        self._runner = runner
        self._health = health
        self._metrics = metrics
        self._http = http
        self._files = files
        self.security = security
        self.port = port
        self.address = f"{config.host}:{port}"
        self.http_port: int | None = None if http is None else http.port
        self.http_address: str | None = (
            None if http is None else f"{config.host}:{http.port}"
        )
        self.metrics_url: str | None = metrics.url if metrics is not None else None
        self._sampler = asyncio.ensure_future(self._sample_forever())
        self._stopping: asyncio.Future[DrainReport] | None = None

    @classmethod
    async def start(
        cls, config: ServerConfig, *, executor: Executor | None = None
    ) -> BackfillServer:
        """Loads the engines config.engine names (manifests and tokenizers; the executors too,
        except the first engine's when one is given, which tests do) and starts serving."""
        models: list[ServedModel] = []
        try:
            for index, entry in enumerate(config.engine):
                given = executor if index == 0 else None
                models.append(await _start_model(config, entry, given))
            names = [m.name for m in models]
            if len(set(names)) != len(names):
                raise ValueError(f"two engines are called the same in {names}: name them "
                                 "with --engine NAME=SOURCE")
            return await cls._serve(config, models)
        except BaseException:
            await asyncio.gather(*(asyncio.to_thread(m.scheduler.stop, 0.0) for m in models))
            raise

    @classmethod
    async def _serve(cls, config: ServerConfig, served: list[ServedModel]) -> BackfillServer:
        registry = CollectorRegistry()
        router = None
        if len(served) > 1:
            router = Router(served, config.router_config(), RouterMetrics(registry))
            log.info("model auto: %s policy, small %s, large %s", config.route_policy,
                     router.small.name, router.large.name)
        models = ModelRegistry(served, router)
        request_metrics = RequestMetrics(registry)
        tenants = TenantMetrics(registry, config.metrics_max_tenants)
        security = await asyncio.to_thread(load_security, config, tenants)
        stats = _model_stats(config, served, registry)
        jobs_config = config.jobs_config()
        store = await asyncio.to_thread(open_store, jobs_config)
        auth = security.auth
        runner = JobRunner(store, models, request_metrics, jobs_config,
                           asyncio.get_running_loop(), tenants=tenants,
                           weight=lambda tenant: auth.limits(tenant).weight)
        quotas = TenantQuotas(runner.pending)
        jobs = Jobs(store, runner, models, jobs_config, quotas)
        servicer = InferenceServicer(models, jobs, request_metrics,
                                     {name: c.stats for name, c in stats.items()}, auth=auth,
                                     quotas=quotas, tenants=tenants)
        metrics = None
        http = files = None
        try:
            await runner.start()
            if config.metrics_enabled:
                metrics = MetricsEndpoint(registry, config.host, config.metrics_port)
            grpc_server, health, port = await _start_grpc(config, servicer, security, tenants)
            if config.http_enabled:
                files = FileStore(files_path(jobs_config))
                app = build_app(models, jobs, files, request_metrics,
                                lambda: not servicer.draining, auth=auth, quotas=quotas,
                                tenants=tenants,
                                max_body_bytes=check_max_message_mb(config.max_message_mb))
                ssl_context = None if security.tls is None else security.tls.http_context()
                http = await HttpServer.start(app, config.host, config.http_port, ssl_context)
            for watcher in security.watchers:
                watcher.start()
        except BaseException:
            if metrics is not None:
                metrics.close()
            await runner.close()
            await jobs.close()  # releases the store's lock for the next try
            raise
        return cls(
            config=config,
            models=models,
            servicer=servicer,
            jobs=jobs,
            runner=runner,
            health=health,
            stats=stats,
            port=port,
            metrics=metrics,
            grpc_server=grpc_server,
            http=http,
            files=files,
            security=security,
        )

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            for collector in self.model_stats.values():
                await asyncio.to_thread(collector.sample)

    async def stop(self, grace_s: float | None = None) -> DrainReport:
        """Graceful drain: refuse new work (UNAVAILABLE, health NOT_SERVING), give running
        ONLINE requests up to grace_s to finish, end the rest, report unfinished OFFLINE work.
        Idempotent: later calls return the first call's report."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain(grace_s))
        return await asyncio.shield(self._stopping)

    async def _drain(self, grace_s: float | None) -> DrainReport:
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        started = time.monotonic()
        self._servicer.draining = True
        self._runner.stop_feeding()
        for model in self.models:
            model.scheduler.begin_drain()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.security is not None:
            for watcher in self.security.watchers:
                await watcher.close()
        log.info("draining: waiting up to %.1fs for running online requests", grace)
        stopped = await asyncio.gather(
            *(asyncio.to_thread(m.scheduler.stop, grace) for m in self.models))
        unfinished = [rid for ids in stopped for rid in ids]
        await self._runner.flush()  # job reads keep working until the gRPC server stops
        left = await self._jobs.unfinished()
        await self._grpc.stop(FLUSH_GRACE_S)
        if self._http is not None:
            await self._http.stop()
        if self._files is not None:
            self._files.close()
        await self._runner.close()
        await self._jobs.close()
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        if self._metrics is not None:
            self._metrics.close()
        report = DrainReport(
            elapsed_seconds=time.monotonic() - started,
            unfinished_offline=len(unfinished),
            unfinished_by_job=tuple(sorted(left)),
        )
        _log_report(report)
        return report

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()


async def _start_model(config: ServerConfig, entry: str,
                       executor: Executor | None) -> ServedModel:
    """One engine of config.engine, its executor and scheduler started."""
    name, source = split_engine(entry)
    from engine_builder.default import resolve_engine

    engine_dir = await asyncio.to_thread(resolve_engine, source)
    manifest = Manifest.load(engine_dir)
    tokenizer = EngineTokenizer.load(engine_dir, manifest)
    if executor is None:
        from server.executor.factory import load_executor

        executor = await asyncio.to_thread(
            load_executor, engine_dir, speculation=config.speculation_config()
        )
    name = name or manifest.name
    scheduler = _make_scheduler(config, manifest, executor, name)
    scheduler.start()
    return ServedModel(ModelSpec(name, manifest, tokenizer, scheduler.capacity), scheduler)


def _model_stats(config: ServerConfig, models: list[ServedModel],
                 registry: CollectorRegistry) -> dict[str, ServerStatsCollector]:
    """Each model's figures (the price split by busy time), exported with a model label."""
    step_metrics = StepMetrics(registry)
    shares = BusyShares() if len(models) > 1 else None
    stats: dict[str, ServerStatsCollector] = {}
    for m in models:
        m.scheduler.set_step_observer(step_metrics.observer(m.name))
        profile = m.spec.manifest.profile
        stats[m.name] = ServerStatsCollector(
            m.scheduler.snapshot,
            m.scheduler.executor_stats,
            peak_tokens_per_s=profile.peak_tokens_per_s if profile is not None else None,
            price_per_hour=config.price_per_hour,
            model=m.name,
            shares=shares,
        )
        stats[m.name].sample()  # the baseline of the first window
    registry.register(StateCollector([
        ModelState(m.name, stats[m.name].stats, m.spec.capacity.tokens_per_block)
        for m in models]))
    return stats


async def _start_grpc(
    config: ServerConfig, servicer: InferenceServicer, security: Security,
    tenants: TenantMetrics,
) -> tuple[grpc.aio.Server, HealthServicer, int]:
    """The gRPC server with the service, health and reflection, listening (over TLS when
    configured)."""
    grpc_server = grpc.aio.server(
        options=(*GRPC_SERVER_OPTIONS, *message_options(config.max_message_mb)),
    )
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, grpc_server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    add_reflection(
        grpc_server,
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
        security.auth,
        tenants,
    )
    address = f"{config.host}:{config.port}"
    if security.tls is None:
        port = grpc_server.add_insecure_port(address)
    else:
        port = grpc_server.add_secure_port(address, security.tls.grpc_credentials())
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await grpc_server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return grpc_server, health, port


def _log_report(report: DrainReport) -> None:
    log.info(
        "drained in %.2fs; %d offline requests unfinished",
        report.elapsed_seconds,
        report.unfinished_offline,
    )
    for job_id, count in report.unfinished_by_job:
        log.info("  batch job %s: %d requests kept in the job store for the next start",
                 job_id, count)


class ServerThread:
    """A BackfillServer on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig, executor: Executor | None) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: BackfillServer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(config, executor), name="backfill-server", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._server is not None
        self.server: BackfillServer = self._server
        self.address: str = self._server.address
        self.metrics_url: str | None = self._server.metrics_url
        self.http_address: str | None = self._server.http_address

    def _run(self, config: ServerConfig, executor: Executor | None) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                BackfillServer.start(config, executor=executor)
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self, grace_s: float | None = None) -> DrainReport:
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop)
        report = future.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        return report

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop(grace_s=0.0)


def serve_in_thread(config: ServerConfig, *, executor: Executor | None = None) -> ServerThread:
    """Starts a server on its own loop in a daemon thread; returns once it is listening."""
    return ServerThread(config, executor)
