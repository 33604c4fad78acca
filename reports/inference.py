"""Seed-level inference: is a cell better than its reference, given how much seeds disagree?

In a training ablation the unit of replication is the training run (Bouthillier et al. 2021,
https://arxiv.org/abs/2103.03098): data order, initialisation and dropout change with the seed, and
at small budgets their effect dwarfs most differences between variants. So every verdict here
treats one seed's accuracy as one observation:

* **Test.** When both cells ran the same seeds (the same seed means the same data order in both),
  the per-seed differences are tested with a paired t-test (``scipy.stats.ttest_1samp`` on the
  differences) and the 95%
  interval of the mean difference is its t-interval; otherwise Welch's t-test over the two sets of
  seeds (``scipy.stats.ttest_ind(equal_var=False)``). With 3 seeds the t-interval is wide, and that
  is the honest answer: a bootstrap over 3 values would give intervals that are far too narrow.
* **Multiplicity.** The comparisons that share a reference (a table's family) are corrected
  together with Holm's step-down method (``statsmodels.stats.multitest.multipletests``).
* **Verdict.** ``better`` / ``worse`` when the Holm-adjusted p is below :data:`ALPHA`, otherwise
  ``no detectable difference``; ``not tested`` with the reason when fewer than two seeds exist.
* **Probability of improvement** P(cell > reference) over seeds (Agarwal et al. 2021,
  https://arxiv.org/abs/2108.13264): the Mann-Whitney U statistic over all pairs of seeds divided
  by the number of pairs (ties count one half), from ``scipy.stats.mannwhitneyu``.
* **Power.** The minimum detectable effect (MDE) at the observed seed-to-seed standard deviation of
  the differences, for a two-sided test at :data:`ALPHA` with power :data:`POWER`, and the number of
  seeds needed to detect the paper's own claimed difference, both from ``statsmodels``'
  ``TTestPower`` (paired) / ``TTestIndPower`` (unpaired).

Everything is deterministic (no resampling), so a rebuilt report reproduces every number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Significance level of every verdict (after Holm's correction).
ALPHA = 0.05
#: Power at which the minimum detectable effect and the seeds-needed figures are computed.
POWER = 0.8
#: The verdict words.
BETTER, WORSE, NO_DIFFERENCE, NOT_TESTED = "better", "worse", "no detectable difference", "not tested"


@dataclass
class SeedComparison:
    """One cell against its reference, seeds as the unit. Accuracies are fractions in [0, 1].

    Attributes:
        variant, reference: Cell names.
        family: The multiplicity family (comparisons corrected together by Holm).
        paired: Whether the test paired seeds (both cells ran them) or compared two sets.
        seeds: The seeds used (paired: the common ones; unpaired: the variant's).
        reference_seeds: The reference's seeds used.
        effect: Mean difference variant - reference (paired: mean of per-seed differences).
        ci_low, ci_high: Its 95% t-interval.
        p_value: Two-sided p of the t-test, before correction.
        p_holm: Holm-adjusted p within ``family`` (``None`` until :func:`holm` ran).
        prob_improvement: P(variant > reference) over all pairs of seeds (ties count 1/2).
        sd: Standard deviation of the per-seed differences (paired) or the pooled one (unpaired).
        mde: Smallest |effect| this design detects with power :data:`POWER` at ``sd``.
        paper_effect: The paper's own difference (variant - reference), when both have numbers.
        seeds_for_paper_effect: Seeds (per cell) needed to detect ``paper_effect`` at ``sd``.
        verdict: :data:`BETTER`, :data:`WORSE`, :data:`NO_DIFFERENCE` or :data:`NOT_TESTED`.
        reason: Why not tested, or a caveat (e.g. the mechanism never engaged).
        per_seed: ``{seed: variant - reference}`` (paired only).
    """

    variant: str
    reference: str
    family: str = ""
    paired: bool = True
    seeds: list[int] = field(default_factory=list)
    reference_seeds: list[int] = field(default_factory=list)
    effect: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    prob_improvement: float | None = None
    sd: float | None = None
    mde: float | None = None
    paper_effect: float | None = None
    seeds_for_paper_effect: int | None = None
    verdict: str = NOT_TESTED
    reason: str = ""
    per_seed: dict[int, float] = field(default_factory=dict)

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        return out


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _solve(paired: bool, **kwargs: float | None) -> float | None:
    """``statsmodels``' power solver for a paired (one-sample t on differences) or a two-sample
    design with equal group sizes; solves for the one argument given as ``None``."""
    from statsmodels.stats.power import TTestIndPower, TTestPower
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    if not paired:
        kwargs["nobs1"] = kwargs.pop("nobs")
    solver = TTestPower() if paired else TTestIndPower()
    try:
        with warnings.catch_warnings():
            # No root inside statsmodels' bracket (e.g. an effect beyond 10 sd at 3 seeds): it warns
            # and returns NaN, which is answered below as "no finite solution" (None), not printed.
            warnings.simplefilter("ignore", ConvergenceWarning)
            value = solver.solve_power(alpha=ALPHA, power=POWER, alternative="two-sided", **kwargs)
    except (ValueError, RuntimeError):
        return None
    value = float(np.asarray(value).reshape(-1)[0])
    return value if math.isfinite(value) else None


def _seeds_needed(effect: float | None, sd: float | None, paired: bool) -> int | None:
    """Seeds per cell for power :data:`POWER` against ``effect`` at standard deviation ``sd``."""
    if effect is None or sd is None or sd <= 0 or effect == 0:
        return None
    n = _solve(paired, effect_size=abs(effect) / sd, nobs=None)
    return None if n is None else max(2, math.ceil(n))


def _mde(n: int, sd: float | None, paired: bool) -> float | None:
    """Smallest |effect| detectable with power :data:`POWER` by ``n`` seeds (per cell) at ``sd``."""
    if sd is None or n < 2:
        return None
    if sd == 0:
        return 0.0
    d = _solve(paired, effect_size=None, nobs=n)
    return None if d is None else d * sd


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float | None:
    """P(X > Y) + P(X = Y) / 2 over all pairs of one value of ``x`` and one of ``y``.

    The Mann-Whitney U statistic of ``x`` divided by ``len(x) * len(y)``, as Agarwal et al. define
    the probability of improvement for one task.
    """
    if len(x) == 0 or len(y) == 0:
        return None
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(np.asarray(x, float), np.asarray(y, float), alternative="two-sided").statistic
    return float(u) / (len(x) * len(y))


def compare_seeds(variant: str, reference: str, var: Mapping[int, float], ref: Mapping[int, float],
                  paper_effect: float | None = None, family: str = "") -> SeedComparison:
    """Compare per-seed accuracies ``var`` and ``ref`` (``{seed: accuracy}``).

    Pairs the common seeds when there are at least two; otherwise compares the two sets of seeds
    (Welch). The verdict is provisional (uncorrected p) until :func:`holm` runs over the family.
    """
    from scipy import stats

    out = SeedComparison(variant=variant, reference=reference, family=family, paper_effect=paper_effect)
    common = sorted(set(var) & set(ref))
    x_all = [float(var[s]) for s in sorted(var)]
    y_all = [float(ref[s]) for s in sorted(ref)]
    out.prob_improvement = probability_of_improvement(x_all, y_all)
    if len(common) >= 2:
        d = np.array([float(var[s]) - float(ref[s]) for s in common])
        out.paired, out.seeds, out.reference_seeds = True, common, common
        out.per_seed = {s: float(v) for s, v in zip(common, d)}
        out.effect = float(d.mean())
        out.sd = float(d.std(ddof=1))
        if out.sd == 0.0:
            # Every seed moved by exactly the same amount (e.g. a cell that computes its reference
            # exactly: all differences 0). The t statistic is undefined; the data are unambiguous.
            out.p_value = 1.0 if out.effect == 0.0 else 0.0
            out.ci_low = out.ci_high = out.effect
        else:
            res = stats.ttest_1samp(d, 0.0)  # the paired t-test: one-sample t over the differences
            ci = res.confidence_interval(1 - ALPHA)
            out.p_value = _finite(res.pvalue)
            out.ci_low, out.ci_high = _finite(ci.low), _finite(ci.high)
        out.mde = _mde(len(common), out.sd, paired=True)
        out.seeds_for_paper_effect = _seeds_needed(paper_effect, out.sd, paired=True)
    elif len(x_all) >= 2 and len(y_all) >= 2:
        out.paired, out.seeds, out.reference_seeds = False, sorted(var), sorted(ref)
        out.effect = float(np.mean(x_all) - np.mean(y_all))
        res = stats.ttest_ind(x_all, y_all, equal_var=False)
        ci = res.confidence_interval(1 - ALPHA)
        out.p_value = _finite(res.pvalue)
        out.ci_low, out.ci_high = _finite(ci.low), _finite(ci.high)
        pooled = math.sqrt((np.var(x_all, ddof=1) + np.var(y_all, ddof=1)) / 2)
        out.sd = pooled
        out.mde = _mde(min(len(x_all), len(y_all)), pooled, paired=False)
        out.seeds_for_paper_effect = _seeds_needed(paper_effect, pooled, paired=False)
        out.reason = "no seed run by both: compared as two independent sets of seeds (Welch)"
    else:
        out.seeds, out.reference_seeds = sorted(var), sorted(ref)
        out.reason = (f"needs at least two seeds per cell (this cell: {len(var)}, {reference}: {len(ref)}): "
                      "one run says nothing about seed-to-seed variance")
        return out
    out.verdict = _verdict(out.effect, out.p_value)
    return out


def _verdict(effect: float | None, p: float | None) -> str:
    if p is None or effect is None:
        return NOT_TESTED
    if p < ALPHA and effect != 0:
        return BETTER if effect > 0 else WORSE
    return NO_DIFFERENCE


def holm(comparisons: Sequence[SeedComparison]) -> None:
    """Holm-adjust the p-values of each family in place and set the verdicts from them."""
    from statsmodels.stats.multitest import multipletests

    families: dict[str, list[SeedComparison]] = {}
    for c in comparisons:
        if c.tested:
            families.setdefault(c.family, []).append(c)
    for members in families.values():
        _, adjusted, _, _ = multipletests([c.p_value for c in members], alpha=ALPHA, method="holm")
        for c, p in zip(members, adjusted):
            c.p_holm = float(p)
            c.verdict = _verdict(c.effect, c.p_holm)


__all__ = [
    "ALPHA", "BETTER", "NOT_TESTED", "NO_DIFFERENCE", "POWER", "WORSE", "SeedComparison", "compare_seeds",
    "holm", "probability_of_improvement",
]
