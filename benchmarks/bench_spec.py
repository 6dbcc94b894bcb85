"""Speculative decoding on the CPU engine: n-gram and draft-model drafters against plain decoding.

    python -m benchmarks.bench_spec [--rounds 2] [--max-tokens 128] [--json out.json]

Three parts, on the default engine (SmolLM2-135M-Instruct, fp32), each comparing its variants
in the same run, alternating their order (the machines here are shared and noisy: read the
ratios):

(a) Online, batch 1, through the scheduler and the executor (the server's path, n-gram
    drafter): every copy-heavy prompt (benchmarks/copy_prompts.py) as an online request left to
    the default policy (``auto``: it speculates when the step-cost model predicts a gain), and
    with ``num_speculative_tokens=0``. Time per output token from the scheduler's timing of each
    request; greedy tokens compared.
(b) Draft-target, batch 1, on the engine directly: drafts from the default model quantized to
    int8 and to int4 (k = 4), beside n-gram (k = 8) and plain decoding, on copy-heavy and
    general prompts: acceptance, time per token, and the share of it spent drafting.
(c) Offline backfill through the scheduler: a backlog of offline requests (copy-heavy and
    general) with the default policy, with speculation off, and with every request asking for
    4 drafted tokens; tokens/s of the whole backlog.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.copy_prompts import COPY_PROMPTS, GENERAL_PROMPTS
from engine_builder.default import ensure_default_engine
from engine_builder.manifest import Manifest
from engine_builder.step_cost import OnlineStepCost
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import ExecRequest, SamplingParams, StepPlan
from server.executor.cpu.blas import default_threads, set_thread_blas_threads
from server.executor.cpu.draft_model import open_draft_model
from server.executor.cpu.drafter import NgramDrafter
from server.executor.cpu.engine import CpuEngine
from server.executor.cpu.executor import CpuExecutor
from server.executor.cpu.open import build_engine
from server.executor.cpu.speculation import NGRAM_MAX_DRAFT_LEN, SpeculationConfig, Speculator
from server.scheduler import BackfillScheduler, SchedEvent, SchedRequest, SchedulerConfig, Tier
from server.slo_defaults import engine_step_cost

DRAFT_K = 4
DRAFT_KV_BLOCKS = 256  # the drafts' pool: batch-1 runs need a few hundred tokens


@dataclass(frozen=True, slots=True)
class Run:
    """One request: its tokens and what decoding them took."""

    tokens: tuple[int, ...]
    decode_s: float  # first token to last
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # speculative steps
    draft_s: float = 0.0

    @property
    def tpot_s(self) -> float:
        return self.decode_s / max(1, len(self.tokens) - 1)


def chat_ids(tokenizer: EngineTokenizer, text: str) -> tuple[int, ...]:
    messages = [{"role": "user", "content": text}]
    return tuple(tokenizer.encode_chat(messages, add_generation_prompt=True))


def aggregate_tpot(runs: list[Run]) -> float:
    """Decode time over decoded tokens, all runs together."""
    return sum(r.decode_s for r in runs) / max(1, sum(len(r.tokens) - 1 for r in runs))


# -- (a) online through the scheduler ------------------------------------------------------------


class Waiter:
    """A sink that keeps a request's events and says when its final one came."""

    def __init__(self) -> None:
        self.events: list[SchedEvent] = []
        self.done = threading.Event()

    def __call__(self, event: SchedEvent) -> None:
        self.events.append(event)
        if event.is_final:
            self.done.set()

    def run(self) -> Run:
        self.done.wait()
        final = self.events[-1]
        assert final.timing is not None and final.usage is not None, final
        tokens = tuple(t for e in self.events for t in e.token_ids)
        ttft = final.timing.ttft_seconds or final.timing.total_seconds
        u = final.usage
        return Run(tokens, final.timing.total_seconds - ttft, u.draft_tokens_proposed,
                   u.draft_tokens_accepted, u.speculative_steps)


