"""Always-valid statistics: every test here may be looked at after every observation.

Outcome differences use the Gaussian mixture SPRT (Robbins 1970; Johari et al. 2017,
"Always valid inference"): with estimate d of the difference and its variance V, and a
N(0, tau2) mixing prior, Lambda = sqrt(V / (V + tau2)) exp(d^2 tau2 / (2 V (V + tau2))).
Rejecting when Lambda >= 1/alpha, and the interval d +/- sqrt(V (V + tau2) / tau2 *
(log((V + tau2) / V) + 2 log(1/alpha))), hold at every look at once (asymptotically, with
plug-in variances). tau2 is pooled variance x 2/n0: the interval is tightest near n0 per arm.

Guardrails and SRM are binomial tests whose null probability p0 may change between
batches (the split moves between steps): the alternative is logit p = logit p0 + s for a
fixed shift s. That is one exponential family in s, so each likelihood ratio is a
martingale under p = p0 and, for s > 0, a supermartingale under any p <= p0; an equally
weighted mixture over a grid of shifts is an e-process, and Ville's inequality bounds the
chance it ever reaches 1/alpha by alpha, however often it is read.
- errors: conditional on a batch's total errors, the candidate's share is binomial with
  p0 = r n_cand / (r n_cand + n_ctrl) at rate ratio r (Poisson approximation; no control
  errors is no problem: every candidate error is evidence). A batch with no control
  traffic (a 100% step) is judged against r x an upper bound of the control's past rate.
- latency: a candidate request slower than r x the control's q-quantile has probability
  at most 1 - q under the null; the control quantile is an upper confidence bound read
  from a histogram, rounded up to its bucket edge, so exceedances are never overcounted.
- SRM: the candidate's share of assignment units against the configured share, two-sided.
The classic chi-square test of SRM is here too (`srm_chi2`) for reporting.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from experiments.special import beta_ppf, chi2_sf

ERROR_SHIFTS = tuple(math.log(r) for r in (1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0))
LATENCY_SHIFTS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
SRM_SHIFTS = tuple(s * k for k in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0) for s in (-1.0, 1.0))
SRM_ALPHA = 0.001


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and sum of squared deviations of one arm's values (Welford / Chan merge)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        a = np.asarray(values, dtype=float)
        if a.size == 0:
            return cls()
        return cls(int(a.size), float(a.mean()), float(((a - a.mean()) ** 2).sum()))

    def add(self, x: float) -> Moments:
        n = self.n + 1
        d = x - self.mean
        mean = self.mean + d / n
        return Moments(n, mean, self.m2 + d * (x - mean))

    def merge(self, o: Moments) -> Moments:
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        n = self.n + o.n
        d = o.mean - self.mean
        return Moments(n, self.mean + d * o.n / n, self.m2 + o.m2 + d * d * self.n * o.n / n)

    @property
    def var(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


def log_msprt(diff: float, var: float, tau2: float) -> float:
    """log Lambda of the Gaussian mixture SPRT for H0: difference = 0."""
    return 0.5 * math.log(var / (var + tau2)) + diff * diff * tau2 / (2.0 * var * (var + tau2))


def cs_halfwidth(var: float, tau2: float, alpha: float) -> float:
    """Half-width of the always-valid confidence interval (0 outside it iff Lambda >= 1/alpha)."""
    return math.sqrt(var * (var + tau2) / tau2 * (math.log((var + tau2) / var) + 2.0 * math.log(1.0 / alpha)))


@dataclass(frozen=True, slots=True)
class Difference:
    """candidate - control, with its always-valid interval and evidence against no difference."""

    estimate: float
    low: float
    high: float
    log_lambda: float
    significant: bool


def difference(control: Moments, candidate: Moments, alpha: float, n0: int, *, binary: bool = False) -> Difference | None:
    """The always-valid comparison of two arms; None until each arm has two values."""
    if control.n < 2 or candidate.n < 2:
        return None
    va, vb = _unit_var(control, binary), _unit_var(candidate, binary)
    var = va / control.n + vb / candidate.n
    pooled = (control.n * va + candidate.n * vb) / (control.n + candidate.n)
    tau2 = pooled * 2.0 / max(n0, 1)
    d = candidate.mean - control.mean
    ll = log_msprt(d, var, tau2)
    h = cs_halfwidth(var, tau2, alpha)
    return Difference(d, d - h, d + h, ll, ll >= math.log(1.0 / alpha))


def _unit_var(m: Moments, binary: bool) -> float:
    """A variance that is never 0: Bernoulli with a +1/2 smoothing, or the sample variance floored."""
    if binary:
        p = (m.mean * m.n + 0.5) / (m.n + 1.0)
        return p * (1.0 - p)
    return max(m.var, 1e-12 * (1.0 + m.mean * m.mean))


def planned_size(effect: float, sd: float, alpha: float, n0: int, power: float = 0.8) -> int:
    """Per-arm size (balanced) at which the last look alone rejects with `power` (looks before only help)."""
    def power_at(n: int) -> float:
        h, h0 = 2.0 / n, 2.0 / n0
        bound = math.sqrt((1.0 + h / h0) * (math.log(1.0 + h0 / h) + 2.0 * math.log(1.0 / alpha)))
        return norm_cdf(abs(effect) / (sd * math.sqrt(h)) - bound)

    hi = 2
    while power_at(hi) < power:
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power_at(mid) < power else (lo, mid)
    return hi


def mixture_update(log_lrs: Sequence[float], shifts: Sequence[float], x: int, n: int, p0: float) -> tuple[float, ...]:
    """Each component's log likelihood ratio after x successes in n at null probability p0."""
    if n <= 0 or not 0.0 < p0 < 1.0:
        return tuple(log_lrs)
    s = np.asarray(shifts, dtype=float)
    lp1 = -np.logaddexp(0.0, -(math.log(p0 / (1.0 - p0)) + s))  # log p1
    lq1 = -np.logaddexp(0.0, math.log(p0 / (1.0 - p0)) + s)  # log (1 - p1)
    step = x * (lp1 - math.log(p0)) + (n - x) * (lq1 - math.log1p(-p0))
    return tuple(float(v) for v in np.asarray(log_lrs, dtype=float) + step)


