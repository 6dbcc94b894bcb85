"""The step-cost model: how long one executor step takes, from what the step carries.

One model serves every part that needs to know what a step costs: the backfill scheduler
(how much offline work fits in a step under the online TPOT objective), the executors (which
report each step's shape and duration so the model corrects itself), ``engine_builder
profile`` (which fits it and stores the fit in the manifest) and the capacity planner.

A step's cost is linear in a few features of its shape, with non-negative coefficients::

    seconds = intercept
            + a * decode_rows            # per-sequence work of a decode: sampling, bookkeeping
            + b * tokens                 # every computed token: one row of each weight GEMM
            + c * samples                # rows through the LM head
            + d * prefill_segments       # per-chunk overhead of prefill attention
            + e * decode_context         # KV tokens read by decode attention
            + f * decode_padded          # decode rows x longest decode context (padded kernels)
            + g * prefill_context        # query x key pairs of prefill attention

The intercept is what a step costs before it carries anything (weight streaming at small
batch, per-layer overhead); the per-token coefficient is the compute-bound slope. A memory-bound
accelerator has a large intercept and a small slope, a CPU the reverse: the same form fits both
well enough to plan with, and ``OnlineStepCost`` keeps it honest while the server runs (the
machine's speed drifts, and a fit made on another host or thread count is off by a factor).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine_builder.manifest import STEP_COST_VERSION, StepCostFit

FEATURES = (
    "decode_rows",
    "tokens",
    "samples",
    "prefill_segments",
    "decode_context",
    "decode_padded",
    "prefill_context",
)


@dataclass(slots=True)
class StepShape:
    """What one step computes. Build it with ``add_decode`` / ``add_prefill``; a plain mutable
    dataclass because planners grow one candidate at a time."""

    decode_rows: int = 0  # sequences computing exactly one token that samples
    prefill_tokens: int = 0  # tokens of prefill chunks
    prefill_segments: int = 0  # prefill chunks (one per sequence in prefill)
    samples: int = 0  # rows through the LM head (decodes plus completing prefills)
    decode_context: int = 0  # KV tokens the decode rows attend to, summed
    decode_context_max: int = 0  # the longest context among the decode rows
    prefill_context: int = 0  # sum over prefill tokens of the tokens each attends to

    def add_decode(self, context: int) -> None:
        """One sequence decoding its next token over ``context`` tokens (its own included)."""
        self.decode_rows += 1
        self.samples += 1
        self.decode_context += context
        if context > self.decode_context_max:
            self.decode_context_max = context

    def add_decodes(self, context: int, count: int) -> None:
        """``count`` sequences decoding over ``context`` tokens each (add_decode, in O(1))."""
        if count <= 0:
            return
        self.decode_rows += count
        self.samples += count
        self.decode_context += count * context
        if context > self.decode_context_max:
            self.decode_context_max = context

    def add_prefill(self, start: int, num_tokens: int, samples: bool) -> None:
        """A chunk of ``num_tokens`` prompt tokens at positions [start, start + num_tokens)."""
        self.prefill_tokens += num_tokens
        self.prefill_segments += 1
        self.prefill_context += num_tokens * start + num_tokens * (num_tokens + 1) // 2
        if samples:
            self.samples += 1

    def add_verify(self, start: int, num_tokens: int) -> None:
        """A speculating sequence verifying ``num_tokens - 1`` drafted tokens: a prefill-like
        chunk of ``num_tokens`` at [start, start + num_tokens) whose every row goes through
        the LM head (each position's logits judge the next drafted token)."""
        self.add_prefill(start, num_tokens, True)
        self.samples += num_tokens - 1

    def add(self, start: int, num_tokens: int, samples: bool) -> None:
        """A sequence computing positions [start, start + num_tokens): a decode when it is one
        token that samples (the same math), else a prefill chunk."""
        if num_tokens == 1 and samples:
            self.add_decode(start + 1)
        else:
            self.add_prefill(start, num_tokens, samples)

    @property
    def tokens(self) -> int:
        return self.decode_rows + self.prefill_tokens

    @property
    def empty(self) -> bool:
        return self.tokens == 0

    def features(self) -> tuple[float, ...]:
        """Values in the order of ``FEATURES``."""
        return (
            float(self.decode_rows),
            float(self.tokens),
            float(self.samples),
            float(self.prefill_segments),
            float(self.decode_context),
            float(self.decode_rows * self.decode_context_max),
            float(self.prefill_context),
        )

    def without(self, part: StepShape, decode_context_max: int) -> StepShape:
        """A new shape: this step less ``part``, rows that it holds. The longest decode
        context left is the caller's to give, since a maximum does not subtract."""
        return StepShape(
            self.decode_rows - part.decode_rows,
            self.prefill_tokens - part.prefill_tokens,
            self.prefill_segments - part.prefill_segments,
            self.samples - part.samples,
            self.decode_context - part.decode_context,
            decode_context_max,
            self.prefill_context - part.prefill_context,
        )

    def copy(self) -> StepShape:
        return StepShape(
            self.decode_rows,
            self.prefill_tokens,
            self.prefill_segments,
            self.samples,
            self.decode_context,
            self.decode_context_max,
            self.prefill_context,
        )


@dataclass(frozen=True, slots=True)
class StepSample:
    """One observed step: its shape and its wall time."""

    shape: StepShape
    seconds: float


class StepCostModel(Protocol):
    """Anything that predicts a step's seconds from its shape: the fitted linear model here,
    or an analytic one (the capacity planner's roofline for accelerators nobody profiled).
    ``predict`` is called per candidate while planning a step, so it must be cheap."""

    def predict(self, shape: StepShape) -> float:
        """Seconds; 0 for a step that computes nothing. Never decreases when a step carries
        more (planners search on that)."""


class LinearStepCost:
    """A fitted model: ``predict`` is a dot product (cheap enough to call per candidate)."""

    __slots__ = ("coefficients", "intercept")

    def __init__(self, intercept: float, coefficients: Sequence[float]) -> None:
        if len(coefficients) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} coefficients, got {len(coefficients)}")
        if intercept < 0 or any(c < 0 for c in coefficients):
            raise ValueError("step-cost coefficients must be >= 0")
        self.intercept = float(intercept)
        self.coefficients = tuple(float(c) for c in coefficients)

    def predict(self, shape: StepShape) -> float:
        """Seconds; 0 for a step that computes nothing."""
        if shape.empty:
            return 0.0
        return self.intercept + sum(
            c * x for c, x in zip(self.coefficients, shape.features(), strict=True)
        )

    @classmethod
    def from_fit(cls, fit: StepCostFit) -> LinearStepCost:
        """The model a manifest stores. ValueError for a fit of another version."""
        if fit.version != STEP_COST_VERSION or tuple(fit.features) != FEATURES:
            raise ValueError(
                f"step-cost fit version {fit.version} with features {list(fit.features)} is "
                f"not the one this build reads (version {STEP_COST_VERSION}); run "
                "`python -m engine_builder profile` again"
            )
        return cls(fit.intercept_s, fit.coefficients_s)

    @classmethod
    def from_batch_curve(
        cls, batch_sizes: Sequence[int], step_latency_ms: Sequence[float]
    ) -> LinearStepCost:
        """A rough model from a decode-only batch curve (profiles older than the step-cost
        fit): intercept plus a per-row cost; the online correction refines it."""
        samples = []
        for batch, ms in zip(batch_sizes, step_latency_ms, strict=True):
            shape = StepShape()
            for _ in range(batch):
                shape.add_decode(16)
            samples.append(StepSample(shape, ms / 1000.0))
        return fit_samples(samples, only=("tokens",))

    def to_fit(
        self, *, num_steps: int, median_error: float, blas_threads: int | None
    ) -> StepCostFit:
        return StepCostFit(
            version=STEP_COST_VERSION,
            features=FEATURES,
            intercept_s=self.intercept,
            coefficients_s=self.coefficients,
            num_steps=num_steps,
            median_error=median_error,
            blas_threads=blas_threads,
        )


