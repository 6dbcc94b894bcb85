"""The PNG of each planner answer, drawn from its table's rows."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from server.planner.calibrate import FIGURES
from server.planner.report import Panel, Table, plot

Path = str | os.PathLike[str]


def _by(rows: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return groups


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[Any], list[Any]]:
    kept = [r for r in rows if isinstance(r.get(y), int | float)]
    return [r[x] for r in kept], [r[y] for r in kept]


def batch_curve(table: Table, path: Path) -> bool:
    presets = _by([dict(r, preset=f"{r['preset']}, {r['context']} tok") for r in table.rows],
                  "preset")
    relative = {name: _series(rows, "batch", "relative") for name, rows in presets.items()}
    utilization = {name: _series(rows, "batch", "utilization") for name, rows in presets.items()}
    seed_x = [1, 4, 8, 16]
    relative["the seed's table"] = (seed_x, [1.0, 3.5, 5.5, 7.0])
    utilization["the seed's table (midpoints)"] = (seed_x, [0.15, 0.50, 0.70, 0.80])
    return plot(path, "Decode throughput by batch size", [
        Panel("throughput vs batch 1 (x)", relative, "batch", logx=True),
        Panel("utilization", utilization, "batch", percent=True, logx=True),
    ])


def static_vs_continuous(table: Table, path: Path) -> bool:
    modes = _by(table.rows, "batching")
    load = "offered load (share of what the continuous pool sustains)"
    return plot(path, "Static vs continuous batching", [
        Panel("tokens/s", {m: _series(r, "target", "tokens_per_s") for m, r in modes.items()},
              load),
        Panel("online TTFT p99 (ms)",
              {m: _series(r, "target", "ttft_p99") for m, r in modes.items()}, load, logy=True),
    ])


def pools(table: Table, path: Path) -> bool:
    names = [str(r["setup"]) for r in table.rows]

    def bars(key: str) -> dict[str, tuple[list[str], list[Any]]]:
        return {key: (names, [r.get(key) for r in table.rows])}

    return plot(path, table.title, [
        Panel("capacity used", bars("capacity_used"), bars=True, percent=True),
        Panel("$ per 1M tokens", bars("cost_per_million"), bars=True),
        Panel("online TPOT p99 (ms)", bars("tpot_p99"), bars=True),
    ])


def economics(table: Table, path: Path) -> bool:
    price_keys = [k for k in table.rows[0]
                  if k.startswith("cost_") and k not in ("cost_per_million", "cost_per_hour")]
    series = {f"at ${k[5:]}/h": _series(table.rows, "capacity_used", k) for k in price_keys}
    return plot(path, "Cost per 1M tokens against the capacity used", [
        Panel("$ per 1M tokens", series, "capacity used (tokens/s over what the pool sustains)"),
    ])


def right_size(table: Table, path: Path) -> bool:
    return plot(path, table.title, [
        Panel("online p99 (ms)", {"TTFT": _series(table.rows, "gpus", "ttft_p99"),
                                  "TPOT": _series(table.rows, "gpus", "tpot_p99")}, "GPUs"),
        Panel("$ per hour", {"pool": _series(table.rows, "gpus", "cost_per_hour")}, "GPUs"),
    ])


def calibration(tables: list[Table], path: Path) -> bool:
    panels = []
    for table in tables:
        if not any(f"{key}_ratio" in r for r in table.rows for key, _, _ in FIGURES):
            continue  # not a figure-by-figure comparison (the request-by-request table)
        variants = [str(r["variant"]) for r in table.rows]
        series = {title: (variants, [r.get(f"{key}_ratio") for r in table.rows])
                  for key, title, goal in FIGURES if goal is not None}
        panels.append(Panel(f"predicted / measured ({table.title.split(':')[0]})", series,
                            bars=True))
    return plot(path, "Calibration against the measured benchmark", panels)