def fresh(shifts: Sequence[float]) -> tuple[float, ...]:
    return (0.0,) * len(shifts)


def log_evidence(log_lrs: Sequence[float]) -> float:
    """log of the equally weighted mixture: the e-value, on a log scale."""
    a = np.asarray(log_lrs, dtype=float)
    return float(np.logaddexp.reduce(a) - math.log(a.size)) if a.size else 0.0


def error_update(log_lrs: Sequence[float], max_ratio: float, ctrl: tuple[int, int], cand: tuple[int, int]) -> tuple[float, ...]:
    """Fold one batch of (errors, requests) per arm into the error-ratio e-process."""
    (ea, na), (eb, nb) = ctrl, cand
    if na <= 0 or nb <= 0 or ea + eb == 0:
        return tuple(log_lrs)
    p0 = max_ratio * nb / (max_ratio * nb + na)
    return mixture_update(log_lrs, ERROR_SHIFTS, eb, ea + eb, p0)


def error_update_vs_history(log_lrs: Sequence[float], max_ratio: float, history: tuple[int, int],
                            cand: tuple[int, int]) -> tuple[float, ...]:
    """Without concurrent control traffic (a 100% step): test the candidate's errors against
    max_ratio x a 95% upper confidence bound (Clopper-Pearson) of the control's earlier rate."""
    (e, n), (eb, nb) = history, cand
    if n <= 0 or nb <= 0:
        return tuple(log_lrs)
    upper = 1.0 if e >= n else beta_ppf(0.95, e + 1, n - e)
    return mixture_update(log_lrs, ERROR_SHIFTS, eb, nb, min(max_ratio * upper, 1.0))


