"""Chi-square tests for the sampling tests (no SciPy in the test dependencies)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping


def chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df), by the Wilson-Hilferty approximation (within
    a few percent of the exact tail for df >= 2, ample for a pass/fail threshold)."""
    if df < 1:
        return 1.0
    mean = 1.0 - 2.0 / (9.0 * df)
    z = ((statistic / df) ** (1.0 / 3.0) - mean) / math.sqrt(2.0 / (9.0 * df))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def goodness_of_fit(samples: Iterable[Hashable], probs: Mapping[Hashable, float],
                    min_expected: float = 5.0) -> float:
    """p-value of samples drawn from ``probs``; outcomes expected fewer than ``min_expected``
    times are pooled into one cell."""
    counts = Counter(samples)
    n = sum(counts.values())
    cells: list[tuple[float, float]] = []  # (observed, expected)
    pooled_o = pooled_e = 0.0
    for outcome in set(probs) | set(counts):
        observed, expected = counts.get(outcome, 0), n * probs.get(outcome, 0.0)
        if expected < min_expected:
            pooled_o, pooled_e = pooled_o + observed, pooled_e + expected
        else:
            cells.append((observed, expected))
    if pooled_e > 0 or pooled_o > 0:
        cells.append((pooled_o, max(pooled_e, 1e-9)))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    return chi2_sf(statistic, len(cells) - 1)


def homogeneity(a: Iterable[Hashable], b: Iterable[Hashable], min_count: int = 10) -> float:
    """p-value that two samples come from one distribution; outcomes seen fewer than
    ``min_count`` times in both together are pooled into one cell."""
    ca, cb = Counter(a), Counter(b)
    na, nb = sum(ca.values()), sum(cb.values())
    rows: dict[Hashable, tuple[int, int]] = {}
    rare = [0, 0]
    for outcome in set(ca) | set(cb):
        x, y = ca.get(outcome, 0), cb.get(outcome, 0)
        if x + y < min_count:
            rare[0] += x
            rare[1] += y
        else:
            rows[outcome] = (x, y)
    if sum(rare):
        rows["<pooled>"] = (rare[0], rare[1])
    statistic = 0.0
    for x, y in rows.values():
        total = x + y
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            statistic += (observed - expected) ** 2 / expected
    return chi2_sf(statistic, len(rows) - 1)
