"""Right-sizing: all-small, all-large and ``model=auto`` on a mixed prompt set, in one server.

    python -m benchmarks.bench_routing [--rounds 2] [--concurrency 8] [--per-kind 16]
        [--threshold 0.8] [--price-per-hour 2.0] [--json FILE]

One server (``python -m server``, a process of its own, one thread per engine) serves the two
published models as ``source`` engines: the small one, SmolLM2-135M-Instruct (Q4_1), and the
large one, Gemma 3 270M (Q4_K_M), with ``--route-policy cascade --cascade-threshold
THRESHOLD`` (0.8 by default: on this set the server's default, 0.5, escalates nothing, and
the real run would be the small model's). The prompt set
(benchmarks/routing_prompts.py) has four kinds of short tasks with checkable answers; every
request is a greedy text completion of at most 6 tokens, stopped at a newline, sent on the
ONLINE tier with ``--concurrency`` in flight. Each round runs the variants in turn (the order
rotates between rounds): ``small`` (every request names the small model), ``large`` and
``auto`` (the cascade). Per variant:

- accuracy, by kind and overall;
- cost per 1M completion tokens and per 1k requests: the price per hour times the CPU time
  the server process used during the run (every thread: engines, scheduler, front end; from
  /proc; each engine runs one thread, so the price is that of one core-hour), over what the
  callers received. The engines' busy time (the sum of their step times,
  ``backfill_step_seconds_sum{model}``) is recorded too, but it is not the cost: when both
  engines step at once they contend for the GIL and the cores, each step's wall time grows,
  and the sum counts the overlap twice;
- online latency: time to first token and end to end, p50 and p99.

Then the cascade's trade-off over thresholds, estimated from the ``small`` and ``large`` runs
of the last round (the small model's confidence comes with its answers; an escalated request
adds the ``large`` run's CPU time shared by computed tokens), so one real ``auto`` run checks
one point of a curve computed without re-running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from benchmarks.routing_prompts import KINDS, Item, is_correct, prompt_set
from client.bench.local_server import LocalServer
from engine_builder.default import ensure_engine
from engine_builder.fetch import DEFAULT_MODEL, GEMMA3_270M

SMALL, LARGE = DEFAULT_MODEL.name, GEMMA3_270M.name
MAX_TOKENS = 6
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)


@dataclass(slots=True)
class Answer:
    item: Item
    text: str
    model: str
    completion_tokens: int
    computed_tokens: int  # prompt + completion, in the serving model's tokens
    confidence: float  # geometric mean token probability of the answer (from its logprobs)
    ttft_s: float
    e2e_s: float

    @property
    def correct(self) -> bool:
        return is_correct(self.item, self.text)


@dataclass(slots=True)
class Run:
    variant: str
    answers: list[Answer]
    cpu_s: float  # CPU time of the server process during the run (all its threads)
    busy_s: dict[str, float]  # engine busy seconds during the run, by model
    wall_s: float
    served_by: dict[str, int] = field(default_factory=dict)

    def accuracy(self, kind: str | None = None) -> float:
        chosen = [a for a in self.answers if kind is None or a.item.kind == kind]
        return sum(a.correct for a in chosen) / len(chosen)

    def cost_per_million(self, price: float) -> float:
        tokens = sum(a.completion_tokens for a in self.answers)
        return price / 3600 * self.cpu_s / tokens * 1e6

    def cost_per_thousand_requests(self, price: float) -> float:
        return price / 3600 * self.cpu_s / len(self.answers) * 1e3

    def latency(self, attr: str, q: float) -> float:
        return float(np.percentile([getattr(a, attr) for a in self.answers], q))


async def ask(stub: pb_grpc.InferenceServiceStub, item: Item, model: str) -> Answer:
    req = pb.GenerateRequest(model=model, text=item.prompt, sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, stop=["\n"], logprobs=0))
    start = time.monotonic()
    text, served, logprobs, first, last = [], "", [], None, None
    async for chunk in stub.Generate(req):
        if first is None and (chunk.token_ids or chunk.text):
            first = time.monotonic() - start
        served = served or chunk.model
        text.append(chunk.text)
        logprobs += [lp.logprob for lp in chunk.logprobs]
        last = chunk
    assert last is not None
    e2e = time.monotonic() - start
    conf = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
    return Answer(item, "".join(text), served, last.usage.completion_tokens,
                  last.usage.prompt_tokens + last.usage.completion_tokens, conf,
                  e2e if first is None else first, e2e)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid so far (Linux /proc), all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def busy(metrics_url: str) -> dict[str, float]:
    """Each engine's busy seconds so far: the sum of its step times."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {SMALL: 0.0, LARGE: 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "backfill_step_seconds":
            for sample in family.samples:
                if sample.name == "backfill_step_seconds_sum":
                    out[sample.labels["model"]] = sample.value
    return out


async def run_variant(server: LocalServer, metrics_url: str, items: list[Item], variant: str,
                      concurrency: int) -> Run:
    model = {"small": SMALL, "large": LARGE, "auto": "auto"}[variant]
    before, start = busy(metrics_url), time.monotonic()
    cpu_before = cpu_seconds(server.proc.pid)
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def one(item: Item) -> Answer:
            async with gate:
                return await ask(stub, item, model)

        answers = list(await asyncio.gather(*(one(i) for i in items)))
    wall = time.monotonic() - start
    after, cpu = busy(metrics_url), cpu_seconds(server.proc.pid) - cpu_before
    run = Run(variant, answers, cpu, {m: after[m] - before[m] for m in after}, wall)
    for a in answers:
        run.served_by[a.model] = run.served_by.get(a.model, 0) + 1
    return run