def latency_threshold(edges: Sequence[float], control: Sequence[int], quantile: float, max_ratio: float,
                      z: float = 1.645) -> float | None:
    """max_ratio x an upper confidence bound of the control's quantile; None with too few requests.

    Bucket i of `control` holds values in (edges[i-1], edges[i]]; the last one is overflow.
    """
    n = int(sum(control))
    if n == 0:
        return None
    rank = math.ceil(n * quantile + z * math.sqrt(n * quantile * (1.0 - quantile)))
    if rank > n:
        return None
    cum = np.cumsum(np.asarray(control, dtype=np.int64))
    i = int(np.searchsorted(cum, rank))
    return None if i >= len(edges) else float(edges[i]) * max_ratio


def exceedances(edges: Sequence[float], candidate: Sequence[int], threshold: float) -> tuple[int, int]:
    """(requests surely slower than threshold, requests) of a histogram: whole buckets above it only."""
    c = np.asarray(candidate, dtype=np.int64)
    lows = np.concatenate(([0.0], np.asarray(edges, dtype=float)))[: c.size]
    return int(c[lows >= threshold].sum()), int(c.sum())


def latency_update(log_lrs: Sequence[float], quantile: float, slow: int, n: int) -> tuple[float, ...]:
    return mixture_update(log_lrs, LATENCY_SHIFTS, slow, n, 1.0 - quantile)


def srm_update(log_lrs: Sequence[float], n_ctrl: int, n_cand: int, share: float) -> tuple[float, ...]:
    return mixture_update(log_lrs, SRM_SHIFTS, n_cand, n_ctrl + n_cand, share)


def srm_chi2(observed: Sequence[float], expected: Sequence[float]) -> tuple[float, float]:
    """Pearson's chi-square of observed against expected counts: (statistic, p-value), df = k - 1."""
    o, e = np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)
    keep = e > 0
    if keep.sum() < 2:
        return 0.0, 1.0
    stat = float((((o - e) ** 2)[keep] / e[keep]).sum())
    return stat, chi2_sf(stat, int(keep.sum()) - 1)


# --- issue 29: strata, units, time-local evidence, two-sample latency ---------------------

_NORMAL = NormalDist()
# A finer grid of rate ratios than ERROR_SHIFTS: the time-local, two-sample tests need the
# small ones (a p99 +30% judged at max_ratio 1.2 is a slow-request ratio of about 1.5).
RATIO_SHIFTS = tuple(math.log(r) for r in (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0))


def norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def norm_ppf(p: float) -> float:
    return _NORMAL.inv_cdf(p)


def rho2_factor(alpha: float) -> float:
    """-2 ln alpha + ln(1 - 2 ln alpha): 7.94 at alpha 0.05 (Waudby-Smith et al.; GrowthBook's N*)."""
    return -2.0 * math.log(alpha) + math.log(1.0 - 2.0 * math.log(alpha))


def tau2_at(pooled_var: float, alpha: float, planned_n: int) -> float:
    """Mixing variance that makes the interval tightest at `planned_n` units per arm:
    tau2 = rho2_factor(alpha) x pooled x 2 / planned_n (7.94 x pooled x 2 / planned_n at alpha 0.05)."""
    return rho2_factor(alpha) * pooled_var * 2.0 / max(planned_n, 1)


