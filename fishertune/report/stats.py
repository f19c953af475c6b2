"""Numbers over seeds: mean +- standard deviation, and whether two rows differ beyond the noise.

A DGSS number moves by 1-3 mIoU between runs of one configuration, so every table of the suite shows,
when a cell ran with several seeds, the mean over the finished seeds with their sample standard
deviation and their count, and marks a difference between two rows as significant or within noise by
**Welch's t-test** on the seeds' values (unequal variances; the statistic of
``scipy.stats.ttest_ind(equal_var=False)``, with scipy's t distribution)
at a stated confidence level (95% by default). The interval of a difference is Welch's: the
difference of the means +- t(df) x its standard error, df from the Welch-Satterthwaite equation. With
one value on either side there is no test: the difference is shown with ``n=1`` and no mark.

What is compared are the rows' per-seed aggregates (one number per seed, e.g. the mean mIoU over a
table's targets): seeds are the unit of replication. Images are not resampled: each number already
pools every image of a target into one confusion matrix, as the protocol prescribes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

#: the confidence level of every interval and test unless a command says otherwise
LEVEL = 0.95
TEST_NAME = "Welch's t-test over seeds"


@dataclass(frozen=True)
class Estimate:
    """Values of one quantity over seeds: their mean, sample standard deviation (None for one value), count."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def format(self, digits: int = 1, n: bool = True, latex: bool = False) -> str:
        """``52.3 +- 0.4 (n=3)`` (LaTeX: ``52.3 $\\pm$ 0.4``), or ``52.3`` for one value."""
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        pm = r" $\pm$ " if latex else " ± "
        count = f" (n={self.n})" if n else ""
        return f"{self.mean:.{digits}f}{pm}{self.std:.{digits}f}{count}"


def estimate(values: Iterable[float]) -> Estimate:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("an estimate needs at least one value")
    return Estimate(values)


@dataclass(frozen=True)
class Difference:
    """``a - b`` with Welch's interval and test (None when a side has fewer than two values)."""

    diff: float
    low: float | None
    high: float | None
    p: float | None
    level: float
    n: tuple[int, int]

    @property
    def tested(self) -> bool:
        return self.p is not None

    @property
    def significant(self) -> bool | None:
        """True when the interval excludes 0 (p < 1 - level); None without a test."""
        return None if self.p is None else self.p < 1 - self.level

    def format(self, digits: int = 1) -> str:
        """``+1.2 [-0.3, +2.7] within noise``, ``+3.1 [+1.5, +4.7] significant`` or ``+1.2 (n=1)``."""
        if not self.tested:
            return f"{self.diff:+.{digits}f} (n={min(self.n)})"
        verdict = "significant" if self.significant else "within noise"
        return f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] {verdict}"


def welch(a: Estimate, b: Estimate, level: float = LEVEL) -> Difference:
    """Welch's t-test and interval for ``mean(a) - mean(b)``.

    Two sides without spread (every value equal on both) differ exactly: significant unless equal."""
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Difference(diff, None, None, None, level, (a.n, b.n))
    from scipy import stats

    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        return Difference(diff, diff, diff, p, level, (a.n, b.n))
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    p = float(2 * stats.t.sf(abs(diff) / se, df))  # = ttest_ind(a, b, equal_var=False).pvalue
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Difference(diff, diff - half, diff + half, p, level, (a.n, b.n))
