"""The step-cost model: shapes, the non-negative fit, the online correction, the manifest."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from engine_builder.manifest import Manifest, StepCostFit
from engine_builder.step_cost import (
    FEATURES,
    LinearStepCost,
    OnlineStepCost,
    StepSample,
    StepShape,
    fit_samples,
    median,
    nnls,
    relative_errors,
)
from engine_builder.tiny import build_tiny_engine

pytestmark = pytest.mark.unit

TRUE = LinearStepCost(0.030, [0.001, 0.004, 0.0008, 0.0002, 2e-6, 1e-5, 1e-6])


def random_shape(rng: random.Random) -> StepShape:
    shape = StepShape()
    for _ in range(rng.randint(0, 24)):
        shape.add_decode(rng.randint(4, 600))
    for _ in range(rng.randint(0, 3)):
        shape.add_prefill(rng.randint(0, 300), rng.randint(2, 200), rng.random() < 0.5)
    if shape.empty:
        shape.add_decode(8)
    return shape


def samples(model: LinearStepCost, count: int, noise: float, seed: int) -> list[StepSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        shape = random_shape(rng)
        out.append(StepSample(shape, model.predict(shape) * math.exp(rng.gauss(0, noise))))
    return out


def test_shape_features() -> None:
    shape = StepShape()
    shape.add_decode(10)
    shape.add_decode(30)
    shape.add(start=5, num_tokens=4, samples=True)  # a prefill chunk
    shape.add(start=7, num_tokens=1, samples=True)  # one token that samples: a decode
    assert shape.decode_rows == 3 and shape.prefill_tokens == 4 and shape.samples == 4
    assert shape.decode_context == 10 + 30 + 8 and shape.decode_context_max == 30
    assert shape.prefill_context == 4 * 5 + 4 * 5 // 2
    values = dict(zip(FEATURES, shape.features(), strict=True))
    assert values["tokens"] == 7 and values["decode_padded"] == 3 * 30
    assert LinearStepCost(0.5, [0.0] * len(FEATURES)).predict(StepShape()) == 0.0


def test_nnls_matches_an_unconstrained_solution_when_it_is_non_negative() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((40, 4))
    x = np.array([1.0, 0.0, 2.0, 0.5])
    assert np.allclose(nnls(a, a @ x), x, atol=1e-8)
    b = a @ np.array([1.0, -3.0, 2.0, 0.5])  # the best fit wants a negative coefficient
    solution = nnls(a, b)
    assert (solution >= 0).all()
    assert np.linalg.norm(a @ solution - b) <= np.linalg.norm(a @ np.clip(
        np.linalg.lstsq(a, b, rcond=None)[0], 0, None) - b) + 1e-9


def test_fit_recovers_a_known_model() -> None:
    data = samples(TRUE, 400, noise=0.02, seed=1)
    model = fit_samples(data)
    assert median(relative_errors(model, data)) < 0.03
    held_out = samples(TRUE, 200, noise=0.0, seed=2)
    assert median(relative_errors(model, held_out)) < 0.03
    assert all(c >= 0 for c in model.coefficients) and model.intercept >= 0


def test_the_online_model_follows_a_slower_machine() -> None:
    online = OnlineStepCost(TRUE)
    slower = LinearStepCost(TRUE.intercept * 1.4, [c * 1.4 for c in TRUE.coefficients])
    for sample in samples(slower, 300, noise=0.05, seed=3):
        online.observe(sample.shape, sample.seconds)
    held_out = samples(slower, 200, noise=0.0, seed=4)
    errors = [abs(online.predict(s.shape) - s.seconds) / s.seconds for s in held_out]
    assert median(errors) < 0.08  # the prior alone is off by 29%
    error, counted = online.error_summary()
    assert counted == 300 and error < 0.3


class Roofline:
    """Not linear: the slower of a fixed cost and a per-token cost (the planner's form)."""

    def predict(self, shape: StepShape) -> float:
        return 0.0 if shape.empty else max(0.02, 0.001 * shape.tokens)


def test_an_analytic_prior_keeps_its_form_and_follows_the_machine_by_scale() -> None:
    prior = Roofline()
    online = OnlineStepCost(prior)
    rng = random.Random(8)
    for _ in range(300):  # a host 1.5x slower than the prior says
        shape = random_shape(rng)
        online.observe(shape, 1.5 * prior.predict(shape))
    assert online.model is prior  # never replaced by a linear refit
    small, large = StepShape(), StepShape()
    small.add_decode(8)
    for _ in range(60):
        large.add_decode(8)
    for shape in (small, large):
        assert online.predict(shape) == pytest.approx(1.5 * prior.predict(shape), rel=0.02)


def test_an_uncalibrated_model_learns_from_steps() -> None:
    online = OnlineStepCost(None)
    assert not online.calibrated and online.predict(random_shape(random.Random(0))) == 0.0
    data = samples(TRUE, 200, noise=0.02, seed=5)
    assert online.observe(data[0].shape, data[0].seconds) is None  # nothing to predict with
    for sample in data[1:]:
        online.observe(sample.shape, sample.seconds)
    assert online.calibrated and online.observed_steps == 200
    held_out = samples(TRUE, 100, noise=0.0, seed=6)
    assert median([abs(online.predict(s.shape) - s.seconds) / s.seconds for s in held_out]) < 0.1


def test_a_batch_curve_gives_a_rough_model() -> None:
    model = LinearStepCost.from_batch_curve([1, 2, 4, 8], [30.0, 32.0, 36.0, 44.0])
    shape = StepShape()
    for _ in range(4):
        shape.add_decode(16)
    assert model.predict(shape) == pytest.approx(0.036, rel=0.01)


def test_the_fit_round_trips_through_the_manifest(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "e")
    fit = fit_samples(samples(TRUE, 100, 0.01, 7)).to_fit(
        num_steps=100, median_error=0.01, blas_threads=1)
    from engine_builder.profile import BatchPoint, make_profile

    profile = make_profile([BatchPoint(1, 10.0, 100.0)], 1000, 10.0, fit)
    Manifest.load(engine).with_profile(profile).save(engine)
    loaded = Manifest.load(engine).profile
    assert loaded is not None and loaded.step_cost == fit
    model = LinearStepCost.from_fit(loaded.step_cost)
    assert model.coefficients == pytest.approx(fit.coefficients_s)


def test_a_profile_without_a_fit_still_loads(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "e")
    data = json.loads((engine / "manifest.json").read_text())
    data["profile"] = {"batch_sizes": [1], "decode_tokens_per_s": [5.0],
                       "step_latency_ms": [200.0], "memory_bandwidth_gb_s": 10.0,
                       "weight_bytes": 100, "peak_tokens_per_s": 5.0,
                       "measured_at": "2026-01-01T00:00:00Z", "host": "h"}
    (engine / "manifest.json").write_text(json.dumps(data))
    profile = Manifest.load(engine).profile
    assert profile is not None and profile.step_cost is None


def test_a_fit_of_another_version_is_refused() -> None:
    fit = StepCostFit(version=99, features=FEATURES, intercept_s=0.0,
                      coefficients_s=(0.0,) * len(FEATURES), num_steps=1, median_error=0.0,
                      blas_threads=None)
    with pytest.raises(ValueError, match="profile"):
        LinearStepCost.from_fit(fit)
    with pytest.raises(ValueError):
        LinearStepCost(-1.0, [0.0] * len(FEATURES))
