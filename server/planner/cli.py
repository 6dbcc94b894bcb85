"""``python -m server.planner`` (``backfill-plan``): capacity questions answered by the real
backfill scheduler on simulated accelerators. Every figure it prints is simulated.

    backfill-plan batch-curve                      # the seed's batch-size table, per preset
    backfill-plan static-vs-continuous --gpus 8    # the seed's batching table on the trace
    backfill-plan split-vs-unified                 # 8 online + 4 offline GPUs vs 8 unified
    backfill-plan economics                        # utilization -> cost per 1M tokens
    backfill-plan right-size --ttft-p99-ms 2000 --tpot-p99-ms 60 --offline-backlog 20000
    backfill-plan replay --gpus 8 --duration-s 3600   # one run of a trace on a pool
    backfill-plan calibrate --measured bench.json  # predicted vs measured bench_scheduler
    backfill-plan validate                         # the roofline vs NVIDIA's published figures
    backfill-plan seed                             # every table of the seed, in one go
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from client.bench.command import add_trace_argument
from client.bench.trace import trace_label
from server.planner import batching, plots, pools
from server.planner.batching import figures
from server.planner.calibrate import BenchLoad, calibrate, measured_runs, read_bench_json
from server.planner.config import PlanConfig, add_arguments, from_namespace
from server.planner.profiled import profiled_engine
from server.planner.published import validate
from server.planner.report import Column, Row, Table, write_json
from server.planner.setup import build_engine, engine_path, offline_load, online_load, pool
from server.planner.simulate import Simulation, Workload

Command = Callable[[argparse.Namespace, PlanConfig], list[Table]]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_batch_curve(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    table = batching.batch_curve(cfg, _ints(ns.batch_sizes), _ints(ns.contexts))
    _plot(ns, plots.batch_curve, table)
    return [table]


def cmd_static_vs_continuous(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    table = batching.static_vs_continuous(cfg, ns.trace, ns.gpus, _floats(ns.loads),
                                          ns.static_batch, cfg.duration_s)
    _plot(ns, plots.static_vs_continuous, table)
    return [table]


def cmd_split_vs_unified(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    table, _ = pools.split_vs_unified(cfg, ns.trace, ns.online_gpus, ns.offline_gpus,
                                      ns.unified_gpus, ns.online_utilization,
                                      ns.offline_utilization, cfg.duration_s)
    _plot(ns, plots.pools, table)
    return [table]


def cmd_economics(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    table = pools.economics(cfg, ns.trace, ns.gpus, _floats(ns.loads), cfg.duration_s,
                            _floats(ns.prices))
    _plot(ns, plots.economics, table)
    return [table]


def cmd_right_size(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    table = pools.right_size(cfg, ns.trace, ns.ttft_p99_ms, ns.tpot_p99_ms, ns.max_gpus,
                             cfg.duration_s)
    _plot(ns, plots.right_size, table)
    return [table]


def cmd_replay(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    engine = build_engine(cfg)
    online = online_load(cfg, ns.trace)
    duration = cfg.duration_s or (max((r.arrival_s for r in online), default=0.0) + 1.0)
    work = Workload(online, offline_load(cfg, ns.trace, cfg.offline_backlog),
                    duration_s=duration, seed=cfg.seed)
    result = Simulation(engine, pool(cfg, engine, ns.gpus), work).run()
    row: Row = {"setup": f"{result.replicas} x {engine.gpus} GPUs", "requests": len(online)}
    cols = ("utilization", "occupancy", "tokens_per_s", "online_tokens_per_s",
            "offline_tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99",
            "cost_per_million", "wall_s")
    return [Table(
        f"Replay: {engine.label}",
        (Column("setup", "pool"), Column("requests", "online requests"),
         *(Column(c, c.replace("_", " "), "%" if c in ("utilization", "occupancy") else ".1f")
           for c in cols)),
        [row | figures(result)],
        (f"{trace_label(ns.trace)}: {duration:g} s; wall_s is how long the simulation took",),
    )]


def cmd_calibrate(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    if ns.measured:
        engine_dir, loads, rates = read_bench_json(ns.measured)
        measured = [measured_runs(r) for r in rates]
    else:
        engine_dir, measured = "default", []
        loads = [BenchLoad(rate=r, duration_s=ns.bench_duration, short_duration_s=ns.bench_short,
                           offline_backlog=ns.bench_backlog, trace=ns.trace)
                 for r in _floats(ns.rates)]
    engine = profiled_engine(engine_path(cfg.engine or engine_dir))
    tables = [t for i, load in enumerate(loads)
              for t in calibrate(engine, load, measured[i] if measured else None,
                                 [v for v in ns.host_speed_from.split(",") if v], ns.draws)]
    if measured:
        _plot(ns, plots.calibration, tables)
    return tables


def cmd_validate(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    return [validate(cfg)]


def cmd_seed(ns: argparse.Namespace, cfg: PlanConfig) -> list[Table]:
    """The seed's tables with their defaults: batch curve, static vs continuous, split vs
    unified, economics."""
    duration = cfg.duration_s
    tables = [batching.batch_curve(cfg, [1, 4, 8, 16, 32], [1024, 4096]),
              batching.static_vs_continuous(cfg, ns.trace, 8, [0.25, 0.5, 0.75], 16, duration)]
    tables.append(pools.split_vs_unified(cfg, ns.trace, 8, 4, 8, 0.2, 0.3, duration)[0])
    tables.append(pools.economics(cfg, ns.trace, 8, [0.1, 0.2, 0.4], duration, [2.0, 4.0]))
    if ns.plot:
        stem = Path(ns.plot)
        for table, draw in zip(tables, (plots.batch_curve, plots.static_vs_continuous,
                                        plots.pools, plots.economics), strict=True):
            draw(table, stem.with_name(f"{stem.stem}-{_slug(table.title)}{stem.suffix}"))
    return tables


def _slug(title: str) -> str:
    return title.split(":")[0].split("(")[0].strip().lower().replace(" ", "-")


def _plot(ns: argparse.Namespace, draw: Callable[..., bool], table: object) -> None:
    if ns.plot and not draw(table, ns.plot):
        print("--plot skipped: matplotlib is not installed (pip install '.[bench]')",
              file=sys.stderr)


COMMANDS: dict[str, tuple[Command, str, dict[str, float]]] = {
    "batch-curve": (cmd_batch_curve, "decode throughput and utilization by batch size", {}),
    "static-vs-continuous": (cmd_static_vs_continuous, "static against continuous batching",
                             {"duration_s": 600.0}),
    "split-vs-unified": (cmd_split_vs_unified, "N online + M offline GPUs vs K unified",
                         {"duration_s": 1200.0}),
    "economics": (cmd_economics, "utilization against cost per 1M tokens",
                  {"duration_s": 600.0}),
    "right-size": (cmd_right_size, "the smallest pool that meets given SLOs",
                   {"duration_s": 600.0}),
    "replay": (cmd_replay, "one trace replay on one pool", {}),
    "calibrate": (cmd_calibrate, "predict a bench_scheduler run (and compare)", {}),
    "validate": (cmd_validate, "the roofline against NVIDIA's published throughput", {}),
    "seed": (cmd_seed, "every table of the seed", {"duration_s": 600.0}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backfill-plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Capacity questions answered by the real backfill scheduler on simulated "
                    "accelerators; every figure is simulated.",
        epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, defaults) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text} (simulated)")
        add_arguments(p, **defaults)
        add_trace_argument(p)
        p.add_argument("--json-out", default=None, help="write the tables as JSON here")
        p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
        _extra(name, p)
    return parser


def _extra(name: str, p: argparse.ArgumentParser) -> None:
    if name == "batch-curve":
        p.add_argument("--batch-sizes", default="1,4,8,16,32")
        p.add_argument("--contexts", default="1024,4096", help="tokens each sequence holds")
    if name in ("static-vs-continuous", "economics", "replay"):
        p.add_argument("--gpus", type=int, default=8, help="accelerators in the pool")
    if name in ("static-vs-continuous", "economics"):
        p.add_argument("--loads", default="0.25,0.5,0.75" if name != "economics" else
                       "0.1,0.2,0.4", help="online rates as the utilization they would give")
    if name == "static-vs-continuous":
        p.add_argument("--static-batch", type=int, default=16, help="static batch size")
    if name == "economics":
        p.add_argument("--prices", default="2,4", help="$ per GPU-hour (the seed's A100 range)")
    if name == "split-vs-unified":
        p.add_argument("--online-gpus", type=int, default=8)
        p.add_argument("--offline-gpus", type=int, default=4)
        p.add_argument("--unified-gpus", type=int, default=8)
        p.add_argument("--online-utilization", type=float, default=0.2,
                       help="online rate as the online pool's utilization (unless --rate)")
        p.add_argument("--offline-utilization", type=float, default=0.3,
                       help="backlog as the offline pool's utilization over the period "
                            "(unless --offline-backlog)")
    if name == "right-size":
        p.add_argument("--ttft-p99-ms", type=float, required=True)
        p.add_argument("--tpot-p99-ms", type=float, required=True)
        p.add_argument("--max-gpus", type=int, default=64)
    if name == "calibrate":
        p.add_argument("--measured", default=None,
                       help="bench_scheduler --json-out file: predict its runs and compare")
        p.add_argument("--rates", default="1.5", help="without --measured: rates to predict")
        p.add_argument("--bench-duration", type=float, default=200.0)
        p.add_argument("--bench-short", type=float, default=60.0)
        p.add_argument("--bench-backlog", type=int, default=3200)
        p.add_argument("--draws", type=int, default=5,
                       help="simulate each variant this many times (other step-time jitter) "
                            "and take each figure's median")
        p.add_argument("--host-speed-from", default="offline-only,offline-only+slo",
                       help="with --measured, also predict with the host's speed taken from "
                            "these variants' measured tokens/s ('' for none)")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        cfg = from_namespace(ns)
        tables = COMMANDS[ns.command][0](ns, cfg)
    except ValueError as exc:
        print(f"backfill-plan {ns.command}: {exc}", file=sys.stderr)
        return 2
    for table in tables:
        print(table.format())
        print()
    if ns.json_out:
        write_json(tables, ns.json_out, command=ns.command, trace=trace_label(ns.trace),
                   config={k: getattr(cfg, k) for k in PlanConfig.__dataclass_fields__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
