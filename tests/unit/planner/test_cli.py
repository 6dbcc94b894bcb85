"""``python -m server.planner``: every command runs, says "simulated", writes its JSON; the
calibration reads a benchmark's JSON and judges its goals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_builder.manifest import Manifest, Profile
from engine_builder.step_cost import LinearStepCost
from server.planner.calibrate import BenchLoad, predict, read_bench_json
from server.planner.cli import main
from server.planner.profiled import profiled_engine

pytestmark = pytest.mark.unit

CPU_STEP = LinearStepCost(0.040, [0.0, 0.003, 0.0, 0.002, 0.0, 0.0, 1e-6])


@pytest.fixture(scope="module")
def profiled_tiny(tiny_engine_factory: Callable[..., Path]) -> Path:
    """The tiny engine with a profile like the default engine's on this kind of host."""
    engine = tiny_engine_factory(max_batch_size=8, max_num_tokens=128)
    manifest = Manifest.load(engine)
    profile = Profile(batch_sizes=(1, 8), decode_tokens_per_s=(23.3, 125.0),
                      step_latency_ms=(43.0, 64.0), memory_bandwidth_gb_s=20.0,
                      weight_bytes=1000, peak_tokens_per_s=125.0,
                      measured_at="2026-11-29T00:00:00Z", host="test",
                      step_cost=CPU_STEP.to_fit(num_steps=100, median_error=0.05,
                                                blas_threads=1))
    manifest.with_profile(profile).save(engine)
    return engine


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "out.json"
    assert main([*argv, "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "simulated" in printed
    data = json.loads(out.read_text())
    assert data["simulated"] is True and all(t["simulated"] for t in data["tables"])
    return data


def test_batch_curve_covers_every_preset(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    data = run(capsys, tmp_path, "batch-curve", "--contexts", "1024")
    rows = data["tables"][0]["rows"]
    presets = {r["preset"] for r in rows}
    assert len(presets) == 6  # 2 models x 3 accelerators
    one = {r["batch"]: r for r in rows if r["preset"] == "Llama-3-8B on 1 x H100-SXM"}
    assert one[1]["relative"] == 1.0 and 1 < one[4]["relative"] < one[16]["relative"] < 16


def test_replay_of_a_trace_on_a_pool(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    data = run(capsys, tmp_path, "replay", "--model", "Llama-3-8B", "--gpus", "2",
               "--rate", "3", "--duration-s", "20", "--offline-backlog", "30")
    row = data["tables"][0]["rows"][0]
    assert row["setup"] == "2 x 1 GPUs" and row["online_requests"] > 40
    assert row["offline_tokens_per_s"] > 0 and row["ttft_p99"] > 0


def test_bad_settings_are_refused_with_the_field_named(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    assert main(["batch-curve", "--tp", "3"]) == 2
    assert "tp must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch-curve", "--accelerator", "TPU"])


def test_a_profiled_engine_follows_plans_with_its_fit(profiled_tiny: Path) -> None:
    engine = profiled_engine(profiled_tiny)
    assert engine.follows_plans and engine.capacity.max_slots == 8
    assert engine.model.predict is not None and engine.jitter == pytest.approx(0.05 / 0.6745)


def bench_json(path: Path, engine: Path, load: BenchLoad, runs: dict[str, dict[str, Any]],
               scale: float) -> Path:
    """A bench_scheduler --json-out document whose figures are ``scale`` x the given ones."""
    def run_json(name: str, fig: dict[str, Any]) -> dict[str, Any]:
        tier = {"tokens": 1, "tokens_per_s": 0.0, "ttft_ms": [None] * 3,
                "tpot_ms": [None] * 3}
        ttft = None if fig["ttft_p50"] is None else scale * fig["ttft_p50"]
        online = tier | {"ttft_ms": [ttft, None, fig["ttft_p99"]],
                         "tpot_ms": [fig["tpot_p50"], None, fig["tpot_p99"]]}
        offline = tier | {"tokens_per_s": fig["offline_tokens_per_s"] or 0.0,
                          "tokens": 1 if fig["offline_tokens_per_s"] else 0}
        summary = {"name": name, "tokens_per_s": fig["tokens_per_s"],
                   "occupancy": fig["occupancy"], "tiers": {"online": online,
                                                            "offline": offline}}
        return {"summary": summary}

    goal = ["online-only", "offline-only", "offline-only+slo", "backfill", "backfill-3x"]
    rate = {"rate": load.rate, "duration_s": load.duration_s,
            "offline_backlog": load.offline_backlog,
            "rounds": [[run_json(n, runs[n]) for n in goal]],
            "sweep": [run_json(n, f) for n, f in runs.items() if n not in goal]}
    meta = {"engine": str(engine), "price_per_hour": 2.0, "rates": [rate],
            "load": {"trace": None, "max_prompt_tokens": load.max_prompt_tokens,
                     "max_output_tokens": load.max_output_tokens,
                     "offline_output_tokens": load.offline_output_tokens,
                     "offline_backlog": 0, "seed": 0, "duration": load.duration_s,
                     "min_online_requests": 0, "short_duration": load.short_duration_s,
                     "sweep": list(load.sweep), "fcfs": False, "rounds": 1,
                     "no_budget_long": load.no_budget_long}}
    path.write_text(json.dumps({"meta": meta, "runs": []}))
    return path


def test_calibration_compares_predicted_and_measured(profiled_tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    load = BenchLoad(rate=2.0, duration_s=20.0, short_duration_s=10.0, offline_backlog=100,
                     sweep=(2.0,))
    engine = profiled_engine(profiled_tiny)
    prediction = predict(engine, load, draws=2)
    assert set(prediction.runs) == {"online-only", "offline-only", "offline-only+slo",
                                    "backfill", "backfill-3x", "backfill-2x",
                                    "backfill-no-budget"}
    # Two draws: the same arrivals under other step-time jitter.
    first, second = prediction.runs["backfill"]
    assert first.online.requests == second.online.requests
    assert first.online.ttft_ms != second.online.ttft_ms
    from server.planner.calibrate import simulated_figures

    figures = {n: simulated_figures(r) for n, r in prediction.runs.items()}
    measured = bench_json(tmp_path / "bench.json", profiled_tiny, load, figures, scale=1.5)
    engine_dir, loads, _ = read_bench_json(measured)
    assert engine_dir == str(profiled_tiny) and loads[0] == load
    data = run(capsys, tmp_path, "calibrate", "--measured", str(measured), "--draws", "2")
    assert "median over 2 simulated draws" in data["tables"][0]["notes"][1]
    rows = {r["variant"]: r for r in data["tables"][0]["rows"]}
    # Jitter is seeded: the prediction repeats itself, except TTFT p50 (measured 1.5x).
    assert rows["backfill"]["tokens_per_s_ratio"] == pytest.approx(1.0)
    assert rows["backfill"]["tokens_per_s_met"] is True
    assert rows["online-only"]["ttft_p50_ratio"] == pytest.approx(1 / 1.5)
    assert rows["online-only"]["ttft_p50_met"] is False


def test_the_no_budget_variant_runs_as_long_as_the_benchmark_ran_it() -> None:
    """bench_scheduler runs backfill-no-budget over the goal variants' window and says so in
    its JSON; files written before that ran it --short-duration."""
    from server.planner.calibrate import variants

    meta = {"trace": None, "max_prompt_tokens": 64, "max_output_tokens": 16,
            "offline_output_tokens": 32, "seed": 0, "short_duration": 60.0, "sweep": [2.0],
            "fcfs": False}
    rate = {"rate": 1.5, "duration_s": 200.0, "offline_backlog": 3200}

    def long(load: BenchLoad) -> dict[str, bool]:
        return {v.name: v.long for v in variants(load)}

    new = long(BenchLoad.from_json(meta | {"no_budget_long": True}, rate))
    assert new["backfill-no-budget"] and new["backfill"] and not new["backfill-2x"]
    assert not long(BenchLoad.from_json(meta, rate))["backfill-no-budget"]


def test_an_old_benchmark_json_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {"engine": "x", "rates": []}, "runs": []}))
    with pytest.raises(ValueError, match="run the benchmark again"):
        read_bench_json(old)


def test_right_size_reports_the_pools_it_tried(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    data = run(capsys, tmp_path, "right-size", "--model", "Llama-3-8B", "--rate", "4",
               "--duration-s", "20", "--offline-backlog", "40", "--ttft-p99-ms", "3000",
               "--tpot-p99-ms", "50", "--max-gpus", "4")
    table = data["tables"][0]
    rows = {r["replicas"]: r for r in table["rows"]}
    assert rows and all(r["meets"] in ("yes", "no") for r in rows.values())
    assert any(note.startswith(("smallest pool", "no pool")) for note in table["notes"])


def test_calibration_runs_each_variant_with_the_benchmarks_slowdown_bound() -> None:
    """bench_scheduler starts an SLO variant's server with --max-online-slowdown at the
    variant's multiplier (slo_args); the simulation of that variant must too, or its 3x
    variant is planned like the 1.25x one (the server's default, 1.2)."""
    from server.planner.calibrate import Variant, _scheduler

    def slowdown(multiplier: float | None) -> float | None:
        variant = Variant("backfill", True, True, True, multiplier)
        return _scheduler(variant, None).max_online_slowdown

    assert (slowdown(3.0), slowdown(1.0), slowdown(0.5)) == (3.0, 1.0, 1.0)
    assert _scheduler(Variant("backfill-no-budget", True, True, False), None).tpot_slo_ms is None


def test_calibration_pairs_each_request_with_its_measured_one(profiled_tiny: Path) -> None:
    from server.planner.calibrate import per_request

    load = BenchLoad(rate=2.0, duration_s=20.0, short_duration_s=10.0, offline_backlog=100,
                     sweep=())
    prediction = predict(profiled_engine(profiled_tiny), load)
    simulated = [r for r in prediction.online["online-only"] if r.ttft_s is not None]
    assert len(simulated) == len(prediction.online["online-only"]) >= 30

    def sent(slow: Callable[[int], float]) -> list[dict[str, Any]]:
        return [{"sent_s": r.arrival_s + 0.002, "prompt_tokens": r.prompt_tokens,
                 "output_tokens": r.tokens, "ttft_ms": 1000 * (r.ttft_s or 0) * slow(i),
                 "tpot_ms": None if r.tpot_s is None else 1000 * r.tpot_s, "error": None}
                for i, r in enumerate(simulated)]

    # Every other request measured twice as slow to its first token: those pairs miss.
    table = per_request(prediction, {"online-only": [{"online_requests": sent(
        lambda i: 2.0 if i % 2 else 1.0)}]})
    assert table is not None and [r["variant"] for r in table.rows] == ["online-only"]
    row = table.rows[0]
    assert row["misaligned"] == 0 and row["send_lag_ms"] == pytest.approx(2.0)
    assert row["ttft_pairs"] == len(simulated)
    assert row["ttft_within"] == pytest.approx((len(simulated) + 1) // 2 / len(simulated))
    assert row["tpot_within"] == 1.0 and row["tpot_pairs"] > 0
    # Pairing is by arrival order: a measured list one request short pairs the wrong ones.
    shifted = per_request(prediction, {"online-only": [{"online_requests": sent(
        lambda i: 1.0)[1:]}]})
    assert shifted is not None and shifted.rows[0]["misaligned"] > 0
    # A benchmark JSON without per-request records gives no such table.
    assert per_request(prediction, {"online-only": [{"summary": {}}]}) is None
