"""Seeded simulations that prove the statistics honest under continuous peeking.

Each harness draws whole runs with numpy, then looks at every checkpoint the way the
engine does (the real functions of experiments/stats.py). Bounds are alpha + 3 standard
errors of the simulated rate, so a correct test passes with overwhelming probability and
a test that is wrong by a few points fails. Figures print with -s.
"""

import math

import numpy as np
from scipy import stats as st

from experiments import stats
from experiments.stats import Moments

ALPHA = 0.05
N0 = 500  # tuning size of the mixture (the engine uses min_requests)


def _bound(alpha: float, runs: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def _looks(values: np.ndarray, arm: np.ndarray, every: int):
    """Per look (units so far): per arm (n, sum, sum of squares) across runs, vectorised."""
    for arm_id in (0, 1):
        mask = arm == arm_id
        yield (np.cumsum(mask, axis=1)[:, every - 1::every], np.cumsum(values * mask, axis=1)[:, every - 1::every],
               np.cumsum(values**2 * mask, axis=1)[:, every - 1::every])


def _moments(n, s, ss) -> Moments:
    n = int(n)
    if n == 0:
        return Moments()
    mean = s / n
    return Moments(n, float(mean), float(max(ss - n * mean * mean, 0.0)))


def _peek(values, arm, every, binary, stop_at_first=True):
    """For each run: first look where the mixture SPRT rejects (or -1), the naive t-test ever rejected,
    and the interval at the stopping time (first rejection, else the last look)."""
    (na, sa, qa), (nb, sb, qb) = _looks(values, arm, every)
    runs, looks = na.shape
    first = np.full(runs, -1)
    intervals = np.zeros((runs, 2))
    for r in range(runs):
        for k in range(looks):
            d = stats.difference(_moments(na[r, k], sa[r, k], qa[r, k]), _moments(nb[r, k], sb[r, k], qb[r, k]),
                                 ALPHA, N0, binary=binary)
            if d is None:
                continue
            intervals[r] = (d.low, d.high)
            if d.significant:
                first[r] = k
                break
    # naive Welch t-test at every look
    ma, mb = sa / np.maximum(na, 1), sb / np.maximum(nb, 1)
    va = np.maximum(qa - na * ma**2, 0) / np.maximum(na - 1, 1)
    vb = np.maximum(qb - nb * mb**2, 0) / np.maximum(nb - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        _, p = st.ttest_ind_from_stats(ma, np.sqrt(va), na, mb, np.sqrt(vb), nb, equal_var=False)
    naive = np.nan_to_num(p, nan=1.0) < ALPHA
    return first, naive.any(axis=1), intervals


def test_aa_under_continuous_peeking_binary_and_continuous():
    rng = np.random.default_rng(2026)
    runs, units, every = 2000, 2000, 50
    for binary in (True, False):
        arm = rng.integers(0, 2, size=(runs, units))
        values = (rng.random((runs, units)) < 0.1).astype(float) if binary else rng.normal(5.0, 2.0, (runs, units))
        first, naive, _ = _peek(values, arm, every, binary)
        fpr, naive_fpr = float((first >= 0).mean()), float(naive.mean())
        print(f"A/A {'binary' if binary else 'continuous'}: {runs} runs, a look every {every} units up to {units}: "
              f"always-valid FPR {fpr:.4f} (bound {_bound(ALPHA, runs):.4f}), naive t-test {naive_fpr:.3f}")
        assert fpr <= _bound(ALPHA, runs)
        assert naive_fpr > 0.15


def test_ab_power_and_coverage_at_the_stopping_time():
    rng = np.random.default_rng(15)
    p_ctrl, effect = 0.10, 0.03
    sd = math.sqrt((p_ctrl * (1 - p_ctrl) + (p_ctrl + effect) * (1 - p_ctrl - effect)) / 2)
    per_arm = stats.planned_size(effect, sd, ALPHA, N0)
    runs, every = 1000, 100
    units = 2 * per_arm - (2 * per_arm) % every
    arm = rng.integers(0, 2, size=(runs, units))
    values = (rng.random((runs, units)) < np.where(arm == 1, p_ctrl + effect, p_ctrl)).astype(float)
    first, _, intervals = _peek(values, arm, every, binary=True)
    power = float((first >= 0).mean())
    covered = float(((intervals[:, 0] <= effect) & (effect <= intervals[:, 1])).mean())
    stopped = first[first >= 0]
    print(f"A/B binary {p_ctrl} -> {p_ctrl + effect}: planned {per_arm} per arm; power {power:.3f}, coverage "
          f"{covered:.3f}, median stop at {np.median((stopped + 1) * every) if stopped.size else 0:.0f} units")
    assert power >= 0.8
    assert covered >= 1 - ALPHA


def _srm_flags(rng, runs, share_true, share_cfg, every, units):
    """Looks every `every` units: (sequential test flagged, chi-square at every look flagged) per run."""
    cand = np.cumsum(rng.binomial(every, share_true, size=(runs, units // every)), axis=1)
    total = np.arange(1, units // every + 1) * every
    # The mixture's log likelihood ratios are linear in (successes, failures) at a fixed null
    # share, so the real update's per-unit increments give every look of every run at once.
    win = np.array(stats.srm_update(stats.fresh(stats.SRM_SHIFTS), 0, 1, share_cfg))
    lose = np.array(stats.srm_update(stats.fresh(stats.SRM_SHIFTS), 1, 0, share_cfg))
    ll = cand[..., None] * win + (total - cand)[..., None] * lose
    log_e = np.logaddexp.reduce(ll, axis=-1) - math.log(len(stats.SRM_SHIFTS))
    one = stats.srm_update(stats.fresh(stats.SRM_SHIFTS), every - int(cand[0, 0]), int(cand[0, 0]), share_cfg)
    assert np.isclose(log_e[0, 0], stats.log_evidence(one))  # the shortcut is the real update
    seq = (log_e >= math.log(1 / stats.SRM_ALPHA)).any(axis=1)
    expected = total * share_cfg
    chi2 = (cand - expected) ** 2 / expected + (cand - expected) ** 2 / (total - expected)
    chi = (st.chi2.sf(chi2, 1) < stats.SRM_ALPHA).any(axis=1)
    _, p_last = stats.srm_chi2([total[-1] - cand[0, -1], cand[0, -1]], [total[-1] - expected[-1], expected[-1]])
    assert np.isclose(p_last, st.chi2.sf(chi2[0, -1], 1))  # the vectorised chi-square is srm_chi2's
    return seq, chi


def test_srm_clean_runs_not_flagged_injected_mismatch_flagged():
    rng = np.random.default_rng(99)
    runs, every, units = 2000, 500, 50_000
    clean, chi_clean = _srm_flags(rng, runs, 0.05, 0.05, every, units)
    bad, _ = _srm_flags(rng, 300, 0.06, 0.05, every, units)
    print(f"SRM: {runs} clean runs, a look every {every} units up to {units}: flagged {clean.mean():.4f} "
          f"(bound {_bound(stats.SRM_ALPHA, runs):.4f}); chi-square p < 0.001 at every look would flag "
          f"{chi_clean.mean():.4f}; 6% routed at 5% configured flagged {bad.mean():.3f}")
    assert clean.mean() <= _bound(stats.SRM_ALPHA, runs)
    assert bad.mean() >= 0.95
    assert chi_clean.mean() > clean.mean()  # why the pause decision uses the sequential test


def _error_alarms(rng, runs, intervals, rate, share, p_ctrl, p_cand, max_ratio=1.5):
    first = np.full(runs, -1)
    for r in range(runs):
        ll = stats.fresh(stats.ERROR_SHIFTS)
        n = rng.poisson(rate, intervals)
        nb = rng.binomial(n, share)
        ea, eb = rng.binomial(n - nb, p_ctrl), rng.binomial(nb, p_cand)
        for k in range(intervals):
            ll = stats.error_update(ll, max_ratio, (int(ea[k]), int(n[k] - nb[k])), (int(eb[k]), int(nb[k])))
            if stats.log_evidence(ll) >= math.log(1 / ALPHA):
                first[r] = k
                break
    return first


def test_error_guardrail_false_alarms_and_time_to_rollback():
    rng = np.random.default_rng(5)
    runs = 1000
    same = _error_alarms(rng, runs, 40, 1500, 0.05, 0.01, 0.01)  # 50 rps, 30 s intervals, 5% canary
    at_bound = _error_alarms(rng, runs, 40, 1500, 0.25, 0.01, 0.015)  # exactly the allowed 1.5x: the worst null
    broken = _error_alarms(rng, 200, 5, 1500, 0.05, 0.01, 0.5)  # half of the canary's requests fail
    trickle = _error_alarms(rng, 200, 5, 300, 0.05, 0.01, 0.5)  # the same at 10 rps: 15 canary requests
    print(f"errors guardrail: false rollbacks {(same >= 0).mean():.4f} equal rates, {(at_bound >= 0).mean():.4f} "
          f"at 1.5x (bound {_bound(ALPHA, runs):.4f}); a canary failing half its requests at 5% is rolled back "
          f"after the first 30 s interval in {(broken == 0).mean():.3f} of runs at 50 rps, "
          f"{(trickle == 0).mean():.3f} at 10 rps (all by the second: {(trickle >= 0).mean() == 1 and trickle.max() <= 1})")
    assert (same >= 0).mean() <= _bound(ALPHA, runs)
    assert (at_bound >= 0).mean() <= _bound(ALPHA, runs)
    assert (broken == 0).all()
    assert 0 <= trickle.min() and trickle.max() <= 1


def test_latency_guardrail_false_alarms_and_detection():
    edges = np.array([10.0 ** (-6 + k / 48) for k in range(8 * 48 + 1)])  # like runtime/metrics/store.py
    rng = np.random.default_rng(11)

    def hist(x):
        return np.bincount(np.searchsorted(edges, x, side="left"), minlength=edges.size + 1)

    def alarms(runs, intervals, slow):
        first = np.full(runs, -1)
        for r in range(runs):
            ll = stats.fresh(stats.LATENCY_SHIFTS)
            for k in range(intervals):
                ctrl = rng.lognormal(math.log(0.005), 0.5, 1425)
                cand = rng.lognormal(math.log(0.005 * slow), 0.5, 75)
                t = stats.latency_threshold(edges, hist(ctrl), 0.99, 2.0)
                if t is None:
                    continue
                x, n = stats.exceedances(edges, hist(cand), t)
                ll = stats.latency_update(ll, 0.99, x, n)
                if stats.log_evidence(ll) >= math.log(1 / ALPHA):
                    first[r] = k
                    break
        return first

    same, slow = alarms(500, 30, 1.0), alarms(100, 30, 3.0)
    print(f"latency guardrail p99 x2: false rollbacks {(same >= 0).mean():.4f}; a 3x slower canary caught in "
          f"{(slow >= 0).mean():.2f} of runs, median after {np.median(slow[slow >= 0]) + 1:.0f} intervals")
    assert (same >= 0).mean() <= _bound(ALPHA, 500)
    assert (slow >= 0).mean() >= 0.95
