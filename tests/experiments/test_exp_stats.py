"""Known answers pin the formulas of experiments/stats.py (values worked out by hand)."""

import math

import numpy as np
import pytest

from experiments import stats
from experiments.stats import Moments


def test_msprt_known_answer():
    # d = 0.1, V = 0.01, tau2 = 0.04: sqrt(0.2) * exp(0.01 * 0.04 / (2 * 0.01 * 0.05)) = sqrt(0.2) e^0.4
    assert stats.log_msprt(0.1, 0.01, 0.04) == pytest.approx(0.5 * math.log(0.2) + 0.4, rel=1e-12)
    assert math.exp(stats.log_msprt(0.1, 0.01, 0.04)) == pytest.approx(0.667164, abs=1e-6)
    # sqrt(0.01 * 0.05 / 0.04 * (log 5 + 2 log 20)) = sqrt(0.0125 * 7.600902)
    assert stats.cs_halfwidth(0.01, 0.04, 0.05) == pytest.approx(0.308239, abs=1e-6)


def test_interval_excludes_zero_exactly_when_evidence_reaches_one_over_alpha():
    rng = np.random.default_rng(7)
    for _ in range(500):
        d, var, tau2, alpha = rng.normal(0, 1), rng.uniform(0.01, 1), rng.uniform(0.01, 1), rng.uniform(0.01, 0.2)
        rejects = stats.log_msprt(d, var, tau2) >= math.log(1 / alpha)
        assert rejects == (abs(d) > stats.cs_halfwidth(var, tau2, alpha))


def test_moments_merge_and_add_match_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(3, 2, 100), rng.normal(-1, 5, 37)
    merged = Moments.of(a).merge(Moments.of(b))
    both = np.concatenate([a, b])
    assert merged.n == 137
    assert merged.mean == pytest.approx(both.mean(), rel=1e-12)
    assert merged.var == pytest.approx(both.var(ddof=1), rel=1e-10)
    stepwise = Moments()
    for x in both:
        stepwise = stepwise.add(float(x))
    assert stepwise.var == pytest.approx(both.var(ddof=1), rel=1e-10)
    assert Moments().merge(Moments.of(a)) == Moments.of(a)


def test_difference_of_two_arms():
    ctrl, cand = Moments(400, 0.10, 0.10 * 0.90 * 399), Moments(400, 0.20, 0.20 * 0.80 * 399)
    d = stats.difference(ctrl, cand, 0.05, 400, binary=False)
    var = 0.09 / 400 + 0.16 / 400
    tau2 = (0.09 + 0.16) / 2 * 2 / 400
    assert d.estimate == pytest.approx(0.10)
    assert d.log_lambda == pytest.approx(stats.log_msprt(0.1, var, tau2))
    assert d.high - d.estimate == pytest.approx(stats.cs_halfwidth(var, tau2, 0.05))
    assert d.significant and d.low > 0
    assert stats.difference(Moments(1, 0.0, 0.0), cand, 0.05, 400) is None  # too few to judge


def test_binary_variance_never_zero():
    d = stats.difference(Moments(50), Moments(50), 0.05, 100, binary=True)  # all zeros on both arms
    assert d.estimate == 0 and d.low < 0 < d.high and not d.significant


def test_planned_size_is_where_the_last_look_reaches_the_power():
    n = stats.planned_size(0.2, 1.0, 0.05, 500)
    def power(n):
        h, h0 = 2 / n, 2 / 500
        b = math.sqrt((1 + h / h0) * (math.log(1 + h0 / h) + 2 * math.log(20)))
        return 0.5 * math.erfc(-(0.2 / math.sqrt(h) - b) / math.sqrt(2))
    assert power(n) >= 0.8 > power(n - 1)
    assert stats.planned_size(0.1, 1.0, 0.05, 500) > 3 * n  # a quarter of the effect squared needs ~4x