def submit(sched: BackfillScheduler, ids: tuple[int, ...], k: int | None, tier: Tier,
           max_tokens: int) -> Waiter:
    waiter = Waiter()
    sampling = SamplingParams(max_tokens=max_tokens, num_speculative_tokens=k)
    sched.submit(SchedRequest(ids, sampling, tier), waiter)
    return waiter


def online(sched: BackfillScheduler, tokenizer: EngineTokenizer, rounds: int, max_tokens: int
           ) -> dict[str, dict[str, list[Run]]]:
    variants = {"auto": None, "off": 0}
    out: dict[str, dict[str, list[Run]]] = {v: {} for v in variants}
    for r in range(rounds):
        for i, (name, text) in enumerate(COPY_PROMPTS):
            ids = chat_ids(tokenizer, text)
            order = list(variants) if (i + r) % 2 == 0 else list(variants)[::-1]
            for v in order:
                run = submit(sched, ids, variants[v], Tier.ONLINE, max_tokens).run()
                out[v].setdefault(name, []).append(run)
    return out


def print_online(results: dict[str, dict[str, list[Run]]]) -> dict[str, object]:
    print("\n(a) online, batch 1, default policy (n-gram) vs no speculation")
    print(f"{'prompt':<10} {'tokens':>6} {'TPOT off':>9} {'TPOT auto':>10} {'speedup':>8} "
          f"{'accepted':>9} {'per step':>9} {'same':>5}")
    same_all = True
    for name, _ in COPY_PROMPTS:
        off, auto = results["off"][name], results["auto"][name]
        same = all(a.tokens == b.tokens for a, b in zip(off, auto, strict=True))
        same_all &= same
        prop, acc, steps = (sum(getattr(r, f) for r in auto) for f in
                            ("proposed", "accepted", "steps"))
        t_off = statistics.median(r.tpot_s for r in off)
        t_auto = statistics.median(r.tpot_s for r in auto)
        print(f"{name:<10} {len(off[0].tokens):>6} {1000 * t_off:>7.1f}ms {1000 * t_auto:>8.1f}ms "
              f"{t_off / t_auto:>7.2f}x {acc / max(prop, 1):>8.0%} {acc / max(steps, 1):>9.2f} "
              f"{'yes' if same else 'NO':>5}")
    off_s, auto_s = median_tpot(results["off"]), median_tpot(results["auto"])
    # Each request against the other variant's run of the same prompt in the same round.
    paired = statistics.median(
        a.tpot_s / b.tpot_s for name, _ in COPY_PROMPTS
        for a, b in zip(results["off"][name], results["auto"][name], strict=True))
    print(f"all prompts: TPOT {1000 * off_s:.1f} -> {1000 * auto_s:.1f} ms, "
          f"{off_s / auto_s:.2f}x faster (goal >= 1.5x; median of paired requests "
          f"{paired:.2f}x); greedy output identical: {'yes' if same_all else 'NO'}")
    return {"tpot_off_ms": 1000 * off_s, "tpot_auto_ms": 1000 * auto_s,
            "speedup": off_s / auto_s, "paired_median_speedup": paired, "identical": same_all}


def median_tpot(by_prompt: dict[str, list[Run]]) -> float:
    """Decode time over decoded tokens across the prompts, each prompt at its median round
    (a round that a busy neighbour slowed down does not weigh)."""
    seconds = sum(statistics.median(r.decode_s for r in runs) for runs in by_prompt.values())
    tokens = sum(len(runs[0].tokens) - 1 for runs in by_prompt.values())
    return seconds / max(1, tokens)


# -- (b) draft-target on the engine --------------------------------------------------------------


def _drafted(engine: CpuEngine) -> tuple[int, int, int, float]:
    """The engine's drafter totals: proposed, accepted, speculative steps, seconds."""
    stats = engine.speculator.stats()
    if not stats:
        return 0, 0, 0, 0.0
    return stats[0].proposed, stats[0].accepted, stats[0].steps, stats[0].seconds


