"""The lifecycle plan is pure: a table of (harnesses, aspired, loadable) -> actions."""

import pytest

from runtime.lifecycle.policy import Action, HarnessInfo, plan
from runtime.types import VersionState

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

A, L, U, F, ST = (VersionState.AVAILABLE, VersionState.LOADING, VersionState.UNLOADING,
                  VersionState.FAILED, VersionState.START)
POLICY = "dropped by the version policy (and no route names it)"


def h(gen, version, fp, state):
    return HarnessInfo(gen, version, fp, state)


def kinds(actions):
    return [(a.kind, a.version, a.gen) for a in actions]


CASES = [
    # id, harnesses, aspired, loadable, present, flags, expected (kind, version, gen)
    ("first load", [], {1: "a"}, {1}, {1}, {}, [("load", 1, None)]),
    ("folder not quiet yet", [], {1: "a"}, set(), {1}, {}, []),
    ("loading: nothing more to do", [h(1, 1, "a", L)], {1: "a"}, {1}, {1}, {}, []),
    ("new version: old one holds until it serves",
     [h(1, 1, "a", A)], {2: "b"}, {2}, {1, 2}, {}, [("hold", 1, 1), ("load", 2, None)]),
    ("new version AVAILABLE: old one unloads",
     [h(1, 1, "a", A), h(2, 2, "b", A)], {2: "b"}, {2}, {1, 2}, {}, [("unload", 1, 1)]),
    ("new version still loading: old one holds",
     [h(1, 1, "a", A), h(2, 2, "b", L)], {2: "b"}, {2}, {1, 2}, {}, [("hold", 1, 1)]),
    ("new version failed: old one keeps serving",
     [h(1, 1, "a", A), h(2, 2, "b", F)], {2: "b"}, {2}, {1, 2}, {}, [("hold", 1, 1)]),
    ("failed with these files: no retry", [h(2, 2, "b", F)], {2: "b"}, {2}, {2}, {}, []),
    ("failed, files changed: forget, then load the new files",
     [h(2, 2, "b", F)], {2: "c"}, {2}, {2}, {}, [("forget", 2, 2), ("load", 2, None)]),
    ("overwritten in place: the old generation holds",
     [h(1, 1, "a", A)], {1: "a2"}, {1}, {1}, {}, [("hold", 1, 1), ("load", 1, None)]),
    ("overwritten in place: new generation AVAILABLE, old one unloads",
     [h(1, 1, "a", A), h(2, 1, "a2", A)], {1: "a2"}, {1}, {1}, {}, [("unload", 1, 1)]),
    ("loading but no longer aspired: cancel", [h(3, 3, "c", L)], {}, set(), set(), {},
     [("cancel", 3, 3)]),
    ("start, files changed: cancel", [h(3, 3, "c", ST)], {3: "d"}, {3}, {3}, {},
     [("cancel", 3, 3), ("load", 3, None)]),
    ("nothing aspired at all: unload at once", [h(1, 1, "a", A)], {}, set(), set(), {},
     [("unload", 1, 1)]),
    ("an unloading harness blocks nothing by default",
     [h(1, 1, "a", U)], {2: "b"}, {2}, {2}, {}, [("load", 2, None)]),
    ("resource-preserving: unload first, load nothing yet",
     [h(1, 1, "a", A)], {2: "b"}, {2}, {1, 2}, {"resource_preserving": True},
     [("unload", 1, 1)]),
    ("resource-preserving: wait while it unloads",
     [h(1, 1, "a", U)], {2: "b"}, {2}, {1, 2}, {"resource_preserving": True}, []),
    ("resource-preserving: then load", [], {2: "b"}, {2}, {1, 2},
     {"resource_preserving": True}, [("load", 2, None)]),
    ("resource-preserving overwrite: unload the old files first",
     [h(1, 1, "a", A)], {1: "a2"}, {1}, {1}, {"resource_preserving": True}, [("unload", 1, 1)]),
]


@pytest.mark.parametrize("harnesses,aspired,loadable,present,flags,expected",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(harnesses, aspired, loadable, present, flags, expected):
    assert kinds(plan(harnesses, aspired, loadable, present, **flags)) == expected


@pytest.mark.parametrize("present,disabled,why", [
    ({2}, False, "folder deleted"),
    ({1, 2}, False, POLICY),
    ({1, 2}, True, "the model was unloaded through the repository API"),
])
def test_unload_reasons_say_what_happened(present, disabled, why):
    acts = plan([h(1, 1, "a", A), h(2, 2, "b", A)], {2: "b"} if not disabled else {}, set(),
                present, disabled)
    assert acts[0] == Action("unload", 1, 1, why)


def test_plan_is_pure():
    hs = [h(1, 1, "a", A)]
    asp = {2: "b"}
    assert plan(hs, asp, {2}, {1, 2}) == plan(hs, asp, {2}, {1, 2})
    assert hs == [h(1, 1, "a", A)] and asp == {2: "b"}


@pytest.mark.parametrize("present,why", [
    (set(), "folder deleted while loading"),
    ({3}, POLICY + " while loading"),
])
def test_cancel_reasons_say_which(present, why):
    """'no longer aspired' said nothing: a deleted folder and a policy drop read apart."""
    assert plan([h(3, 3, "c", L)], {}, set(), present) == [Action("cancel", 3, 3, why)]
