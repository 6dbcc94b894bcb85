"""The load driver: online requests (open-loop arrivals or a closed loop of N workers) plus an
offline backlog, through one ``AsyncClient``, while sampling ``GetStats`` for slot occupancy.

Prompts are synthesized as token ids of the requested length (random ids within the vocabulary;
``ignore_eos`` holds each output to its length), so any engine replays any trace.

>>> spec = LoadSpec(duration_s=5, vocab_size=1000, concurrency=4,  # doctest: +SKIP
...                 lengths=(TraceRequest(0, 16, 8),), offline_backlog=100)
>>> result = await run_load(client, spec)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from client.aio import AsyncClient
from client.bench.trace import TraceRequest
from client.errors import BackfillError
from client.types import BatchRequest, BatchResult, SamplingParams, Tier

# Ids below this are often special tokens (BOS, EOS, chat markers) on real vocabularies.
_FIRST_PLAIN_ID = 100


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one request did, as the client saw it (batch results: as the server timed it)."""

    tier: Tier
    output_tokens: int
    ttft_s: float | None = None  # send to first token
    tpot_s: float | None = None  # mean time per output token after the first
    end_s: float | None = None  # seconds from the run's start
    error: str | None = None  # error class name; "cut" = cancelled at the end of the window
    waited_s: float | None = None  # send to end, for requests that never got a token
    server_ttft_s: float | None = None  # the server's own TTFT (arrival to first token)
    sent_s: float | None = None  # seconds from the run's start (batch results: unknown)
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class StatsSample:
    """One ``GetStats`` reading, seconds from the run's start."""

    t_s: float
    slots_total: int
    slots_busy: int
    online_running: int
    offline_running: int
    online_tokens: int  # generated since server start
    offline_tokens: int


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One run's load. ``online`` (open loop) and ``concurrency`` (closed loop) exclude each
    other; ``lengths`` feeds the closed loop and the offline backlog."""

    duration_s: float
    vocab_size: int
    online: tuple[TraceRequest, ...] = ()
    concurrency: int = 0
    lengths: tuple[TraceRequest, ...] = (TraceRequest(0.0, 16, 16),)
    offline_backlog: int = 0
    offline_lengths: tuple[TraceRequest, ...] = ()  # empty: drawn from ``lengths``
    offline_via: str = "session"  # "session" (streamed, client-timed) or "batch" (a batch job)
    deadline_s: float | None = None  # TTFT deadline of online requests
    sample_interval_s: float = 0.25
    drain_s: float = 30.0  # how long to wait for online requests still running at the end
    seed: int = 0
    model: str = ""

    def __post_init__(self) -> None:
        if self.online and self.concurrency:
            raise ValueError("give open-loop arrivals (online) or a concurrency, not both")
        if self.offline_via not in ("session", "batch"):
            raise ValueError(f"offline_via must be session or batch, got {self.offline_via!r}")
        if self.duration_s <= 0 or self.vocab_size <= 0:
            raise ValueError("duration_s and vocab_size must be > 0")

    @property
    def offline_pool(self) -> tuple[TraceRequest, ...]:
        return self.offline_lengths or self.lengths


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Everything a run measured; ``client.bench.report.summarize`` turns it into figures."""

    spec: LoadSpec
    window_s: float
    records: tuple[RequestRecord, ...]
    samples: tuple[StatsSample, ...] = field(default=())
    batch_job_id: str | None = None


