"""The statistics of both benchmarks: medians and ratios of step times (``overhead``), mean ± std over seeds and the
paired tests of a method against its counterpart (``generalization``, on ``scipy.stats``)."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (std 0 for one value, ``nan`` for none): ``peft_tsrs.app.report.mean_std``,
    the one the app's run comparison uses (imported on the first call: ``peft_tsrs`` pulls in torch)."""
    from peft_tsrs.app.report import mean_std as app_mean_std

    return app_mean_std(values)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[2] - q[0])


def ratio_of_medians(values: Sequence[float], base: Sequence[float]) -> float:
    b = median(base)
    return median(values) / b if b > 0 else float("nan")


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``values[i] / base[i]`` (both measured in the same round)."""
    ratios = [v / b for v, b in zip(values, base) if b > 0]
    return median(ratios)


def paired_t_test(diffs: Sequence[float]) -> tuple[float, float]:
    """``(t, two-sided p)`` of the paired differences: ``scipy.stats.ttest_rel`` of the two samples, computed on
    their differences (``ttest_1samp`` against 0). ``nan`` with fewer than 2 pairs; p 1 / 0 when the differences are
    all equal: zero / non-zero (where scipy divides by a zero deviation)."""
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    if statistics.stdev(diffs) == 0:
        mean = statistics.fmean(diffs)
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    from scipy import stats

    result = stats.ttest_1samp(diffs, 0.0)
    return float(result.statistic), float(result.pvalue)


def sign_test(diffs: Sequence[float]) -> tuple[int, int, float]:
    """``(wins, losses, two-sided exact binomial p)`` (``scipy.stats.binomtest``, p = 1/2); ties are dropped."""
    wins = sum(1 for d in diffs if d > 0)
    losses = sum(1 for d in diffs if d < 0)
    if wins + losses == 0:
        return 0, 0, 1.0
    from scipy import stats

    return wins, losses, float(stats.binomtest(wins, wins + losses, 0.5).pvalue)
