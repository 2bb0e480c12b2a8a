"""experiments/special.py against scipy (a dev dependency only), over the ranges stats.py uses."""

import math

import numpy as np
import pytest

from experiments import special

st = pytest.importorskip("scipy.stats")


def test_norm_cdf_matches_scipy():
    for x in np.linspace(-12, 12, 241):
        assert special.norm_cdf(x) == pytest.approx(st.norm.cdf(x), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("e,n", [(0, 1), (0, 10), (1, 10), (3, 1000), (0, 100_000), (17, 250),
                                 (999, 1000), (50_000, 100_000), (12, 5_000_000), (40_000, 3_000_000)])
def test_clopper_pearson_upper_bound_matches_scipy(e, n):
    for q in (0.05, 0.5, 0.95, 0.999):
        assert special.beta_ppf(q, e + 1, n - e) == pytest.approx(st.beta.ppf(q, e + 1, n - e), rel=1e-9)


def test_beta_cdf_matches_scipy():
    rng = np.random.default_rng(5)
    for _ in range(300):
        a, b, x = rng.uniform(0.5, 5000), rng.uniform(0.5, 5000), rng.uniform()
        assert special.beta_cdf(x, a, b) == pytest.approx(st.beta.cdf(x, a, b), rel=1e-9, abs=1e-250)


def test_chi2_sf_matches_scipy():
    for df in (1, 2, 3, 4, 7, 15):
        for x in (0.0, 1e-6, 0.1, 0.5, 1.0, 2.5, df, 10.0, 40.0, 200.0, 900.0):
            assert special.chi2_sf(x, df) == pytest.approx(st.chi2.sf(x, df), rel=1e-10, abs=1e-300)
    assert special.chi2_sf(0.8, 1) == pytest.approx(math.erfc(math.sqrt(0.4)), rel=1e-12)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="quantile"):
        special.beta_ppf(1.0, 1, 1)
    with pytest.raises(ValueError, match="degrees of freedom"):
        special.chi2_sf(1.0, 0)