def engine_run(engine: CpuEngine, rid: int, ids: tuple[int, ...], k: int,
               max_tokens: int) -> Run:
    engine.set_plan(StepPlan(draft_lens={rid: k} if k else {}))
    engine.add(ExecRequest(rid, ids, SamplingParams(max_tokens=max_tokens)), seed=0)
    before = _drafted(engine)
    tokens: list[int] = []
    first = last = 0.0
    while engine.has_work:
        engine.step()
        now = time.perf_counter()
        for delta in engine.drain():
            if delta.token_ids:
                first = first or now
                last = now
            tokens += delta.token_ids
    proposed, accepted, steps, seconds = (
        a - b for a, b in zip(_drafted(engine), before, strict=True)
    )
    return Run(tuple(tokens), last - first, int(proposed), int(accepted), int(steps), seconds)


def draft_target(engine: CpuEngine, manifest: Manifest, max_tokens: int
                 ) -> dict[str, dict[str, Run]]:
    max_seq_len = engine.batcher.limits.max_seq_len
    variants = {"plain": (Speculator(None, 0), 0),
                f"ngram k={NGRAM_MAX_DRAFT_LEN}": (Speculator(NgramDrafter(), NGRAM_MAX_DRAFT_LEN),
                                                   NGRAM_MAX_DRAFT_LEN)}
    for quant in ("int8", "int4"):
        drafter = open_draft_model(ensure_default_engine(quant=quant), manifest, max_seq_len,
                                   num_kv_blocks=DRAFT_KV_BLOCKS)
        variants[f"draft {quant} k={DRAFT_K}"] = (Speculator(drafter, DRAFT_K), DRAFT_K)
    prompts = [*COPY_PROMPTS[:3], *GENERAL_PROMPTS[:2]]
    out: dict[str, dict[str, Run]] = {v: {} for v in variants}
    rid = 1000
    for i, (name, text) in enumerate(prompts):
        ids = chat_ids(engine.tokenizer, text)
        names = list(variants)
        for v in names[i % len(names):] + names[: i % len(names)]:
            engine.speculator, k = variants[v]
            rid += 1
            out[v][name] = engine_run(engine, rid, ids, k, max_tokens)
    return out


def print_draft_target(results: dict[str, dict[str, Run]]) -> dict[str, object]:
    print("\n(b) draft-target at batch 1 (engine only), against plain decoding")
    copy = {name for name, _ in COPY_PROMPTS}
    print(f"{'drafter':<16} {'prompts':<8} {'accepted':>9} {'per step':>9} {'TPOT':>8} "
          f"{'vs plain':>9} {'drafting':>9} {'same':>5}")
    out: dict[str, object] = {}
    plain = results["plain"]
    for variant, runs in results.items():
        for kind in ("copy", "general"):
            names = [n for n in runs if (n in copy) == (kind == "copy")]
            rs = [runs[n] for n in names]
            prop, acc = sum(r.proposed for r in rs), sum(r.accepted for r in rs)
            steps = sum(r.steps for r in rs)
            tpot = aggregate_tpot(rs)
            speedup = aggregate_tpot([plain[n] for n in names]) / tpot
            share = sum(r.draft_s for r in rs) / max(sum(r.decode_s for r in rs), 1e-9)
            same = all(runs[n].tokens == plain[n].tokens for n in names)
            print(f"{variant:<16} {kind:<8} {acc / max(prop, 1):>8.0%} "
                  f"{acc / max(steps, 1):>9.2f} {1000 * tpot:>6.1f}ms {speedup:>8.2f}x "
                  f"{share:>8.0%} {'yes' if same else 'NO':>5}")
            out[f"{variant} {kind}"] = {"acceptance": acc / max(prop, 1), "speedup": speedup,
                                        "tpot_ms": 1000 * tpot, "draft_share": share,
                                        "identical": same}
    return out


# -- (c) offline backfill ------------------------------------------------------------------------


