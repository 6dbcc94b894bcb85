"""``engine_builder profile``: the rate arithmetic against a fake executor with a known step
cost, and the real cpu executor on the tiny engine writing the manifest's profile."""

from __future__ import annotations

import argparse
import threading
import time
import types
from pathlib import Path

import pytest

from engine_builder import profile, profile_steps
from engine_builder.cli import main
from engine_builder.footprint import footprint
from engine_builder.manifest import Manifest
from engine_builder.tiny import build_tiny_engine
from engine_builder.usage import UsageError
from server.executor.base import (
    Capacity,
    ExecRequest,
    ExecutorStats,
    FinishReason,
    TokenDelta,
)
from tests.unit.scheduler.helpers import FakeClock

pytestmark = pytest.mark.unit

BASE_S, PER_SEQ_S = 0.02, 0.002  # the fake's step costs BASE_S + PER_SEQ_S * batch


class StepCostExecutor:
    """Every poll with work runs one step: its cost passes (on ``clock``, or asleep), then one
    token per sequence."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.capacity = Capacity(8, 1024, 16, 512, 2048, 300)
        self._active: dict[int, tuple[ExecRequest, int]] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self.steps = 0

    def enqueue(self, request: ExecRequest) -> None:
        with self._lock:
            self._active[request.request_id] = (request, 0)

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._active.pop(request_id, None)

    def poll(self, timeout: float) -> list[TokenDelta]:
        with self._lock:
            if not self._active:
                return []
            cost = BASE_S + PER_SEQ_S * len(self._active)
            if self._clock is None:
                time.sleep(cost)
            else:
                self._clock.advance(cost)
            self.steps += 1
            deltas = []
            for request_id, (request, made) in list(self._active.items()):
                made += 1
                done = made >= request.sampling.max_tokens
                deltas.append(TokenDelta(request_id, (made % 300,), "x",
                                         FinishReason.LENGTH if done else None))
                if done:
                    del self._active[request_id]
                else:
                    self._active[request_id] = (request, made)
            return deltas

    def stats(self) -> ExecutorStats:
        return ExecutorStats(len(self._active), 0, 1024, 0, 1024, 0, self.steps, 0.0, 0, 0, 0, 0)

    def shutdown(self) -> None:
        self._active.clear()


def test_measured_rates_follow_the_step_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(1000.0)  # the profiler's time.perf_counter reads it; only steps move it
    as_time = types.SimpleNamespace(perf_counter=clock)
    monkeypatch.setattr(profile, "time", as_time)
    monkeypatch.setattr(profile_steps, "time", as_time)
    points = profile.measure_curve(StepCostExecutor(clock), [1, 4], steps=8, vocab_size=300,
                                   log=lambda _: None)
    b1, b4 = points
    # 1 token per 22 ms step = 45.5 tokens/s; 4 per 28 ms step = 142.9 tokens/s.
    assert (b1.batch_size, b4.batch_size) == (1, 4)
    assert b1.step_ms == pytest.approx(22) and b4.step_ms == pytest.approx(28)
    assert b1.tokens_per_s == pytest.approx(1000 / 22)
    assert b4.tokens_per_s == pytest.approx(4 * 1000 / 28)


class CoalescingExecutor(StepCostExecutor):
    """Runs whole requests before the first poll returns: one delta with every token."""

    def poll(self, timeout: float) -> list[TokenDelta]:
        with self._lock:
            if not self._active:
                return []
            time.sleep(0.01)
            deltas = [TokenDelta(rid, tuple(range(req.sampling.max_tokens)), "",
                                 FinishReason.LENGTH) for rid, (req, _) in self._active.items()]
            self._active.clear()
            return deltas


def test_coalesced_deltas_fall_back_to_the_whole_run() -> None:
    point = profile.measure_batch(CoalescingExecutor(), 2, steps=8, vocab_size=300, first_id=1)
    # 2 sequences x (2 warm-up + 8) tokens, minus the 2 prefill tokens, in >= 10 ms
    assert 0 < point.tokens_per_s <= 18 / 0.01


def test_run_saves_the_profile(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "e", max_batch_size=8)
    args = argparse.Namespace(engine_dir=engine, batch_sizes="1,4", steps=8, no_save=False,
                              no_step_cost=False)
    assert profile.run(args, executor_factory=lambda _: StepCostExecutor()) == 0
    manifest = Manifest.load(engine)
    saved = manifest.profile
    assert saved is not None
    assert saved.batch_sizes == (1, 4)
    assert saved.peak_tokens_per_s == max(saved.decode_tokens_per_s)
    assert saved.decode_tokens_per_s[1] > saved.decode_tokens_per_s[0]
    assert saved.weight_bytes == footprint(manifest, engine).weight_bytes
    assert saved.memory_bandwidth_gb_s > 0


def test_batch_sizes_and_steps() -> None:
    assert profile.default_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert profile.default_batch_sizes(12) == [1, 2, 4, 8, 12]
    assert profile.parse_batch_sizes("4,1,4", 8) == [1, 4]
    for bad in ("0,1", "1,16", "a", ""):
        with pytest.raises(UsageError, match="--batch-sizes"):
            profile.parse_batch_sizes(bad, 8)
    assert profile.steps_for(1, 16) == 16 and profile.steps_for(32, 16) == profile.MIN_STEPS


def test_table_reports_roofline_at_batch_1() -> None:
    points = [profile.BatchPoint(1, 5.0, 200.0), profile.BatchPoint(2, 9.0, 222.2)]
    table = profile.format_table(points, weight_bytes=10**9, bandwidth_gb_s=10.0)
    assert "roofline step 100.0 ms" in table
    assert "50%" in table.splitlines()[2]
    assert "1.80x" in table.splitlines()[3]


def test_profile_cli_with_the_cpu_executor(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    engine = build_tiny_engine(tmp_path / "e", max_batch_size=4, num_kv_blocks=512)
    assert main(["profile", str(engine), "--batch-sizes", "1,2", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "saved profile" in out
    saved = Manifest.load(engine).profile
    assert saved is not None and saved.batch_sizes == (1, 2)
    assert all(rate > 0 for rate in saved.decode_tokens_per_s)
    assert "step cost model" in out
    fit = saved.step_cost
    assert fit is not None and fit.num_steps > 20
    assert fit.blas_threads is not None and fit.intercept_s + sum(fit.coefficients_s) > 0
    assert main(["profile", str(engine), "--batch-sizes", "8"]) == 2
