"""The three distribution functions stats.py needs, in the standard library.

scipy was 143 MB of the install and a third of the start-up import for these three calls.
Accuracy against scipy is tested (tests/experiments/test_exp_special.py): the normal CDF
is exact (erfc); the others use the continued fractions of Numerical Recipes (Lentz's
method) with lgamma prefactors, relative error ~1e-12 over the counts an experiment sees.
"""

from __future__ import annotations

import math

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 100_000  # the fractions converge in O(sqrt(a + b)) terms: enough past 10^9 counts


def norm_cdf(x: float) -> float:
    """P(Z <= x) for a standard normal Z."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _lentz(term, first: float) -> float:
    """Evaluate 1 / (1 + d1 / (1 + d2 / ...)) given term(m) -> d_m, starting with d_1 = first."""
    c, d = 1.0, 1.0 - first
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER):
        for num in term(m):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError("continued fraction did not converge")


def _betacf(a: float, b: float, x: float) -> float:
    def term(m: int):
        m2 = 2 * m
        yield m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        yield -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))

    return _lentz(term, (a + b) * x / (a + 1.0))


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q (bisection: I is increasing; 200 halvings reach double precision)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return 0.5 * (lo + hi)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X chi-square with df degrees of freedom: Q(df/2, x/2)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x <= 0.0:
        return 1.0
    a, y = df / 2.0, x / 2.0
    front = math.exp(a * math.log(y) - y - math.lgamma(a))
    if y < a + 1.0:  # the series for P(a, y), then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(_MAX_ITER):
            n += 1.0
            term *= y / n
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return max(0.0, 1.0 - front * total)
    # Q(a, y) by its continued fraction (Numerical Recipes gcf), Lentz's method
    b = y + 1.0 - a
    c, d = 1.0 / _TINY, 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = b + an / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return front * h
    raise ArithmeticError("continued fraction did not converge")