def cascade_curve(small: Run, large: Run, price: float) -> list[dict[str, float]]:
    """Accuracy and cost of the cascade at each threshold, from the two single-model runs."""
    large_by_prompt = {a.item.prompt: a for a in large.answers}
    large_tokens = sum(a.computed_tokens for a in large.answers)
    large_cpu_per_token = large.cpu_s / large_tokens
    rows = []
    for t in THRESHOLDS:
        correct, cpu_s, tokens, escalated = 0, small.cpu_s, 0, 0
        for a in small.answers:
            if a.confidence >= t:
                correct += a.correct
                tokens += a.completion_tokens
                continue
            big = large_by_prompt[a.item.prompt]
            escalated += 1
            correct += big.correct
            tokens += big.completion_tokens
            cpu_s += big.computed_tokens * large_cpu_per_token
        n = len(small.answers)
        rows.append({"threshold": t, "escalated": escalated / n, "accuracy": correct / n,
                     "cost_per_1k_requests": price / 3600 * cpu_s / n * 1e3,
                     "cost_per_1m_tokens": price / 3600 * cpu_s / tokens * 1e6})
    return rows


def print_runs(runs: list[Run], price: float) -> None:
    print(f"\n| variant | accuracy | {' | '.join(KINDS)} | cost / 1M tokens | cost / 1k requests"
          " | served by | TTFT p50 / p99 | e2e p50 / p99 | wall | server CPU | engines busy |")
    print("|---" * (11 + len(KINDS)) + "|")
    for r in runs:
        kinds = " | ".join(f"{r.accuracy(k):.0%}" for k in KINDS)
        served = ", ".join(f"{m} {n}" for m, n in sorted(r.served_by.items()))
        print(f"| {r.variant} | {r.accuracy():.1%} | {kinds} | ${r.cost_per_million(price):.2f} "
              f"| ${r.cost_per_thousand_requests(price):.3f} | {served} "
              f"| {r.latency('ttft_s', 50) * 1e3:.0f} / {r.latency('ttft_s', 99) * 1e3:.0f} ms "
              f"| {r.latency('e2e_s', 50) * 1e3:.0f} / {r.latency('e2e_s', 99) * 1e3:.0f} ms "
              f"| {r.wall_s:.1f} s | {r.cpu_s:.1f} s | {sum(r.busy_s.values()):.1f} s |")


def print_curve(rows: list[dict[str, float]], large: Run, price: float) -> None:
    base_acc, base_cost = large.accuracy(), large.cost_per_thousand_requests(price)
    print("\nThe cascade by threshold (estimated from the small and large runs):")
    print("| threshold | escalated | accuracy | vs all-large accuracy | cost / 1k requests "
          "| vs all-large cost |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = r["accuracy"] / base_acc if base_acc else float("nan")
        print(f"| {r['threshold']:.2f} | {r['escalated']:.0%} | {r['accuracy']:.1%} | "
              f"{acc:.2f}x | ${r['cost_per_1k_requests']:.3f} | "
              f"{r['cost_per_1k_requests'] / base_cost:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--per-kind", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--price-per-hour", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("BACKFILL_CPU_THREADS", "1")
    engines = (f"{SMALL}={ensure_engine(DEFAULT_MODEL, quant='source')}",
               f"{LARGE}={ensure_engine(GEMMA3_270M)}")
    items = prompt_set(args.per_kind)
    print(f"host {platform.node()} ({os.cpu_count()} cores), {len(items)} prompts "
          f"({args.per_kind} per kind), {args.concurrency} in flight, cascade threshold "
          f"{args.threshold}, ${args.price_per_hour}/h, one thread per engine")
    metrics_port = _free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rounds: list[list[Run]] = []
    variants = ["small", "large", "auto"]
    with LocalServer(engines[0], "--engine", engines[1], "--metrics-port", str(metrics_port),
                     "--job-store", ":memory:", "--route-policy", "cascade",
                     "--cascade-threshold", str(args.threshold),
                     "--price-per-hour", str(args.price_per_hour)) as server:
        # Warm-up: the first steps of each engine, and the prompts into the prefix caches
        # (so every variant of every round finds them there).
        for v in variants:
            asyncio.run(run_variant(server, metrics_url, items, v, args.concurrency))
        for r in range(args.rounds):
            order = variants[r % 3:] + variants[: r % 3]
            runs = {v: asyncio.run(run_variant(server, metrics_url, items, v, args.concurrency))
                    for v in order}
            rounds.append([runs[v] for v in variants])
            print(f"\nround {r + 1} (order {', '.join(order)}):")
            print_runs(rounds[-1], args.price_per_hour)
    small, large, auto = rounds[-1]
    curve = cascade_curve(small, large, args.price_per_hour)
    print_curve(curve, large, args.price_per_hour)
    print(f"\nauto (real run, threshold {args.threshold}) vs all-large: accuracy "
          f"{auto.accuracy() / large.accuracy():.2f}x, cost per 1k requests "
          f"{auto.cost_per_thousand_requests(args.price_per_hour) / large.cost_per_thousand_requests(args.price_per_hour):.2f}x, "  # noqa: E501
          f"cost per 1M tokens {auto.cost_per_million(args.price_per_hour) / large.cost_per_million(args.price_per_hour):.2f}x")  # noqa: E501
    if args.json is not None:
        out = {"rounds": [[{"variant": r.variant, "accuracy": r.accuracy(),
                            "by_kind": {k: r.accuracy(k) for k in KINDS},
                            "cpu_s": r.cpu_s, "busy_s": r.busy_s, "wall_s": r.wall_s,
                            "cost_per_1m_tokens": r.cost_per_million(args.price_per_hour),
                            "answers": [asdict(a) for a in r.answers]} for r in rs]
                          for rs in rounds], "curve": curve}
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    raise SystemExit(main())
