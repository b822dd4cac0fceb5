"""The loop benchmark's statistics, pure: intervals over seeds, binomial bounds, the cost grid.

- `mean_ci`: the mean of per-seed figures and its two-sided 95 % Student-t interval (n - 1
  degrees of freedom). With 3 seeds the t quantile is 4.30, so an interval is wide unless the
  seeds agree: that is the point.
- `clopper_pearson`: the exact binomial interval of k successes in n (two-sided, or the one-sided
  lower bound), for precision and recall figures that come with their counts.
- `equal_quality`: "equal" means the whole interval of the paired difference lies within ±band.
- `reduction`: 1 - ours / reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

EQUAL_BAND = 0.02
"""Paired mAP50-95 difference (loop minus manual) whose whole 95 % interval must lie within ±this."""


@dataclass(frozen=True)
class Interval:
    """A mean over seeds (or a proportion) with its 95 % interval."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_list(self) -> list[float | None]:
        """[low, high], rounded for JSON."""
        return [_round(self.low), _round(self.high)]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Mean and Student-t interval of the values that are not None (one value: no interval)."""
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """The exact two-sided interval of a proportion k/n (None figures when n is 0)."""
    from scipy.stats import beta

    if n <= 0:
        return Interval(None, None, None, 0)
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Interval(k / n, low, high, n)


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float | None:
    """The one-sided lower confidence bound of a proportion k/n (None when n is 0): the verifier's
    own Clopper–Pearson bound, so the bench audits auto-accept with the rule that granted it."""
    from visionloop.services.verifier.calibrate import lower_bound as verifier_bound

    return None if n <= 0 else verifier_bound(k, n, confidence)


def equal_quality(diff: Interval, band: float = EQUAL_BAND) -> bool:
    """Whether the paired difference's whole interval lies within ±band (False without an interval)."""
    return diff.low is not None and diff.high is not None and -band <= diff.low and diff.high <= band


def reduction(ours: float, reference: float) -> float | None:
    """1 - ours / reference (None when the reference is 0)."""
    return None if reference <= 0 else 1.0 - ours / reference
