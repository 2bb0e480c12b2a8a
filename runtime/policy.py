"""Pure decisions: which versions a policy wants, and what the manager does next."""

from __future__ import annotations

from collections.abc import Iterable

from runtime.modelspec import LatestPolicy, ModelSpec, SpecificPolicy


def select_versions(spec: ModelSpec, present: Iterable[int]) -> set[int]:
    """The versions the model's version policy keeps loaded, out of those present."""
    present = sorted(set(present))
    policy = spec.version_policy
    if policy == "all":
        return set(present)
    if isinstance(policy, SpecificPolicy):
        return set(policy.specific) & set(present)
    assert isinstance(policy, LatestPolicy)
    return set(present[-policy.latest:]) if present else set()
