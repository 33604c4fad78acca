"""Statistics of a report: summaries over seeds and paired bootstrap tests over questions.

Everything here is deterministic: the bootstrap draws from a generator seeded from the names of
the two variants it compares, so rebuilding a report reproduces every interval and p-value, and
adding a cell to a sweep does not change the numbers of the others.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Resamples of the paired bootstrap (the issue asks for about 2,000).
N_RESAMPLES = 2000
#: Base seed of the bootstrap generator (the paper's arXiv date, 2020-05-15).
BOOTSTRAP_SEED = 20200515
#: Questions resampled per chunk, to bound memory at (chunk x questions) indices.
_CHUNK = 200


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t distribution.

    scipy is a dependency of mlflow (a dependency of this project), so it is always installed.

    Args:
        q: Probability in (0, 1), e.g. 0.975 for a two-sided 95% interval.
        df: Degrees of freedom (>= 1).

    Returns:
        The value t with P(T <= t) = q.
    """
    from scipy.stats import t as student_t

    return float(student_t.ppf(q, df))


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and 95% t-interval of values over seeds.

    ``std`` and the interval are ``None`` for fewer than two values: one seed says nothing about
    the spread, and reporting 0 would claim a precision that was never measured.
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        """JSON form (``ci`` as a two-element list or ``None``)."""
        ci = None if self.ci_low is None else [self.ci_low, self.ci_high]
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci95": ci, "values": list(self.values)}


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Summarise per-seed values.

    Args:
        values: One value per seed (already ordered by seed).
        confidence: Coverage of the two-sided t-interval.

    Returns:
        ``mean``; ``std`` with ddof=1; interval ``mean +- t_{(1+c)/2, n-1} * std / sqrt(n)``.
    """
    vals = tuple(float(v) for v in values)
    n = len(vals)
    if n == 0:
        return Summary(0, None, None, None, None, vals)
    mean = float(np.mean(vals))
    if n == 1:
        return Summary(1, mean, None, None, None, vals)
    std = float(np.std(vals, ddof=1))
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, vals)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of a mean difference over questions.

    Attributes:
        mean: Observed mean difference (variant minus reference), as a fraction.
        ci_low, ci_high: Percentile 95% interval of the resampled means.
        p_value: Two-sided bootstrap p-value, ``min(1, 2 * min(P(b <= 0), P(b >= 0)))`` with the
            (count + 1) / (B + 1) correction, so it is never exactly 0.
        n_questions: Questions in the paired sample.
        n_resamples: Bootstrap resamples drawn.
    """

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n_questions: int
    n_resamples: int

    @property
    def significant(self) -> bool:
        """Whether the 95% interval excludes 0."""
        return self.ci_low > 0.0 or self.ci_high < 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "mean": self.mean,
            "ci95": [self.ci_low, self.ci_high],
            "p_value": self.p_value,
            "significant": self.significant,
            "n_questions": self.n_questions,
            "n_resamples": self.n_resamples,
        }


def rng_for(*names: str) -> np.random.Generator:
    """A generator seeded from :data:`BOOTSTRAP_SEED` and the names of what is compared."""
    return np.random.default_rng([BOOTSTRAP_SEED, *(zlib.crc32(n.encode()) for n in names)])


def paired_bootstrap(
    diffs: Sequence[float] | np.ndarray, rng: np.random.Generator, n_resamples: int = N_RESAMPLES
) -> BootstrapResult:
    """Bootstrap the mean of per-question paired differences.

    Args:
        diffs: (Q,) per-question difference of scores (variant minus reference).
        rng: Source of the resampling indices (see :func:`rng_for`).
        n_resamples: Number of resamples B.

    Returns:
        The observed mean, its percentile 95% interval and a two-sided p-value.

    Raises:
        ValueError: when ``diffs`` is empty.
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = d.shape[0]
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one question")
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, _CHUNK):
        stop = min(start + _CHUNK, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    below = (np.count_nonzero(means <= 0.0) + 1) / (n_resamples + 1)
    above = (np.count_nonzero(means >= 0.0) + 1) / (n_resamples + 1)
    p = min(1.0, 2.0 * min(below, above))
    return BootstrapResult(float(d.mean()), float(low), float(high), float(p), n, n_resamples)
