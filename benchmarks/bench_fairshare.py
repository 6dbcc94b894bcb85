"""Fair share of the offline tier: how long tenant B's small batch job takes while tenant A's
large backlog, queued first, fills the offline tier, against the same job alone on an idle
server. Goal: with A's 10,000-request backlog queued first, B's 10-request job finishes
within 2x its time alone.

The server runs in this process with the scripted executor (tests.fakes: no model, one token
per running sequence per step) and a fixed time per step (``--step-ms``), so what is measured
is the scheduling, the job runner and the job store, on a clock the model does not make noisy.
Every request asks for a random 16-64 tokens (``ignore_eos``); B's job is submitted at several
moments into A's backlog (``--trials``), once the tier is saturated.

Baseline, same run: the previous offline queue (one FIFO for every tenant), by swapping the
scheduler's queue for a FifoQueue in this process.

    python -m benchmarks.bench_fairshare --backlog 10000 --small 10 --trials 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from client import BatchRequest, Client, SamplingParams
from server.app import serve_in_thread
from server.config import ServerConfig
from server.executor.base import Capacity
from server.scheduler import policy

GOAL = 2.0


@dataclass(frozen=True, slots=True)
class Trial:
    queue: str  # "fair" or "fifo"
    offset_s: float  # when B's job came, after A's
    seconds: float  # B's job: submit to its last result
    a_done: int  # A's requests finished when B's job was submitted


def requests(n: int, rng: random.Random, vocab: int) -> list[BatchRequest]:
    return [BatchRequest(token_ids=(1 + rng.randrange(vocab - 1), 1 + rng.randrange(vocab - 1)),
                         sampling=SamplingParams(max_tokens=rng.randint(16, 64), ignore_eos=True))
            for _ in range(n)]


def run_job(client: Client, tenant: str, reqs: list[BatchRequest]) -> float:
    """Submits a job and follows its results to the last; the seconds that took."""
    start = time.perf_counter()
    job = client.submit_batch(reqs, tenant=tenant)
    count = sum(1 for _ in client.results(job.id, tenant=tenant))
    assert count == len(reqs), (count, len(reqs))
    return time.perf_counter() - start


@contextlib.contextmanager
def server(engine: Path, args: argparse.Namespace, queue: str) -> Iterator[Client]:
    from engine_builder.manifest import Manifest
    from tests.fakes import ScriptedExecutor

    manifest = Manifest.load(engine)
    cap = Capacity(max_slots=args.slots, num_kv_blocks=1 << 16,
                   tokens_per_block=manifest.limits.tokens_per_block, max_tokens_per_step=1 << 20,
                   max_seq_len=manifest.limits.max_seq_len,
                   vocab_size=manifest.architecture.vocab_size)
    step_s = args.step_ms / 1000
    executor = ScriptedExecutor(cap, record=False, step_hook=lambda _: time.sleep(step_s))
    config = ServerConfig(engine=str(engine), port=0, metrics_port=-1, job_store=":memory:",
                          job_flush_ms=5.0, window_ms=2.0, offline_reserve=0.0)
    with _offline_queue(queue), serve_in_thread(config, executor=executor) as running, \
            Client(running.address, timeout=600) as client:
        yield client


@contextlib.contextmanager
def _offline_queue(kind: str) -> Iterator[None]:
    """``fifo``: the scheduler's offline queue is one FifoQueue for every tenant (baseline)."""
    original = policy.TierQueues.for_config
    if kind == "fifo":
        policy.TierQueues.for_config = classmethod(  # type: ignore[method-assign,assignment]
            lambda cls, config: cls(online=policy.DeadlineQueue(), offline=policy.FifoQueue()))
    try:
        yield
    finally:
        policy.TierQueues.for_config = original  # type: ignore[method-assign]


def trial(client: Client, args: argparse.Namespace, offset_s: float, queue: str,
          rng: random.Random, vocab: int) -> Trial:
    backlog = client.submit_batch(requests(args.backlog, rng, vocab), tenant="a")
    time.sleep(offset_s)
    a_done = client.get_batch(backlog.id, tenant="a").completed
    seconds = run_job(client, "b", requests(args.small, rng, vocab))
    client.cancel_batch(backlog.id, tenant="a")
    return Trial(queue, offset_s, seconds, a_done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fairshare", description=__doc__)
    p.add_argument("--backlog", type=int, default=10_000, help="tenant A's requests")
    p.add_argument("--small", type=int, default=10, help="tenant B's requests")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=4.0, help="time of one engine step")
    p.add_argument("--trials", type=int, default=3, help="B's job at this many moments")
    p.add_argument("--queues", nargs="+", choices=("fair", "fifo"), default=["fair", "fifo"])
    args = p.parse_args(argv)
    from engine_builder.tiny import build_tiny_engine

    engine = build_tiny_engine(Path(tempfile.mkdtemp(prefix="bench-fair-")) / "tiny")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; scripted executor, {args.slots} slots, "
          f"{args.step_ms:g} ms a step; A: {args.backlog} requests, B: {args.small}; "
          "16-64 tokens each")
    rng = random.Random(7)
    alone: list[float] = []
    trials: list[Trial] = []
    for queue in args.queues:
        with server(engine, args, queue) as client:
            vocab = client.list_models()[0].vocab_size
            alone.append(run_job(client, "b", requests(args.small, rng, vocab)))
            for i in range(args.trials):
                print(f"{queue}: trial {i + 1} ...", file=sys.stderr, flush=True)
                trials.append(trial(client, args, 1.0 + 1.5 * i, queue, rng, vocab))
            alone.append(run_job(client, "b", requests(args.small, rng, vocab)))
    base = statistics.median(alone)
    print(f"B alone on an idle offline tier: {', '.join(f'{s:.2f}' for s in alone)} s "
          f"(median {base:.2f} s)")
    print(f"{'queue':<6} {'B after A by':>12} {'A done then':>11} {'B seconds':>9} "
          f"{'x alone':>7}")
    for t in trials:
        print(f"{t.queue:<6} {t.offset_s:>11.1f}s {t.a_done:>11} {t.seconds:>9.2f} "
              f"{t.seconds / base:>7.2f}")
    fair = [t.seconds / base for t in trials if t.queue == "fair"]
    if fair:
        worst = max(fair)
        print(f"goal: B within {GOAL:g}x alone with A's backlog first: worst {worst:.2f}x, "
              f"median {statistics.median(fair):.2f}x -> {'PASS' if worst <= GOAL else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
