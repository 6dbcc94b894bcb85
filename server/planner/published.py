"""The roofline's defaults checked against published measurements: NVIDIA's TensorRT-LLM
throughput table (docs/source/performance/perf-overview.md in NVIDIA/TensorRT-LLM, the
`trtllm-bench throughput` runs: FP8 Llama 3.1 8B and 3.3 70B checkpoints, every request
queued at once, output tokens/s). The planner simulates the same runs with its presets (the
Llama 3 shapes; FP8 weights and KV cache, as those checkpoints ship) and reports its
prediction beside each published figure."""

from __future__ import annotations

import dataclasses
import statistics

from client.bench.trace import TraceRequest
from server.planner.config import PlanConfig
from server.planner.report import Column, Row, Table
from server.planner.setup import deployment
from server.planner.simulate import Pool, Simulation, Workload

# (model, accelerator, tp) -> {(input tokens, output tokens): published output tokens/s}
PUBLISHED: dict[tuple[str, str, int], dict[tuple[int, int], float]] = {
    ("Llama-3-8B", "H100-SXM", 1): {(128, 128): 28312, (128, 2048): 22714,
                                    (1000, 1000): 15220, (2048, 128): 3450,
                                    (2048, 2048): 9305, (5000, 500): 3459},
    ("Llama-3-8B", "H200", 1): {(128, 128): 27911, (128, 2048): 26221, (1000, 1000): 17744,
                                (2048, 128): 3538, (2048, 2048): 12194, (5000, 500): 3902},
    ("Llama-3-70B", "H100-SXM", 2): {(128, 128): 6378, (128, 2048): 6651, (1000, 1000): 4205,
                                     (2048, 128): 762, (2048, 2048): 3082, (5000, 500): 898},
    ("Llama-3-70B", "H200", 1): {(128, 128): 3803, (128, 2048): 4336, (1000, 1000): 2909,
                                 (2048, 128): 442, (2048, 2048): 2003, (5000, 500): 566},
}
MAX_TOKENS_SIMULATED = 600_000  # requests per case: enough for a steady state, no more


def validate(cfg: PlanConfig) -> Table:
    rows: list[Row] = []
    for (model, acc, tp), cases in PUBLISHED.items():
        c = dataclasses.replace(cfg, model=model, accelerator=acc, weights="fp8",
                                kv_cache="fp8", max_batch_size=1024)
        d = dataclasses.replace(deployment(c, tp), kv_memory_fraction=0.95)
        engine = d.engine()
        for (isl, osl), published in cases.items():
            count = min(MAX_TOKENS_SIMULATED // (isl + osl),
                        4 * d.max_batch_at(isl + osl) + 50)
            work = Workload((), tuple(TraceRequest(0.0, isl, osl) for _ in range(count)),
                            duration_s=1.0, offline_until_done=True)
            sched = c.scheduler_config(None, None)
            result = Simulation(engine, Pool(scheduler=sched), work).run()
            predicted = count * osl / result.end_s
            rows.append({"preset": f"{model} fp8 on {tp} x {acc}", "isl_osl": f"{isl}/{osl}",
                         "published": published, "predicted": predicted,
                         "ratio": predicted / published})
    ratios = [float(r["ratio"]) for r in rows]  # type: ignore[arg-type]
    return Table(
        "The roofline against NVIDIA's published TensorRT-LLM throughput",
        (Column("preset", "preset"), Column("isl_osl", "in/out tokens"),
         Column("published", "published tok/s", ",.0f"),
         Column("predicted", "predicted tok/s", ",.0f"), Column("ratio", "ratio", ".2f")),
        rows,
        (f"median ratio {statistics.median(ratios):.2f}, range {min(ratios):.2f}-"
         f"{max(ratios):.2f}; efficiency factors: bandwidth {cfg.bandwidth_efficiency:g}, "
         f"compute {cfg.compute_efficiency:g}, step overhead {cfg.step_overhead_ms:g} ms, "
         f"all-reduce {cfg.allreduce_us:g} us; KV pool 95% of free memory as in those runs",),
    )