@dataclass(frozen=True, slots=True)
class UnitSums:
    """Per-unit (per sticky key) aggregates of one arm for a ratio metric y / x.

    units: distinct keys; x, xx: sum and sum of squares of the per-key denominators
    (requests, or feedback items); y, yy: the same of the numerators (errors, or the sum
    of outcome values); xy: sum of per-key cross products. Sums of increments are sums:
    when one key's (x, y) goes from (a, b) to (a + 1, b + v), xx grows by 2a + 1, yy by
    2bv + v^2 and xy by b + v(a + 1), so a counter can ship increments, not key lists.
    """

    units: int = 0
    x: float = 0.0
    xx: float = 0.0
    y: float = 0.0
    yy: float = 0.0
    xy: float = 0.0

    @classmethod
    def of(cls, xs: Sequence[float], ys: Sequence[float]) -> UnitSums:
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        return cls(int(x.size), float(x.sum()), float((x * x).sum()), float(y.sum()), float((y * y).sum()),
                   float((x * y).sum()))

    def merge(self, o: UnitSums) -> UnitSums:
        return UnitSums(self.units + o.units, self.x + o.x, self.xx + o.xx, self.y + o.y, self.yy + o.yy,
                        self.xy + o.xy)

    @property
    def ratio(self) -> float:
        return self.y / self.x if self.x > 0 else 0.0

    def residual_ss(self) -> float:
        """sum over keys of (y_k - ratio x_k)^2, never negative."""
        r = self.ratio
        return max(self.yy - 2.0 * r * self.xy + r * r * self.xx, 0.0)

    def ratio_var(self) -> float:
        """Delta-method variance of y / x with keys as the independent units (0 with < 2 keys)."""
        if self.units < 2 or self.x <= 0:
            return 0.0
        return self.residual_ss() / (self.x * self.x) * self.units / (self.units - 1)


def dispersion(*arms: UnitSums) -> float:
    """How much keys inflate a count's variance over Poisson: the delta-method variance of
    the error rate over its Poisson variance (rate / requests), pooled over arms, >= 1."""
    num = den = 0.0
    units = 0
    for a in arms:
        if a.units < 2 or a.x <= 0 or a.y <= 0:
            continue
        num += a.residual_ss() * a.units / (a.units - 1)
        den += a.y  # Poisson: var(y_k - r x_k) summed is about r sum x = y
        units += a.units
    if den < 5 or units < 10:  # too few events to estimate it
        return 1.0
    return max(1.0, num / den)


@dataclass(frozen=True, slots=True)
class Stratum:
    """One stratum's (generation's) estimate of candidate - control and its variance."""

    estimate: float
    var: float
    n_control: float
    n_candidate: float


def stratum_from_moments(a: Moments, b: Moments, binary: bool) -> Stratum | None:
    if a.n < 2 or b.n < 2:
        return None
    return Stratum(b.mean - a.mean, _unit_var(a, binary) / a.n + _unit_var(b, binary) / b.n, a.n, b.n)


def stratum_from_units(a: UnitSums, b: UnitSums, binary: bool) -> Stratum | None:
    if a.units < 2 or b.units < 2 or a.x <= 0 or b.x <= 0:
        return None

    def var(u: UnitSums) -> float:
        v = u.ratio_var()
        if binary:  # never 0 (all keys alike): a quarter of the smoothed per-item Bernoulli variance
            p = (u.y + 0.5) / (u.x + 1.0)
            return max(v, 0.25 * p * (1.0 - p) / u.x)
        return max(v, 1e-12 * (1.0 + u.ratio * u.ratio) / u.x)

    return Stratum(b.ratio - a.ratio, var(a) + var(b), a.units, b.units)


def stratified_difference(strata: Sequence[Stratum], alpha: float, planned_n: int) -> Difference | None:
    """Combine strata by precision: S = sum d_k / V_k, I = sum 1 / V_k, estimate S / I with
    variance 1 / I, and the mixture SPRT and interval on it, tuned at planned_n per arm."""
    s = i = na = nb = 0.0
    for st_ in strata:
        if st_.var <= 0:
            continue
        s += st_.estimate / st_.var
        i += 1.0 / st_.var
        na += st_.n_control
        nb += st_.n_candidate
    if i <= 0:
        return None
    var = 1.0 / i
    d = s / i
    pooled = var / (1.0 / na + 1.0 / nb)  # per-unit variance that gives this precision
    tau2 = tau2_at(pooled, alpha, planned_n)
    ll = log_msprt(d, var, tau2)
    h = cs_halfwidth(var, tau2, alpha)
    return Difference(d, d - h, d + h, ll, ll >= math.log(1.0 / alpha))


