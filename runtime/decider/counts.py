"""What the runtime counts for an experiment, per routing generation and per sticky key.

Workers count into tallies (runtime/decider/tally.py) under two kinds of keys:

- arms: `a TAB model TAB version TAB share` -> [requests, errors, units, latency histogram
  of successes (runtime/histogram.py)], where `share` is the candidate share of the routing
  config the router used when it placed the request (not the one in force when it
  finished, nor the decider's): a worker or replica that applies a new split late counts
  under the old one. `units` counts unkeyed requests (a sticky key is a unit once, below).
- keys (sticky routing): `k TAB model TAB experiment fingerprint TAB key` -> [requests,
  errors, share, arm, time] of that key in this worker, and where this worker first placed
  it (the share, 0 control / 1 candidate, wall-clock seconds). The fingerprint makes a key
  new to each experiment.

The decider sums every worker's (and, in a fleet, every pod's pushed) tallies. It maps a
share to a routing generation with `generation_of` (the newest generation it routed at
that share), and keeps per key its cohort (the generation and arm where the key was first
placed anywhere, the earliest time wins) and the totals it has judged, so each judgment
feeds the increments of the per-key sums `experiments.stats.UnitSums` wants. Memory at the
decider: ~200 bytes per key (`Cohorts`), bounded by `capacity` keys per model (beyond it,
new keys are counted as units but not summed; `dropped` says how many).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from experiments.stats import UnitSums
from runtime.histogram import NB

ARM_WIDTH = 3 + NB
KEY_WIDTH = 5
COHORT_CAPACITY = 1_000_000


def parse_tag(tag: str) -> tuple[int, float | None]:
    """(version, share) of an arms tag; share None for a bare version (a pod before issue 29)."""
    v, _, s = str(tag).partition("@")
    return int(v), (float(s) if s else None)


def zero_counts() -> list:
    return [0, 0, 0, [0] * NB]  # requests, errors, units, latency histogram of successes


def add_counts(acc: dict[str, list], counts: Mapping) -> None:
    """Add one document's {tag: [requests, errors, units, histogram]} into acc."""
    for tag, (n, e, u, lat) in counts.items():
        a = acc.setdefault(str(tag), zero_counts())
        a[0] += n
        a[1] += e
        a[2] += u
        for i, c in enumerate(lat):
            a[3][i] += c


def arms_of(entries: Mapping[str, list[float]]) -> dict[str, dict[str, list]]:
    """model -> tag -> counts, from a tally's entries."""
    out: dict[str, dict[str, list]] = {}
    for name, v in entries.items():
        kind, _, rest = name.partition("\t")
        if kind != "a" or len(v) != ARM_WIDTH:
            continue
        model, version, share = rest.split("\t")
        out.setdefault(model, {})[f"{version}@{share}"] = [int(v[0]), int(v[1]), int(v[2]), [int(x) for x in v[3:]]]
    return out


def keys_of(entries: Mapping[str, list[float]], acc: dict | None = None) -> dict[str, dict[str, dict[str, list]]]:
    """model -> fingerprint -> key -> [requests, errors, share, arm, time], summed into acc
    (the earliest first placement wins)."""
    out = {} if acc is None else acc
    for name, v in entries.items():
        kind, _, rest = name.partition("\t")
        if kind != "k" or len(v) != KEY_WIDTH:
            continue
        model, spec, key = rest.split("\t", 2)
        merge_key(out.setdefault(model, {}).setdefault(spec, {}), key, v)
    return out


def merge_key(into: dict[str, list], key: str, v: list) -> None:
    have = into.get(key)
    if have is None:
        into[key] = list(v)
        return
    have[0] += v[0]
    have[1] += v[1]
    if v[4] < have[4]:
        have[2:5] = v[2:5]