def synth_prompt(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    low = _FIRST_PLAIN_ID if vocab_size > 2 * _FIRST_PLAIN_ID else 0
    return [rng.randrange(low, vocab_size) for _ in range(n)]


def _sampling(output_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)


class _Run:
    def __init__(self, client: AsyncClient, spec: LoadSpec) -> None:
        self.client = client
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.t0 = time.monotonic()
        self.records: list[RequestRecord] = []
        self.samples: list[StatsSample] = []
        self.window_over = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def one(self, tier: Tier, req: TraceRequest, deadline: float | None) -> None:
        """Streams one request and records its client-side TTFT and TPOT."""
        prompt = synth_prompt(self.rng, req.prompt_tokens, self.spec.vocab_size)
        sent = time.monotonic()
        first: float | None = None
        tokens = 0
        server_ttft: float | None = None
        stream = self.client.generate(
            token_ids=prompt,
            sampling=_sampling(req.output_tokens),
            tier=tier,
            deadline=deadline,
            model=self.spec.model,
        )
        error: str | None = None
        try:
            async for chunk in stream:
                if chunk.token_ids and first is None:
                    first = time.monotonic()
                tokens += len(chunk.token_ids)
                if chunk.timing is not None:
                    server_ttft = chunk.timing.ttft_s
        except BackfillError as exc:
            error = type(exc).__name__
        except asyncio.CancelledError:
            error = "cut"
        finally:
            await stream.aclose()
        end = time.monotonic()
        ttft = None if first is None else first - sent
        tpot = (end - first) / (tokens - 1) if first is not None and tokens > 1 else None
        waited = end - sent if first is None else None
        self.records.append(
            RequestRecord(tier, tokens, ttft, tpot, end - self.t0, error, waited, server_ttft,
                          sent - self.t0, req.prompt_tokens)
        )

    async def open_loop(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        for req in self.spec.online:
            delay = req.arrival_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.now() >= self.spec.duration_s:
                break
            tasks.append(asyncio.ensure_future(self.one(Tier.ONLINE, req, self.spec.deadline_s)))
        await _settle(tasks, self.spec.duration_s + self.spec.drain_s - self.now())

    async def closed_loop(self) -> None:
        async def worker() -> None:
            while self.now() < self.spec.duration_s:
                req = self.rng.choice(self.spec.lengths)
                await self.one(Tier.ONLINE, req, self.spec.deadline_s)

        workers = [asyncio.ensure_future(worker()) for _ in range(self.spec.concurrency)]
        await _settle(workers, self.spec.duration_s + self.spec.drain_s - self.now())

    async def offline_session(self) -> None:
        pool = self.spec.offline_pool
        tasks = [
            asyncio.ensure_future(self.one(Tier.OFFLINE, self.rng.choice(pool), None))
            for _ in range(self.spec.offline_backlog)
        ]
        await _settle(tasks, self.spec.duration_s - self.now())

    async def sample(self) -> None:
        while not self.window_over:
            try:
                stats = await self.client.stats()
            except BackfillError:
                return  # a server without GetStats: occupancy is reported as unknown
            on, off = stats.tier(Tier.ONLINE), stats.tier(Tier.OFFLINE)
            self.samples.append(
                StatsSample(
                    self.now(),
                    stats.slots_total,
                    stats.slots_busy,
                    on.running,
                    off.running,
                    on.generated_tokens,
                    off.generated_tokens,
                )
            )
            await asyncio.sleep(self.spec.sample_interval_s)


async def _settle(tasks: Sequence[asyncio.Task[None]], timeout_s: float) -> None:
    """Waits for the tasks up to timeout_s, then cancels the rest (each cancels its request)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout_s))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _batch_records(results: Sequence[BatchResult], t_end: float) -> list[RequestRecord]:
    records = []
    for r in results:
        n = r.usage.completion_tokens or len(r.token_ids)
        decode = r.timing.decode_s
        error = type(r.error).__name__ if r.error is not None else None
        if r.finish_reason is not None and r.finish_reason.value == "cancelled":
            error = "cut"
        tpot = decode / (n - 1) if decode is not None and n > 1 else None
        ttft = r.timing.ttft_s
        records.append(RequestRecord(Tier.OFFLINE, n, ttft, tpot, t_end, error, None, ttft,
                                     prompt_tokens=r.usage.prompt_tokens or None))
    return records


async def _offline_batch(run: _Run) -> tuple[str, list[RequestRecord]]:
    requests = []
    for i in range(run.spec.offline_backlog):
        req = run.rng.choice(run.spec.offline_pool)
        prompt = synth_prompt(run.rng, req.prompt_tokens, run.spec.vocab_size)
        requests.append(
            BatchRequest(id=f"b{i}", token_ids=tuple(prompt), sampling=_sampling(req.output_tokens))
        )
    job = await run.client.submit_batch(requests, labels={"source": "loadgen"})
    await asyncio.sleep(max(0.0, run.spec.duration_s - run.now()))
    await run.client.cancel_batch(job.id)
    results = [r async for r in run.client.results(job.id)]
    return job.id, _batch_records(results, run.now())


async def saturated_rate(
    client: AsyncClient,
    vocab_size: int,
    lengths: Sequence[TraceRequest],
    concurrency: int,
    seconds: float = 4.0,
) -> float:
    """Requests/s the server sustains for these lengths with ``concurrency`` always in flight:
    a short closed-loop probe's streamed tokens/s over the mean output length (counting tokens,
    not completed requests, so a probe shorter than one request still measures something)."""
    spec = LoadSpec(
        duration_s=seconds,
        vocab_size=vocab_size,
        concurrency=concurrency,
        lengths=tuple(lengths),
        sample_interval_s=seconds,
        drain_s=0.0,
    )
    result = await run_load(client, spec)
    tokens = sum(r.output_tokens for r in result.records)
    mean_output = sum(r.output_tokens for r in lengths) / max(1, len(lengths))
    return tokens / max(result.window_s, 1e-3) / max(mean_output, 1.0)


async def run_load(client: AsyncClient, spec: LoadSpec) -> LoadResult:
    """Runs one load for ``spec.duration_s`` and returns what it measured."""
    run = _Run(client, spec)
    sampler = asyncio.ensure_future(run.sample())
    online = run.closed_loop() if spec.concurrency else run.open_loop()
    job_id: str | None = None
    if spec.offline_backlog and spec.offline_via == "batch":
        batch = asyncio.ensure_future(_offline_batch(run))
        await online
        job_id, batch_records = await batch
        run.records.extend(batch_records)
    elif spec.offline_backlog:
        await asyncio.gather(online, run.offline_session())
    else:
        await online
    window = min(run.now(), spec.duration_s)
    run.window_over = True
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    samples = [s for s in run.samples if s.t_s <= spec.duration_s]
    return LoadResult(spec, window, tuple(run.records), tuple(samples), job_id)