def detectable_effect(sd: float, alpha: float, planned_n: int, power: float = 0.8) -> float:
    """The effect a balanced test reaches with `power` at planned_n per arm (inverse of planned_size)."""
    h = 2.0 / planned_n
    bound = math.sqrt(2.0 * (math.log(2.0) + 2.0 * math.log(1.0 / alpha)))  # the bound at n = n0
    return sd * math.sqrt(h) * (bound + norm_ppf(power))


# Time-local evidence. A restart mixture: component j starts at the j-th restart and is the
# shift mixture of likelihood ratios from there on; weights w_j = 1/(j(j+1)) sum to 1, and a
# component not yet started counts as 1. Every component is a test supermartingale under the
# null, so E = sum_j w_j M_j is one too (one e-process: Ville's inequality over the whole
# run). For a fixed shift every started component gets the same factor, so the state is one
# number per shift: log A_s = log sum_{started j} w_j prod(factors since j), plus the count
# of restarts J; E = mean_s A_s + 1/(J + 1) (the weight of components not started yet).


def restart_weight(j: int) -> float:
    return 1.0 / (j * (j + 1.0))


def restarted(log_a: Sequence[float], restarts: int) -> tuple[tuple[float, ...], int]:
    """Start component restarts + 1 (weight 1/(j(j+1))): (new log A per shift, new restart count)."""
    j = restarts + 1
    lw = math.log(restart_weight(j))
    if restarts == 0:
        return tuple(lw for _ in log_a), j
    return tuple(float(np.logaddexp(v, lw)) for v in log_a), j


def restart_evidence(log_a: Sequence[float], restarts: int) -> float:
    """log E of the restart mixture."""
    if restarts == 0 or not log_a:
        return 0.0
    a = np.asarray(log_a, dtype=float)
    started = float(np.logaddexp.reduce(a) - math.log(a.size))
    return float(np.logaddexp(started, -math.log(restarts + 1.0)))


def ratio_update(log_a: Sequence[float], shifts: Sequence[float], ratio: float, ctrl: tuple[float, float],
                 cand: tuple[float, float], scale: float = 1.0) -> tuple[float, ...]:
    """Fold one batch of (events, exposure) per arm into a conditional rate-ratio test of
    H0: candidate rate <= ratio x control rate (the candidate's share of the batch's events
    is binomial with p0 = ratio n_cand / (ratio n_cand + n_ctrl)). `scale` >= 1 divides the
    counts (quasi-likelihood: events that come in clusters per key weigh less)."""
    (ea, na), (eb, nb) = ctrl, cand
    if na <= 0 or nb <= 0 or ea + eb <= 0:
        return tuple(log_a)
    p0 = ratio * nb / (ratio * nb + na)
    return mixture_update(log_a, shifts, eb / scale, (ea + eb) / scale, p0)


def quantile_edge(edges: Sequence[float], hist: Sequence[int], quantile: float) -> float | None:
    """The bucket edge at or above the control's `quantile` (a point estimate), None without data
    or when it falls in the overflow bucket."""
    cum = list(itertools.accumulate(hist))
    n = cum[-1] if cum else 0
    if n == 0:
        return None
    i = bisect.bisect_left(cum, max(1, math.ceil(n * quantile)))
    return None if i >= len(edges) else float(edges[i])


def above(edges: Sequence[float], hist: Sequence[int], t: float) -> float:
    """Requests above t in a histogram (bucket i holds (edges[i-1], edges[i]]; one overflow
    bucket); the bucket that straddles t counts its part above t, log-linearly interpolated
    (none of the overflow bucket when t is beyond the last edge)."""
    if not hist:
        return 0.0
    i = bisect.bisect_left(edges, t)  # edges[i-1] < t <= edges[i]
    if i >= len(edges):
        return 0.0
    total = float(sum(hist[i + 1:]))
    hi, lo = edges[i], edges[i - 1] if i > 0 else 0.0
    if hi > t and lo > 0 and hist[i]:
        total += hist[i] * (math.log(hi) - math.log(t)) / (math.log(hi) - math.log(lo))
    return total