def relative_errors(model: LinearStepCost, samples: Iterable[StepSample]) -> list[float]:
    return [abs(model.predict(s.shape) - s.seconds) / s.seconds for s in samples if s.seconds > 0]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def fit_samples(
    samples: Sequence[StepSample],
    *,
    only: Sequence[str] | None = None,
    prior: LinearStepCost | None = None,
    prior_weight: float = 0.0,
) -> LinearStepCost:
    """Non-negative least squares on relative error (each step weighs 1/seconds, so short
    steps count as much as long ones). ``only`` restricts the features used (the others get
    0); a ``prior`` with ``prior_weight`` > 0 pulls coefficients towards it (ridge), which
    keeps a fit on a narrow window of recent steps from extrapolating wildly."""
    rows = [s for s in samples if s.seconds > 0 and not s.shape.empty]
    if not rows:
        raise ValueError("no steps to fit")
    used = [i for i, name in enumerate(FEATURES) if only is None or name in only]
    x = np.array([[1.0] + [s.shape.features()[i] for i in used] for s in rows])
    y = np.array([s.seconds for s in rows])
    w = 1.0 / y
    a, b = x * w[:, None], y * w
    # Columns scaled to unit norm: features range from 1 to millions.
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    if prior is not None and prior_weight > 0:
        target = np.array([prior.intercept] + [prior.coefficients[i] for i in used]) * scale
        ridge = math.sqrt(prior_weight) * np.eye(len(used) + 1)
        a = np.vstack([a, ridge])
        b = np.concatenate([b, ridge @ target])
    solution = nnls(a, b) / scale
    coefficients = [0.0] * len(FEATURES)
    for column, index in enumerate(used, start=1):
        coefficients[index] = float(solution[column])
    return LinearStepCost(float(solution[0]), coefficients)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    gradient = a.T @ (b - a @ x)
    tol = 1e-10 * max(1.0, float(np.abs(gradient).max(initial=0.0)))
    for _ in range(max_iter):
        free = ~passive & (gradient > tol)
        if not free.any():
            break
        passive[int(np.argmax(np.where(free, gradient, -np.inf)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            blocking = passive & (z <= 0)
            step = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + step * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
        gradient = a.T @ (b - a @ x)
    return x


class OnlineStepCost:
    """The runtime model: a prior fit, refitted on a window of recent steps and scaled by a
    running correction, so that predictions follow the machine's drift.

    The refits are linear (``fit_samples``, pulled towards a linear prior), so they apply only
    to a linear prior or to none; any other prior (an analytic model) keeps its form and is
    corrected by the running scale alone.

    Thread-safe: the scheduler thread observes and predicts, readers (metrics, GetStats) take
    ``error_summary`` from other threads.
    """

    WINDOW = 512  # recent steps kept for refits and error statistics
    REFIT_EVERY = 64  # steps between refits
    # Without a prior, the first fits use only the intercept and the per-token cost: a few
    # dozen steps of one workload cannot tell the other features apart.
    FIRST_FIT_STEPS = 16
    PRIOR_WEIGHT = 0.5  # ridge pull towards the prior, relative to the window's own fit
    SCALE_ALPHA = 0.05  # weight of the newest step in the running log-ratio correction

    def __init__(self, prior: StepCostModel | None) -> None:
        self._prior = prior
        self._refits = prior is None or isinstance(prior, LinearStepCost)
        self._fit: StepCostModel | None = prior
        self._log_scale = 0.0
        self._scale = 1.0  # exp(_log_scale), kept with it: predict runs per planning candidate
        self._window: deque[StepSample] = deque(maxlen=self.WINDOW)
        self._errors: deque[float] = deque(maxlen=self.WINDOW)
        self._since_refit = 0
        self._observed = 0
        self._lock = threading.Lock()

    @property
    def calibrated(self) -> bool:
        """True once predictions exist (a prior, or enough observed steps to fit one)."""
        return self._fit is not None

    @property
    def observed_steps(self) -> int:
        return self._observed

    def predict(self, shape: StepShape) -> float:
        """Seconds, or 0.0 while uncalibrated (nothing to predict with yet)."""
        fit = self._fit
        if fit is None:
            return 0.0
        return fit.predict(shape) * self._scale

    def observe(self, shape: StepShape, seconds: float) -> float | None:
        """Takes one executor step; returns the prediction it made for that step beforehand
        (None while uncalibrated), so callers can report predicted against observed."""
        if seconds <= 0 or shape.empty:
            return None
        predicted = self.predict(shape) if self._fit is not None else None
        with self._lock:
            self._observed += 1
            self._window.append(StepSample(shape.copy(), seconds))
            if predicted is not None and predicted > 0:
                self._errors.append(abs(predicted - seconds) / seconds)
                ratio = math.log(seconds / predicted)
                self._log_scale += self.SCALE_ALPHA * ratio
                self._scale = math.exp(self._log_scale)
            self._since_refit += 1
            early = self._prior is None and self._observed <= self.REFIT_EVERY
            refit = self._refits and (
                self._since_refit >= self.REFIT_EVERY
                or (early and self._observed >= self.FIRST_FIT_STEPS and self._since_refit >= 8)
            )
            window = list(self._window) if refit else None
        if window is not None:
            self._refit(window, only=("tokens",) if early else None)
        return predicted

    def _refit(self, window: list[StepSample], only: tuple[str, ...] | None) -> None:
        prior = self._prior if isinstance(self._prior, LinearStepCost) else None
        try:
            fit = fit_samples(window, only=only, prior=prior, prior_weight=self.PRIOR_WEIGHT)
        except (ValueError, np.linalg.LinAlgError):
            return
        with self._lock:
            self._fit = fit
            self._log_scale = 0.0  # the refit absorbed the drift the scale had tracked
            self._scale = 1.0
            self._since_refit = 0

    def error_summary(self) -> tuple[float, int]:
        """(median relative error of predictions made before each step, steps counted)."""
        with self._lock:
            errors = list(self._errors)
        return median(errors), len(errors)

    @property
    def model(self) -> StepCostModel | None:
        """The current fit (or the analytic prior) without the running scale (for display)."""
        return self._fit
