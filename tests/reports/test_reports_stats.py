"""Statistics used by the report: summaries over seeds and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from reports.render import mean_std
from reports.stats import paired_bootstrap, rng_for, summarize, t_quantile


def test_t_quantiles_match_tables():
    # Student-t two-sided 95% critical values from any statistics table.
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.975, 9) == pytest.approx(2.262, abs=1e-3)


def test_summary_of_seeds():
    s = summarize([0.70, 0.72, 0.74])
    assert s.mean == pytest.approx(0.72)
    assert s.std == pytest.approx(0.02)  # ddof=1
    half = 4.302652729911275 * 0.02 / np.sqrt(3)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.72 - half, 0.72 + half))


def test_one_seed_has_no_spread():
    s = summarize([0.7])
    assert s.std is None and s.ci_low is None
    assert mean_std(s.as_dict()) == "70.00 ± n/a"
    assert summarize([]).mean is None


def test_bootstrap_no_difference():
    r = paired_bootstrap(np.zeros(100), rng_for("a", "b"))
    assert r.mean == 0 and not r.significant and r.p_value == 1.0


def test_bootstrap_clear_difference_and_determinism():
    rng = np.random.default_rng(0)
    diffs = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.1, 0.7, 0.2])  # +0.1 on average
    a = paired_bootstrap(diffs, rng_for("span", "softmax"))
    b = paired_bootstrap(diffs, rng_for("span", "softmax"))
    assert a == b  # same names, same resamples: reports are reproducible
    assert a.significant and a.ci_low > 0 and a.p_value < 0.001
    assert a.ci_low < a.mean < a.ci_high


def test_bootstrap_p_value_is_calibrated_roughly():
    """Under no true difference, p < 0.05 about 5% of the time (loose bounds; 200 trials)."""
    rng = np.random.default_rng(1)
    hits = sum(paired_bootstrap(rng.normal(0, 1, 300), rng_for(str(i)), n_resamples=400).p_value < 0.05
               for i in range(200))
    assert 2 <= hits <= 25
