"""Batch jobs at scale and what durability costs. Two parts, each a table:

``size``: one job of ``--requests`` OpenAI-format chat lines (100,000 lines, about 50 MB, by
default) uploaded from a file, run, and its results streamed back to a file, against a server
whose executor is the scripted fake (no model: the job machinery is what is measured). Reports
throughput and the resident memory (RSS) of the server above its idle level, and of the client.
Goal: the server grows by less than 200 MB.

``persist``: offline tokens/s of the same job with the durable SQLite store against the
in-memory store, alternating which runs first, ``--rounds`` times, on the tiny engine's real CPU
executor and on the scripted one (where the engine costs nothing, so persistence weighs most).
tokens/s is the job's completion tokens over its server-side run time (first request sent to
last result committed). Goal: SQLite costs <= 5% (ratio >= 0.95, median round).

    python -m benchmarks.bench_jobs                         # both parts, default sizes
    python -m benchmarks.bench_jobs --part size --requests 20000
    python -m benchmarks.bench_jobs --part persist --rounds 5 --json-out jobs.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.bench_frontend import process_cpu_s
from client.aio import AsyncClient
from client.batch_io import ResultFiles
from client.bench.local_server import LocalServer
from client.types import JobState

GOAL_RSS_MB = 200.0
GOAL_RATIO = 0.95
PROMPT = ("Summarize the following note in one short sentence, keeping every name and number "
          "exactly as written. ")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples a process's RSS on a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb(self.pid))


def write_openai_file(path: Path, n: int, line_bytes: int) -> int:
    """n chat lines of about line_bytes each (max_tokens 1); returns the file's size."""
    filler = PROMPT * (line_bytes // len(PROMPT) + 1)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            line = {"custom_id": f"req-{i:07d}", "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "auto", "max_tokens": 1,
                             "messages": [{"role": "user", "content": f"#{i}: "}]}}
            room = max(0, line_bytes - len(json.dumps(line)) - 1)
            line["body"]["messages"][0]["content"] += filler[:room]  # type: ignore[index]
            f.write(json.dumps(line) + "\n")
    return path.stat().st_size


MODULES = {"cpu": "server", "scripted": "benchmarks.scripted_server"}


def build_engine(into: Path) -> Path:
    from engine_builder.tiny import build_tiny_engine

    return build_tiny_engine(into / "tiny")


# ---- size -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizeResult:
    requests: int
    input_mb: float
    upload_s: float
    run_s: float  # upload done → last result written by the client
    results: int
    failed: int
    server_idle_mb: float
    server_peak_mb: float
    client_idle_mb: float
    client_peak_mb: float
    store_mb: float

    @property
    def server_growth_mb(self) -> float:
        return self.server_peak_mb - self.server_idle_mb


async def run_size(engine: Path, n: int, line_bytes: int, work: Path) -> SizeResult:
    path = work / "input.jsonl"
    size = write_openai_file(path, n, line_bytes)
    store = work / "jobs.db"
    with LocalServer(engine, "--metrics-port", "-1", "--job-store", str(store),
                     module=MODULES["scripted"]) as server:
        await asyncio.sleep(2.0)  # idle: loaded, nothing queued
        server_rss = PeakRss(server.proc.pid)
        client_rss = PeakRss(os.getpid())
        idle = (server_rss.peak, client_rss.peak)
        async with AsyncClient(server.address) as client:
            start = time.monotonic()
            job = await client.submit_batch(path)
            uploaded = time.monotonic()
            print(f"uploaded {size / 1e6:.1f} MB in {uploaded - start:.1f}s; running",
                  file=sys.stderr, flush=True)
            count = 0
            with ResultFiles(job.id, work / "out.jsonl", work / "out.errors.jsonl") as files:
                async for result in client.results(job.id):
                    files.write(result)
                    count += 1
            done = time.monotonic()
            final = await client.get_batch(job.id)
        peaks = (server_rss.stop(), client_rss.stop())
    assert final.state is JobState.COMPLETED, final
    return SizeResult(n, size / 1e6, uploaded - start, done - uploaded, count, final.failed,
                      idle[0], peaks[0], idle[1], peaks[1],
                      sum(p.stat().st_size for p in work.glob("jobs.db*")) / 1e6)


def size_table(r: SizeResult) -> str:
    ok = r.server_growth_mb < GOAL_RSS_MB
    return "\n".join([
        f"{'requests':>9} {'input MB':>9} {'upload s':>9} {'MB/s':>6} {'run+stream s':>12} "
        f"{'req/s':>7} {'server RSS idle→peak MB':>24} {'client RSS idle→peak MB':>24} "
        f"{'store MB':>9}",
        f"{r.requests:>9} {r.input_mb:>9.1f} {r.upload_s:>9.1f} {r.input_mb / r.upload_s:>6.1f} "
        f"{r.run_s:>12.1f} {r.results / r.run_s:>7.0f} "
        f"{f'{r.server_idle_mb:.0f} → {r.server_peak_mb:.0f} (+{r.server_growth_mb:.0f})':>24} "
        f"{f'{r.client_idle_mb:.0f} → {r.client_peak_mb:.0f}':>24} {r.store_mb:>9.1f}",
        f"goal: server RSS grows < {GOAL_RSS_MB:.0f} MB: {'PASS' if ok else 'FAIL'} "
        f"({r.results} results, {r.failed} failed)",
    ])