def offline(sched: BackfillScheduler, tokenizer: EngineTokenizer, rounds: int, max_tokens: int
            ) -> dict[str, list[tuple[float, float]]]:
    """Per variant and round: (tokens per wall second, tokens per CPU second of this process,
    which a loaded host disturbs less)."""
    variants = {"default policy": None, "off": 0, f"forced k={DRAFT_K}": DRAFT_K}
    prompts = [chat_ids(tokenizer, text) for _, text in (*COPY_PROMPTS, *GENERAL_PROMPTS)]
    out: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(rounds):
        names = list(variants)
        for v in names[r % len(names):] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            waiters = [submit(sched, ids, variants[v], Tier.OFFLINE, max_tokens)
                       for ids in prompts]
            runs = [w.run() for w in waiters]
            tokens = sum(len(run.tokens) for run in runs)
            out[v].append((tokens / (time.perf_counter() - wall),
                           tokens / (time.process_time() - cpu)))
    return out


def print_offline(results: dict[str, list[tuple[float, float]]], n: int) -> dict[str, object]:
    print(f"\n(c) offline backlog of {n} requests, by round: tokens per second (wall / CPU), "
          "and the ratios to 'off'")
    off = results["off"]
    out: dict[str, object] = {}
    for variant, rates in results.items():
        ratios = [(a[0] / b[0], a[1] / b[1]) for a, b in zip(rates, off, strict=True)]
        print(f"{variant:<16} " + "  ".join(f"{w:5.1f} / {c:5.1f}" for w, c in rates)
              + "   ratio " + "  ".join(f"{w:.2f} / {c:.2f}" for w, c in ratios))
        out[variant] = {"tokens_per_s": [w for w, _ in rates],
                        "tokens_per_cpu_s": [c for _, c in rates],
                        "median_ratio_wall": statistics.median(w for w, _ in ratios),
                        "median_ratio_cpu": statistics.median(c for _, c in ratios)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (a) and (c)")
    parser.add_argument("--max-tokens", type=int, default=128, help="per request in (a) and (b)")
    parser.add_argument("--offline-tokens", type=int, default=64, help="per request in (c)")
    parser.add_argument("--skip", default="", help="parts to skip, e.g. 'b' or 'bc'")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    threads = default_threads()
    set_thread_blas_threads(threads)
    path = ensure_default_engine()
    manifest = Manifest.load(path)
    print(f"host: {platform.node()} {platform.processor() or platform.machine()}, BLAS threads "
          f"{threads}; engine: default (SmolLM2-135M-Instruct, fp32); greedy; "
          f"step-cost prior: {'profile' if manifest.profile else 'none (learned online)'}")
    results: dict[str, object] = {"blas_threads": threads}
    tokenizer = EngineTokenizer.load(path, manifest)
    if "a" not in args.skip or "c" not in args.skip:
        engine, capacity = build_engine(path, manifest, SpeculationConfig(drafter="ngram"))
        executor = CpuExecutor(engine, capacity, blas_threads=threads)
        sched = BackfillScheduler(executor, SchedulerConfig(),
                                  step_cost=OnlineStepCost(engine_step_cost(manifest)))
        sched.start()
        try:
            warm = [submit(sched, chat_ids(tokenizer, t), 0, Tier.ONLINE, 24)
                    for _, t in GENERAL_PROMPTS]  # the step-cost model learns from these
            for w in warm:
                w.run()
            if "a" not in args.skip:
                results["online"] = print_online(online(sched, tokenizer, args.rounds,
                                                        args.max_tokens))
            if "c" not in args.skip:
                n = len(COPY_PROMPTS) + len(GENERAL_PROMPTS)
                rates = offline(sched, tokenizer, args.rounds, args.offline_tokens)
                results["offline"] = print_offline(rates, n)
        finally:
            sched.stop(0.0)
    if "b" not in args.skip:
        engine = build_engine(path, manifest, SpeculationConfig(drafter="none"))[0]
        results["draft_target"] = print_draft_target(draft_target(engine, manifest,
                                                                  args.max_tokens))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=asdict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
