"""Pure decisions: which versions a policy wants (`select_versions`), and what the
manager does next for a model (`plan`). No I/O, no clock: table-tested."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set as AbstractSet
from dataclasses import dataclass

from runtime.repository.modelspec import LatestPolicy, ModelSpec, SpecificPolicy
from runtime.types import VersionState


def select_versions(spec: ModelSpec, present: Iterable[int]) -> set[int]:
    """The versions the model's version policy keeps loaded, out of those present."""
    return selected_by(spec.version_policy, present)


def selected_by(policy, present: Iterable[int]) -> set[int]:
    """The versions `policy` (a ModelSpec.version_policy) selects out of those present."""
    present = sorted(set(present))
    if policy == "all":
        return set(present)
    if isinstance(policy, SpecificPolicy):
        return set(policy.specific) & set(present)
    assert isinstance(policy, LatestPolicy)
    return set(present[-policy.latest:]) if present else set()


def policy_text(policy) -> str:
    """A version policy as model.yaml spells it, short: 'all', 'latest:1', 'specific:1,3'."""
    if isinstance(policy, LatestPolicy):
        return f"latest:{policy.latest}"
    if isinstance(policy, SpecificPolicy):
        return "specific:" + ",".join(map(str, policy.specific))
    return str(policy)


# ---- the lifecycle plan ----------------------------------------------------------------

S = VersionState


@dataclass(frozen=True, slots=True)
class HarnessInfo:
    """What the plan needs of one harness: which generation of which files, in what state."""

    gen: int
    version: int
    fingerprint: str
    state: VersionState


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # "load", "unload", "cancel", "forget", "hold"
    version: int
    gen: int | None = None  # the harness acted on (None for load)
    reason: str = ""


def plan(harnesses: Sequence[HarnessInfo], aspired: Mapping[int, str],
         loadable: AbstractSet[int], present: AbstractSet[int] = frozenset(),
         disabled: bool = False, resource_preserving: bool = False) -> list[Action]:
    """Pure: what the manager does next for one model.

    `aspired` maps each version the model should serve to the fingerprint of its files now;
    `loadable` is the subset whose folder is quiet and complete; `present` the numbered
    folders on disk. Availability-preserving (default): a harness that leaves (its version is
    no longer aspired, or its files were replaced) keeps serving until an aspired version of
    the model is AVAILABLE with its current files, then unloads. Resource-preserving: it
    unloads first, and nothing new loads while anything leaving still holds memory.
    """
    out: list[Action] = []
    settled = {h.version for h in harnesses
               if h.state is S.AVAILABLE and aspired.get(h.version) == h.fingerprint}
    newest: dict[int, int] = {}
    for h in harnesses:
        if h.state is S.AVAILABLE:
            newest[h.version] = max(newest.get(h.version, 0), h.gen)
    leaving = 0
    for h in harnesses:
        current = aspired.get(h.version)
        if h.state in (S.START, S.LOADING):
            if current != h.fingerprint:
                out.append(Action("cancel", h.version, h.gen, "files changed while loading"
                                  if current is not None else
                                  _leave_reason(h.version, present, disabled) + " while loading"))
            continue
        if h.state is S.FAILED:
            if current != h.fingerprint:  # folder changed or gone: forget the failure
                out.append(Action("forget", h.version, h.gen))
            continue
        if h.state is S.UNLOADING:
            leaving += 1
            continue
        if h.state is not S.AVAILABLE:
            continue
        if current is not None:
            stale = current != h.fingerprint or h.gen < newest[h.version]
            if not stale:
                continue
            if resource_preserving or h.version in settled:
                out.append(Action("unload", h.version, h.gen, "replaced by new files"))
                leaving += 1
            else:
                out.append(Action("hold", h.version, h.gen, f"its new files are not "
                                  f"AVAILABLE yet"))
            continue
        why = _leave_reason(h.version, present, disabled)
        if resource_preserving or not aspired or settled:
            out.append(Action("unload", h.version, h.gen, why))
            leaving += 1
        else:
            out.append(Action("hold", h.version, h.gen, f"{why}; serves until version(s) "
                              f"{', '.join(map(str, sorted(aspired)))} are AVAILABLE"))
    if resource_preserving and leaving:
        return out  # memory first: load once everything leaving has unloaded
    for v in sorted(loadable):
        fp = aspired[v]
        if not any(h.version == v and h.fingerprint == fp and h.state is not S.UNLOADING
                   for h in harnesses):
            out.append(Action("load", v))
    return out


def _leave_reason(version: int, present: AbstractSet[int], disabled: bool) -> str:
    if disabled:
        return "the model was unloaded through the repository API"
    if version not in present:
        return "folder deleted"
    return "dropped by the version policy (and no route names it)"