# ---- persist ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistRun:
    executor: str
    store: str  # "memory" | "sqlite"
    round: int
    tokens: int
    seconds: float
    server_cpu_s: float  # the server process's CPU time (user + system) over the job

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_ms_per_ktok(self) -> float:
        return self.server_cpu_s / self.tokens * 1e6


async def one_job(address: str, n: int, max_tokens: int, vocab: int) -> tuple[int, float]:
    lines = [{"id": f"p{i}", "token_ids": [(i * 7) % (vocab - 1) + 1, (i * 13) % (vocab - 1) + 1],
              "max_tokens": max_tokens, "ignore_eos": True} for i in range(n)]
    async with AsyncClient(address) as client:
        job = await client.submit_batch(lines)
        async for state in client.watch(job.id, interval_s=0.05):
            job = state
    assert job.state is JobState.COMPLETED and job.started_at and job.finished_at, job
    return job.completion_tokens, job.finished_at - job.started_at


def run_persist(engine: Path, args: argparse.Namespace, work: Path) -> list[PersistRun]:
    runs = []
    sizes = {"cpu": (args.cpu_requests, 16), "scripted": (args.scripted_requests, 4)}
    for executor in args.executor:
        n, max_tokens = sizes[executor]
        for rnd in range(args.rounds):
            order = ("memory", "sqlite") if rnd % 2 == 0 else ("sqlite", "memory")
            for store in order:
                path = ":memory:" if store == "memory" else str(work / f"{executor}-{rnd}.db")
                flags = ("--metrics-port", "-1", "--job-store", path)
                with LocalServer(engine, *flags, module=MODULES[executor]) as server:
                    cpu = process_cpu_s(server.proc.pid)
                    tokens, seconds = asyncio.run(one_job(server.address, n, max_tokens, 250))
                    cpu = process_cpu_s(server.proc.pid) - cpu
                run = PersistRun(executor, store, rnd, tokens, seconds, cpu)
                print(f"{executor} round {rnd} {store}: {run.tokens_per_s:.0f} tokens/s",
                      file=sys.stderr, flush=True)
                runs.append(run)
    return runs


def persist_table(runs: list[PersistRun]) -> str:
    rows = [f"{'executor':<9} {'round':>5} {'memory tok/s':>13} {'sqlite tok/s':>13} "
            f"{'sqlite/memory':>13} {'server CPU ms/1k tok, memory → sqlite':>38}"]
    verdicts = []
    for executor in dict.fromkeys(r.executor for r in runs):
        ratios, cpu_ratios = [], []
        for rnd in sorted({r.round for r in runs if r.executor == executor}):
            by = {r.store: r for r in runs if r.executor == executor and r.round == rnd}
            mem, sql = by["memory"], by["sqlite"]
            ratios.append(sql.tokens_per_s / mem.tokens_per_s)
            cpu_ratios.append(sql.cpu_ms_per_ktok / mem.cpu_ms_per_ktok)
            cpu = f"{mem.cpu_ms_per_ktok:.0f} → {sql.cpu_ms_per_ktok:.0f}"
            rows.append(f"{executor:<9} {rnd:>5} {mem.tokens_per_s:>13.0f} "
                        f"{sql.tokens_per_s:>13.0f} {ratios[-1]:>13.3f} {cpu:>38}")
        median = statistics.median(ratios)
        verdicts.append(f"{executor}: median sqlite/memory tokens/s {median:.3f} "
                        f"({'PASS' if median >= GOAL_RATIO else 'FAIL'} >= {GOAL_RATIO}); "
                        f"median server CPU per token {statistics.median(cpu_ratios):.3f}x")
    return "\n".join([*rows, *verdicts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_jobs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=("size", "persist"), default=["size", "persist"])
    p.add_argument("--requests", type=int, default=100_000, help="size: lines in the job")
    p.add_argument("--line-bytes", type=int, default=520, help="size: bytes per line")
    p.add_argument("--rounds", type=int, default=5, help="persist: alternating rounds")
    p.add_argument("--executor", nargs="+", choices=("cpu", "scripted"),
                   default=["cpu", "scripted"], help="persist: executors")
    p.add_argument("--cpu-requests", type=int, default=4000, help="persist: job size, cpu")
    p.add_argument("--scripted-requests", type=int, default=20000,
                   help="persist: job size, scripted")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; client and server in separate processes; engine: the "
          "tiny random Llama (32 slots on the cpu executor, 256 on the scripted one)")
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = Path(tmp)
        engine = build_engine(work)
        if "size" in args.part:
            size = asyncio.run(run_size(engine, args.requests, args.line_bytes, work))
            print(size_table(size))
            out["size"] = asdict(size) | {"server_growth_mb": size.server_growth_mb}
        if "persist" in args.part:
            runs = run_persist(engine, args, work)
            print(persist_table(runs))
            out["persist"] = [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in runs]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
