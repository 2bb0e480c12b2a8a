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


# --- issue 29 -------------------------------------------------------------------------------


def test_rho2_factor_and_tau2_at_the_planned_size():
    assert stats.rho2_factor(0.05) == pytest.approx(7.94, abs=0.005)  # -2 ln a + ln(1 - 2 ln a)
    assert stats.tau2_at(0.25, 0.05, 1000) == pytest.approx(stats.rho2_factor(0.05) * 0.25 * 2 / 1000)


def test_unit_sums_delta_method_matches_per_key_arithmetic():
    rng = np.random.default_rng(3)
    x = rng.integers(1, 30, 400).astype(float)
    y = rng.binomial(x.astype(int), 0.2).astype(float)
    u = stats.UnitSums.of(x, y)
    r = y.sum() / x.sum()
    want = ((y - r * x) ** 2).sum() / x.sum() ** 2 * 400 / 399
    assert u.ratio == pytest.approx(r) and u.ratio_var() == pytest.approx(want, rel=1e-10)
    # increments: sums of per-key updates equal the sums of the final per-key values
    half = stats.UnitSums.of(x // 2, y // 2)
    inc = stats.UnitSums(0, *(float(v) for v in (
        (x - x // 2).sum(), (x * x - (x // 2) ** 2).sum(), (y - y // 2).sum(), (y * y - (y // 2) ** 2).sum(),
        (x * y - (x // 2) * (y // 2)).sum())))
    assert dataclasses_close(half.merge(inc), u)


def dataclasses_close(a, b):
    return all(math.isclose(getattr(a, f), getattr(b, f), rel_tol=1e-12) for f in ("x", "xx", "y", "yy", "xy"))


def test_one_stratum_is_the_plain_difference_and_strata_combine_by_precision():
    a, b = Moments(400, 0.10, 0.10 * 0.90 * 399), Moments(400, 0.20, 0.20 * 0.80 * 399)
    one = stats.stratified_difference([stats.stratum_from_moments(a, b, False)], 0.05, 400)
    var = 0.09 / 400 + 0.16 / 400
    tau2 = stats.tau2_at((0.09 + 0.16) / 2, 0.05, 400)  # tuned at planned_n (the legacy difference() is not)
    assert one.estimate == pytest.approx(0.1) and one.low == pytest.approx(0.1 - stats.cs_halfwidth(var, tau2, 0.05))
    # the interval is tightest near planned_n: the half-width over sqrt(var) is smallest there
    ratio = {n: stats.cs_halfwidth(2 * 0.25 / n, stats.tau2_at(0.25, 0.05, 1000), 0.05) / math.sqrt(2 * 0.25 / n)
             for n in (250, 1000, 4000)}
    assert ratio[1000] < ratio[250] and ratio[1000] < ratio[4000]
    s1, s2 = stats.Stratum(0.1, 0.01, 100, 100), stats.Stratum(0.3, 0.04, 25, 25)
    d = stats.stratified_difference([s1, s2], 0.05, 100)
    assert d.estimate == pytest.approx((0.1 / 0.01 + 0.3 / 0.04) / (1 / 0.01 + 1 / 0.04))


def test_restart_mixture_weights_and_evidence():
    la, j = stats.restarted(stats.fresh((0.5, 1.0)), 0)
    assert j == 1 and la == pytest.approx((math.log(0.5), math.log(0.5)))
    assert stats.restart_evidence(la, j) == pytest.approx(0.0)  # nothing observed: E = 1/2 + 1/2
    la2, j2 = stats.restarted(la, j)  # second component: weight 1/6
    assert math.exp(stats.restart_evidence(la2, j2)) == pytest.approx(0.5 + 1 / 6 + 1 / 3)
    up = tuple(v + math.log(100) for v in la2)  # every started component x100
    assert math.exp(stats.restart_evidence(up, j2)) == pytest.approx((0.5 + 1 / 6) * 100 + 1 / 3)


def test_two_sample_latency_pieces():
    edges = [1.0, 2.0, 4.0, 8.0]  # buckets (0,1] (1,2] (2,4] (4,8] (8,inf)
    assert stats.quantile_edge(edges, [0, 600, 400, 0, 0], 0.5) == 2.0
    assert stats.quantile_edge(edges, [0, 0, 0, 0, 10], 0.5) is None
    assert stats.above(edges, [0, 0, 10, 5, 3], 4.0) == 8
    assert stats.above(edges, [0, 0, 10, 5, 3], 2.0 * math.sqrt(2)) == pytest.approx(8 + 5)  # half of (2,4] in log
    assert stats.above(edges, [0, 0, 10, 5, 3], 100.0) == 0  # beyond the last edge: nothing counted


def test_ratio_update_is_the_conditional_binomial_and_scale_divides_counts():
    plain = stats.ratio_update(stats.fresh(stats.RATIO_SHIFTS), stats.RATIO_SHIFTS, 1.5, (95, 9500), (10, 500))
    assert plain == pytest.approx(stats.mixture_update(stats.fresh(stats.RATIO_SHIFTS), stats.RATIO_SHIFTS, 10, 105,
                                                       750 / 10250))
    half = stats.ratio_update(stats.fresh(stats.RATIO_SHIFTS), stats.RATIO_SHIFTS, 1.5, (95, 9500), (10, 500), 2.0)
    assert half == pytest.approx(tuple(v / 2 for v in plain))


def test_dispersion_is_one_for_poisson_keys_and_large_for_clustered_ones():
    rng = np.random.default_rng(4)
    x = rng.integers(1, 50, 2000).astype(float)
    assert stats.dispersion(stats.UnitSums.of(x, rng.binomial(x.astype(int), 0.02))) == pytest.approx(1.0, abs=0.15)
    p = np.clip(0.02 * rng.gamma(0.3, 1 / 0.3, 2000), 0, 1)
    assert stats.dispersion(stats.UnitSums.of(x, rng.binomial(x.astype(int), p))) > 2