def merge_keys(acc: dict, docs: Iterable[Mapping]) -> dict:
    for doc in docs:
        for model, specs in doc.items():
            for spec, keys in specs.items():
                into = acc.setdefault(model, {}).setdefault(spec, {})
                for key, v in keys.items():
                    merge_key(into, key, v)
    return acc


def generation_of(history: Iterable[tuple[int, float]], share: float | None, current: int) -> int:
    """The newest generation routed at `share` (the current one for an unknown share): two
    generations with one share (a retry back to step 1) are one stratum to the estimates,
    which is unbiased, since the split did not change between them."""
    if share is None:
        return current
    best = None
    for g, s in history:
        if abs(s - share) < 1e-9 and (best is None or g > best):
            best = g
    return current if best is None else best


class Cohorts:
    """Per model and sticky key: [generation, arm, requests, errors judged so far, counted
    as a unit yet] (see the module docstring). The cohort is fixed by whichever the decider
    sees first: the key's first decision record (`home`) or its tallies (`judge`). Loop-only."""

    def __init__(self, capacity: int = COHORT_CAPACITY):
        self.capacity = capacity
        self._spec: dict[str, str] = {}
        self._keys: dict[str, dict[str, list]] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return sum(len(k) for k in self._keys.values())

    def _of(self, model: str, spec: str) -> dict[str, list]:
        if self._spec.get(model) != spec:  # a new experiment: every key is new to it
            self._spec[model] = spec
            self._keys[model] = {}
        return self._keys[model]

    def prime(self, model: str, spec: str, totals: Mapping[str, list], gen_of: Callable[[float], int]) -> None:
        """A new decider: take the totals found as judged (the previous decider judged them,
        up to its last interval; that interval's per-key sums are not fed again)."""
        keys = self._of(model, spec)
        for key, (x, y, share, arm, _) in totals.items():
            if key not in keys and len(keys) < self.capacity:
                keys[key] = [gen_of(share), int(arm), x, y, True]

    def home(self, model: str, spec: str, key: str, gen: int, arm: int) -> tuple[int, int]:
        """The key's cohort (generation, arm); a key not seen yet gets (gen, arm), where this
        request placed it. Feedback joins to the cohort, so a key is one unit in one stratum."""
        if self._spec.get(model, spec) != spec:  # placed under another experiment's routing
            return gen, arm
        keys = self._of(model, spec)
        rec = keys.get(key)
        if rec is None:
            if len(keys) >= self.capacity:
                return gen, arm
            rec = keys[key] = [gen, arm, 0.0, 0.0, False]
        return rec[0], rec[1]

    def judge(self, model: str, spec: str, totals: Mapping[str, list], gen_of: Callable[[float], int]
              ) -> dict[tuple[int, int], tuple[int, UnitSums]]:
        """(generation, arm) -> (keys first placed there, increments of the per-key sums with
        x = requests and y = errors) since the last call."""
        keys = self._of(model, spec)
        acc: dict[tuple[int, int], list] = {}
        for key, (x, y, share, arm, _) in totals.items():
            rec = keys.get(key)
            if rec is None:
                if len(keys) >= self.capacity:
                    self.dropped += 1
                    continue
                rec = keys[key] = [gen_of(share), int(arm), 0.0, 0.0, False]
            new = not rec[4]
            rec[4] = True
            a, b = rec[2], rec[3]
            dx, dy = x - a, y - b
            if not new and dx <= 0 and dy <= 0:
                continue
            s = acc.setdefault((rec[0], rec[1]), [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            s[0] += new
            s[1] += new
            s[2] += dx
            s[3] += 2 * a * dx + dx * dx  # (a + dx)^2 - a^2
            s[4] += dy
            s[5] += 2 * b * dy + dy * dy
            s[6] += a * dy + b * dx + dx * dy  # (a + dx)(b + dy) - ab
            rec[2], rec[3] = x, y
        return {k: (int(s[0]), UnitSums(int(s[1]), s[2], s[3], s[4], s[5], s[6])) for k, s in acc.items()}