def test_binomial_mixture_known_answer():
    # p0 = 0.2, shift log 4 -> p1 = 0.5; 3 of 10: 3 log(0.5/0.2) + 7 log(0.5/0.8)
    (ll,) = stats.mixture_update((0.0,), (math.log(4),), 3, 10, 0.2)
    assert ll == pytest.approx(3 * math.log(2.5) + 7 * math.log(0.625), rel=1e-12)
    assert stats.log_evidence((0.0, math.log(3))) == pytest.approx(math.log(2))
    assert stats.mixture_update((1.0,), (1.0,), 0, 0, 0.3) == (1.0,)  # nothing observed: unchanged


def test_error_ratio_with_no_control_errors():
    # all 5 errors on the candidate, 500 vs 9500 requests, max ratio 1.5: null share q0 = 750 / 10250
    ll = stats.error_update(stats.fresh(stats.ERROR_SHIFTS), 1.5, (0, 9500), (5, 500))
    q0 = 750 / 10250
    want = [5 * math.log(r * 500 / (r * 500 + 9500) / q0) for r in (1.5 * x for x in (1.25, 1.5, 2, 3, 5, 10, 30, 100))]
    assert ll == pytest.approx(tuple(want), rel=1e-10)
    assert math.exp(stats.log_evidence(ll)) >= 20  # five candidate errors and none on control: alarm
    # healthy: errors split like the traffic -> evidence falls below 1
    ok = stats.error_update(stats.fresh(stats.ERROR_SHIFTS), 1.5, (95, 9500), (5, 500))
    assert stats.log_evidence(ok) < 0
    assert stats.error_update((0.0,) * 8, 1.5, (0, 9500), (0, 500)) == (0.0,) * 8  # no errors: no evidence


def test_error_ratio_against_history():
    # Clopper-Pearson upper 95% bound with no errors in n is 1 - 0.05 ** (1 / n)
    ll = stats.error_update_vs_history(stats.fresh(stats.ERROR_SHIFTS), 1.5, (0, 10000), (3, 1000))
    p0 = 1.5 * (1 - 0.05 ** (1 / 10000))
    assert ll == pytest.approx(stats.mixture_update(stats.fresh(stats.ERROR_SHIFTS), stats.ERROR_SHIFTS, 3, 1000, p0))


def test_latency_threshold_and_exceedances():
    edges = [1.0, 2.0, 4.0, 8.0]  # buckets (0,1] (1,2] (2,4] (4,8] (8,inf)
    # n = 1000, q = 0.5: rank ceil(500 + 1.645 sqrt(250)) = 527 falls in (1,2]: edge 2, times 2
    assert stats.latency_threshold(edges, [0, 600, 400, 0, 0], 0.5, 2.0) == 4.0
    assert stats.latency_threshold(edges, [0, 0, 0, 0, 10], 0.5, 2.0) is None  # overflow bucket: no bound
    assert stats.latency_threshold(edges, [0, 5, 0, 0, 0], 0.99, 2.0) is None  # too few for a p99 bound
    assert stats.exceedances(edges, [0, 0, 10, 5, 3], 4.0) == (8, 18)  # only whole buckets above 4
    assert stats.exceedances(edges, [0, 0, 10, 5, 3], 3.0) == (8, 18)  # (2,4] straddles 3: not counted


def test_srm_chi_square_known_answer():
    stat, p = stats.srm_chi2([520, 480], [500, 500])
    assert stat == pytest.approx(1.6)
    assert p == pytest.approx(math.erfc(math.sqrt(0.8)), rel=1e-9)  # df 1: P(chi2 > x) = erfc(sqrt(x / 2))
    stat3, p3 = stats.srm_chi2([10, 20, 30], [20, 20, 20])
    assert stat3 == pytest.approx(10.0) and p3 == pytest.approx(math.exp(-5.0))  # df 2: e^(-x/2)
    assert stats.srm_chi2([5, 0], [5, 0]) == (0.0, 1.0)


def test_srm_mixture_is_two_sided():
    base = stats.fresh(stats.SRM_SHIFTS)
    over = stats.srm_update(base, 9000, 1000, 0.05)
    under = stats.srm_update(base, 9800, 200, 0.05)
    fair = stats.srm_update(base, 9500, 500, 0.05)
    assert stats.log_evidence(over) > math.log(1000) and stats.log_evidence(under) > math.log(1000)
    assert stats.log_evidence(fair) < 0
